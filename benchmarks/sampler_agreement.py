"""Do vLLM and transformers sample from the same distribution? The default model answers the same prompts with
both engines (the same per-answer seeds, different random streams), and the trainer's own forward pass scores every
sampled token: the mean −log π per answer token, the mean answer length and the share of answers that end with EOS
should agree within noise; vLLM's reported log-probs should equal the trainer's.

    .venv/vllm/bin/python benchmarks/sampler_agreement.py [--prompts 8] [--answers 8] [--max-new-tokens 40]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--answers", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from online_verifiable import task_prompts

    from thumbalign.data.batching import collate_masked
    from thumbalign.data.tokens import encode_prompt
    from thumbalign.engine.inference import sample_answers
    from thumbalign.engine.logprobs import completion_token_logps
    from thumbalign.engine.models import load_causal_lm, load_tokenizer, resolve_model
    from thumbalign.engine.vllm_engine import EngineSettings, LocalEngine

    folder = resolve_model("default")
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder).eval()
    model.config.use_cache = True
    rows = task_prompts(240, 0)[0][:args.prompts]
    ids = [encode_prompt(tokenizer, row["prompt"]) for row in rows for _ in range(args.answers)]
    seeds = list(range(len(ids)))
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        answers = {"transformers": sample_answers(model, ids, seeds, args.max_new_tokens, 1.0,
                                                  tokenizer.pad_token_id, eos)}
    engine = LocalEngine(EngineSettings(model_dir=str(folder), dtype="float32", seed=0,
                                        max_model_len=max(map(len, ids)) + args.max_new_tokens,
                                        max_num_seqs=len(ids), gpu_memory_utilization=0.3))
    answers["vLLM"], reported = engine.generate(ids, seeds, 1.0, args.max_new_tokens, eos)
    engine.close()

    print(f"{len(ids)} answers per engine, default model, float32, temperature 1")
    print("| engine | −log π per answer token (trainer's forward) | mean length | ending with EOS |")
    print("| --- | --- | --- | --- |")
    for name, sampled in answers.items():
        t = collate_masked([p + a for p, a in zip(ids, sampled)],
                           [[False] * len(p) + [True] * len(a) for p, a in zip(ids, sampled)], tokenizer.pad_token_id)
        with torch.no_grad():
            logps = completion_token_logps(model, t["input_ids"], t["attention_mask"], t["completion_mask"])
        mask = t["completion_mask"][:, 1:]
        print(f"| {name} | {float(-(logps * mask).sum() / mask.sum()):.4f} | "
              f"{sum(map(len, sampled)) / len(sampled):.1f} | "
              f"{sum(bool(a) and a[-1] == eos for a in sampled) / len(sampled):.3f} |")
    tokens = sum(map(len, reported))
    print(f"vLLM's own log-probs of its tokens: −log π {-sum(map(sum, reported)) / tokens:.4f} per token")


if __name__ == "__main__":
    main()
