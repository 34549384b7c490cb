"""Build examples/feedback.jsonl: the default model's own answers, given a thumbs-up or down by an offline judge.

    python examples/make_feedback.py                    # writes examples/feedback.jsonl (a few minutes on a CPU)
    python examples/make_feedback.py --answers 2 --out /tmp/small.jsonl

How the labels are made: each prompt asks for something with an emotional colour (a review, a reaction, a
description). The default model (SmolLM2-135M-Instruct) answers it several times with sampling. VADER, a
lexicon-based sentiment scorer that runs offline, gives each answer a compound score in [-1, 1]; answers at or
above --threshold get 👍, the others 👎. The score is kept in the "vader" field so other cut-offs can be tried.
The feedback thus rewards upbeat, warm answers: a property a model can learn and a judge can check.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch

TEMPLATES = [
    "Write a one-sentence review of {}.",
    "How do you feel about {}?",
    "Describe {} in two sentences.",
    "What would you tell a friend about {}?",
    "Give me your honest opinion of {}.",
    "Write a short note about {} for a newsletter.",
]
TOPICS = [
    "a rainy Monday morning", "a crowded train", "a new coffee shop", "a long flight delay", "learning to cook",
    "a birthday party", "a broken phone", "a walk in the park", "a job interview", "moving to a new city",
    "a traffic jam", "a surprise gift", "a cold winter night", "a summer holiday", "a noisy neighbour",
    "a first day at school", "a lost wallet", "a concert", "a dentist appointment", "a home-made pizza",
    "an old friend calling", "a power cut", "a marathon", "a library", "a cancelled meeting",
    "a puppy", "a failed exam", "a sunrise", "a slow internet connection", "a family dinner",
]

# Held-out topics for `make demo`'s generation eval: never seen in training.
EVAL_TOPICS = ["a thunderstorm", "a new bicycle", "a missed bus", "a board game night", "a flat tyre",
               "a museum visit", "a burnt cake", "a wedding", "a hospital waiting room", "a garden in spring",
               "a lost umbrella", "a road trip"]


def write_eval_prompts(path: Path) -> None:
    rows = [{"prompt": [{"role": "user", "content": t.format(topic)}]} for topic in EVAL_TOPICS
            for t in TEMPLATES[:2]]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} held-out prompts to {path}")


def write_pairs(rows: list[dict], path: Path) -> None:
    """Paired data for the paired methods: for each prompt with a 👍 and a 👎 answer, the one with the higher VADER
    score is chosen, the one with the lowest is rejected."""
    by_prompt: dict[str, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt"][0]["content"], []).append(row)
    pairs = []
    for answers in by_prompt.values():
        if any(a["label"] for a in answers) and not all(a["label"] for a in answers):
            best = max(answers, key=lambda a: a["vader"])
            worst = min(answers, key=lambda a: a["vader"])
            pairs.append({"prompt": best["prompt"], "chosen": best["completion"], "rejected": worst["completion"]})
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    print(f"wrote {len(pairs)} pairs to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "feedback.jsonl"))
    parser.add_argument("--answers", type=int, default=2, help="sampled answers per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.5, help="VADER compound score for a thumbs-up")
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from thumbalign.engine.models import resolve_model

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model_dir = resolve_model("default")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # float32 generates faster than bf16 on CPUs without bf16 units
    judge = SentimentIntensityAnalyzer()

    prompts = [t.format(topic) for topic in TOPICS for t in TEMPLATES]
    jobs = [p for p in prompts for _ in range(args.answers)]
    rows = []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="generating", unit="batch"):
        batch = jobs[start:start + args.batch_size]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=0.95,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        for prompt, ids in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if not answer:
                continue
            score = judge.polarity_scores(answer)["compound"]
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "completion": [{"role": "assistant", "content": answer}],
                         "label": score >= args.threshold, "vader": round(score, 4)})
    random.shuffle(rows)
    write_pairs(rows, Path(args.out).with_name("pairs.jsonl"))
    write_eval_prompts(Path(args.out).with_name("eval_prompts.jsonl"))
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    up = sum(r["label"] for r in rows)
    print(f"wrote {len(rows)} rows to {args.out}: {up} thumbs-up, {len(rows) - up} thumbs-down "
          f"({len(jobs) - len(rows)} empty answers skipped)")


if __name__ == "__main__":
    main()
