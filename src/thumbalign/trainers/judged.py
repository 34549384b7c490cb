"""After training, the trained and the base model answer held-out prompts and a judge decides: from the saved
folder, or — sharded — on the shards, every process sampling in step."""

from __future__ import annotations

from pathlib import Path

from ..analysis.judged import format_comparison, judge_answers, judged_generations
from ..engine.generation import sample_in_step
from ..engine.loop import Engine
from ..engine.models import empty_model, load_causal_lm, load_tokenizer
from ..engine.rundir import RunDir


def compare_with_base(config, run: RunDir, base_dir: Path, prompts_file: str, judge, max_new_tokens: int,
                      say, answers: dict[str, list[str]] | None = None) -> dict:
    """The trained model (the run's model folder) and the base answer held-out prompts greedily, in float32 (on the GPU
    where there is one), the same way `thumbalign eval` does; the judge decides; bootstrap intervals. Answers go to
    generations.jsonl. `answers`: the two models' answers, already generated on sharded weights
    (:func:`answers_on_shards`)."""
    if config.use_lora and config.save_adapter:
        say("Generation eval skipped: the run saved an adapter only (drop --save-adapter to compare)")
        return {}
    out_file = run.path / "generations.jsonl"
    if answers is not None:
        result = judge_answers(answers, prompts_file, judge, out_file)
    else:
        result = judged_generations({"trained": run.path / "model", "base": base_dir}, prompts_file, judge, out_file,
                                    max_new_tokens=max_new_tokens,
                                    temperature=getattr(config, "eval_temperature", 0.0), seed=config.seed,
                                    batch_size=config.eval_batch_size,
                                    use_vllm=answers_with_vllm(config))
    say(f"Held-out prompts answered by both models, judged:\n{format_comparison(result)}")
    return result


def answers_with_vllm(config) -> bool:
    """--use-vllm with vLLM in this process (not a server's, which is another environment): it writes the held-out
    answers too."""
    return getattr(config, "use_vllm", False) and getattr(config, "vllm_mode", "colocate") == "colocate"


def answers_on_shards(config, engine: Engine, model, tokenizer, base_dir: Path, max_new_tokens: int,
                      base=None) -> dict[str, list[str]] | None:
    """--eval-prompts with sharded weights (FSDP, ZeRO-3): the trained model, still sharded, and the base model,
    sharded the same way (read on the first process only), answer the held-out prompts. Each process answers a share
    of them, every process in step; the main process gets every answer (the others None). The same prompts, rendered
    and decoded as :func:`compare_with_base` does them, greedy or seeded per prompt, in the run's precision. `base`:
    the base model already sharded by `Engine.frozen` and run once (online's KL reference), not loaded again."""
    from ..data.prompts import load_prompts
    from ..engine.inference import render_prompt
    from ..engine.logprobs import CompletionLogps

    if config.use_lora and config.save_adapter:  # compare_with_base skips the comparison
        return None
    prompts = load_prompts(config.eval_prompts)
    mine = list(range(engine.rank, len(prompts), engine.world))
    temperature = getattr(config, "eval_temperature", 0.0)
    base_tokenizer = load_tokenizer(base_dir, config.trust_remote_code)
    if base is None:
        base = (load_causal_lm(base_dir, config.trust_remote_code) if engine.is_main
                else empty_model(base_dir, config.trust_remote_code))
        engine.settle_root(base_tokenizer.eos_token_id,
                           engine.frozen(CompletionLogps(base, config.logps_chunk_size), base))
    answers = {}
    for name, generator, tok in (("trained", model, tokenizer), ("base", base, base_tokenizer)):
        ids = [tok(render_prompt(tok, prompts[i].prompt), add_special_tokens=not isinstance(prompts[i].prompt, list))
               ["input_ids"] for i in mine]
        was_training = generator.training
        generator.eval()
        out = sample_in_step(engine, generator, ids, [config.seed + i for i in mine], config.eval_batch_size,
                             max_new_tokens, temperature, tok.pad_token_id, None, tok.eos_token_id)
        generator.train(was_training)
        answers[name] = dict(zip(mine, (tok.decode(a, skip_special_tokens=True).strip() for a in out)))
    gathered = engine.gather_objects(answers)
    if not engine.is_main:
        return None
    return {name: [next(part[name][i] for part in gathered if i in part[name]) for i in range(len(prompts))]
            for name in answers}
