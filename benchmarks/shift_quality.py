"""Learn the answer, not the prompt: alignment quality under *shifted* binary feedback, judged on generations.

Two feedback sets built from the default model's own sampled answers, each shifted so that the kind of prompt
predicts the label:

* ``topic`` (sentiment): review/opinion prompts about 30 topics, labelled 👍 when VADER's compound score ≥ 0.5.
  The topics are split in two pools; the training set keeps every 👍 of pool A and every 👎 of pool B but only a
  share --keep-minor of the others, so "topic A is good" explains most labels (as in benchmarks/udm_shift.py).
* ``constraints`` (verifiable): questions with an instruction of one of six kinds (one sentence, at most 20
  words, no commas, all lowercase, end with "!", use a given word). A rule checker labels each answer; the base
  passes the easy kinds and fails the hard ones, so the label correlates with the kind with no filtering at all.

Every method is trained with the same seed, steps, batch, LoRA rank, learning rate and β. The evaluation prompts
were never trained on (topic: new templates on the same topics, so each belongs to a pool; constraints: new
topics), the base and every trained model answer each greedily, and the same gold judge (VADER / the rule
checker) labels every answer. The table gives the 👍 rate with a BCa bootstrap interval, the paired difference
from the base and from plain ``bco``, the rate per pool or instruction kind, and "worst fall where the base was
good": the largest drop on a kind where the base passes ≥ 0.8.

    .venv/bin/python benchmarks/shift_quality.py                          # both settings, every run (≈ 1 h, 2 cores)
    .venv/bin/python benchmarks/shift_quality.py --settings constraints --runs "bco --sft-weight 0" "bco --udm"

"bco --sft-weight 0" is the paper's BCO, the yardstick; "bco" alone is the default thumbalign run (BCO with the SFT
anchor on 👍 answers). "route" is `thumbalign online --feedback` on the same file: a reward model trained on the
thumbs (2 epochs, full fine-tune), then GRPO against its calibrated P(👍) on the file's prompts (--route-steps × 4
prompts × 8 answers, LoRA r16); words after "route" are passed to it (e.g. "route --beta 0.05"). "online" is
`thumbalign online` with the gold judge itself as the reward on the training prompts, with the same budget (what
learning from the judge directly does to each kind).

The sampled feedback and each trained model are kept under --work; a rerun reuses them (delete --work to redo).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

def _bundled_example_lists():
    """The topics and templates of the bundled example feedback (examples/make_feedback.py)."""
    spec = importlib.util.spec_from_file_location("make_feedback", ROOT / "examples" / "make_feedback.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TOPICS, module.EVAL_TOPICS, module.TEMPLATES


TOPICS, _EXAMPLE_EVAL_TOPICS, _EXAMPLE_TEMPLATES = _bundled_example_lists()
EVAL_TOPICS = _EXAMPLE_EVAL_TOPICS + ["a picnic", "a long queue", "a snowy morning", "a football match",
                                      "a leaking roof", "a farmers' market", "a late train", "a beach day"]

# topic: training templates, and templates never trained on for the evaluation
TOPIC_TRAIN_TEMPLATES = _EXAMPLE_TEMPLATES
TOPIC_EVAL_TEMPLATES = [
    "Write a short comment about {}.", "What do you think of {}?", "Tell me about {} in one sentence.",
    "Share your thoughts on {}.", "Write a diary line about {}.", "Describe your reaction to {}.",
    "Write a caption for a photo of {}.", "Say something about {}.",
]

# constraints: questions, and one rule checker per instruction kind
QUESTIONS = ["Tell me about {}.", "What should I know about {}?"]
CONSTRAINTS = {
    "one_sentence": ("Answer in one sentence.",
                     lambda t: len([s for s in re.split(r"(?<=[.!?])\s+", t.strip()) if s]) == 1),
    "max_20_words": ("Answer in at most 20 words.", lambda t: len(t.split()) <= 20),
    "no_commas": ("Do not use any commas.", lambda t: "," not in t),
    "lowercase": ("Write your whole answer in lowercase letters.", lambda t: t == t.lower()),
    "ends_exclaim": ("End your answer with an exclamation mark.", lambda t: t.rstrip().endswith("!")),
    "use_word": ("Use the word 'wonderful' in your answer.", lambda t: "wonderful" in t.lower()),
}


PLAIN_BCO = "bco --sft-weight 0"  # the paper's BCO: the yardstick
RUNS = [PLAIN_BCO, "bco --udm --sft-weight 0", "bco --delta prompt --sft-weight 0", "kto", "sft-positive", "aft",
        "reward-token", "bco", "bco --udm", "route"]


def constraint_judge(text: str, row: dict) -> bool:
    return bool(CONSTRAINTS[row["kind"]][1](text))


def vader_judge():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return lambda text, row: analyzer.polarity_scores(text)["compound"] >= 0.5


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def setting_prompts(setting: str) -> tuple[list[dict], list[dict]]:
    """(training prompt rows, evaluation prompt rows), each with a 'kind' (the pool or the instruction kind)."""
    if setting == "topic":
        pool = {t: ("pool_A" if i % 2 == 0 else "pool_B") for i, t in enumerate(TOPICS)}
        train = [{"prompt": user(t.format(topic)), "kind": pool[topic]} for topic in TOPICS for t in TOPIC_TRAIN_TEMPLATES]
        held = [{"prompt": user(t.format(topic)), "kind": pool[topic], "template": t}
                for topic in TOPICS for t in TOPIC_EVAL_TEMPLATES]
        return train, held

    def rows(topics):
        return [{"prompt": user(f"{q.format(topic)} {instruction}"), "kind": kind}
                for topic in topics for q in QUESTIONS for kind, (instruction, _) in CONSTRAINTS.items()]

    return rows(TOPICS), rows(EVAL_TOPICS)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def sample_feedback(args, setting: str, prompts: list[dict], judge) -> list[dict]:
    """--answers sampled answers per training prompt from the default model, each labelled by the gold judge."""
    from thumbalign.engine.inference import generate
    from thumbalign.engine.models import load_causal_lm, load_tokenizer, resolve_model

    folder = resolve_model("default")
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder).eval()
    rows = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        answers = generate(model, tokenizer, [p["prompt"] for p in batch], args.max_new_tokens, 1.0,
                           args.seed * 1000 + start, num_return_sequences=args.answers)
        for k, answer in enumerate(answers):
            row = batch[k // args.answers]
            if answer:
                rows.append({"prompt": row["prompt"], "completion": [{"role": "assistant", "content": answer}],
                             "label": bool(judge(answer, row)), "kind": row["kind"]})
        print(f"  {setting}: sampled {start + len(batch)}/{len(prompts)} prompts", flush=True)
    return rows


def shift(setting: str, rows: list[dict], keep_minor: float, seed: int) -> list[dict]:
    """topic: keep 👍 of pool A and 👎 of pool B, and only a share of the others. constraints: as sampled."""
    if setting != "topic":
        return rows
    rng = random.Random(seed)
    return [r for r in rows if r["label"] == (r["kind"] == "pool_A") or rng.random() < keep_minor]


def feedback(args, setting: str, train_prompts: list[dict], judge) -> Path:
    path = args.work / setting / "feedback.jsonl"
    if not path.exists():
        sampled = sample_feedback(args, setting, train_prompts, judge)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, shift(setting, sampled, args.keep_minor, args.seed))
    return path


ROUTE = "route"  # `thumbalign online --feedback`: a reward model on the thumbs, then GRPO against its P(👍)


def route_command(args, data: Path, out: Path, extra: list[str]) -> list[str]:
    """The reward-model route on the same thumbs: every prompt of the file is trained on (the benchmark's own
    held-out prompts are the evaluation), LoRA r16 as the offline runs, answers as long as the evaluation's."""
    return [str(args.thumbalign), "online", "--feedback", str(data), "--output-dir", str(out), "--overwrite",
            "--feedback-eval-share", "0", "--use-lora", "--learning-rate", str(args.route_learning_rate),
            "--max-steps", str(args.route_steps), "--per-device-train-batch-size", "4", "--num-generations", "8",
            "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed), "--save-steps", "1000",
            "--logging-steps", "5", "--no-report", *extra]


ONLINE = "online"  # `thumbalign online` with the gold judge itself as the reward, on the training prompts


def online_command(args, setting: str, out: Path, extra: list[str]) -> list[str]:
    """Online learning from the gold judge (the rule checker, VADER) on the training prompts, with the route's budget:
    what learning from the judge directly does to each kind, the kinds the base already passes included."""
    train_prompts, _ = setting_prompts(setting)
    prompts = write_jsonl(args.work / setting / "train_prompts.jsonl", train_prompts)
    reward = "vader" if setting == "topic" else "shift_quality:constraint_judge"
    return [str(args.thumbalign), "online", "--prompts", str(prompts), "--reward", reward, "--output-dir", str(out),
            "--overwrite", "--use-lora", "--learning-rate", str(args.route_learning_rate), "--max-steps",
            str(args.route_steps), "--per-device-train-batch-size", "4", "--num-generations", "8", "--max-new-tokens",
            str(args.max_new_tokens), "--seed", str(args.seed), "--save-steps", "1000", "--logging-steps", "5",
            "--no-report", *extra]


def train(args, setting: str, run: str, data: Path) -> tuple[Path, float]:
    out = args.work / setting / run.replace(" ", "_").replace("--", "")
    timing = out.with_suffix(".seconds")
    kind = shlex.split(run)[0]
    is_route = kind == ROUTE
    model = out / "policy" / "model" if is_route else out / "model"
    if (model / "config.json").exists():
        return model, float(timing.read_text()) if timing.exists() else 0.0
    command = [str(args.thumbalign), "train", "--data", str(data), "--output-dir", str(out), "--overwrite",
               "--use-lora", "--learning-rate", str(args.learning_rate), "--beta", str(args.beta),
               "--max-steps", str(args.steps), "--per-device-train-batch-size", "8", "--seed", str(args.seed),
               "--max-length", "256", "--save-steps", "1000", "--logging-steps", "10", "--no-report",
               "--method", *shlex.split(run)]
    env = None
    if is_route:
        # the gold judge as --check-judge: it never trains, it shows how far the reward model's verdicts on the
        # policy's answers agree with it as training goes (check_agreement in metrics.jsonl)
        check = "vader" if setting == "topic" else "shift_quality:constraint_judge"
        command = route_command(args, data, out, ["--check-judge", check, *shlex.split(run)[1:]])
    if kind == ONLINE:
        command = online_command(args, setting, out, shlex.split(run)[1:])
    if is_route or kind == ONLINE:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code:
        sys.exit(f"failed ({code}): {shlex.join(command)}; see {out.with_suffix('.log')}")
    seconds = time.perf_counter() - start
    timing.write_text(f"{seconds:.1f}")
    return model, seconds


def judged(args, setting: str, models: dict[str, Path], held: list[dict], judge) -> dict[str, list[dict]]:
    """Greedy answers of every model to every evaluation prompt, judged; {model: [record per prompt]}."""
    from thumbalign.analysis.judged import judged_generations

    prompts_file = write_jsonl(args.work / setting / "eval_prompts.jsonl", held)
    out_file = args.work / setting / "judged.jsonl"
    judged_generations(models, str(prompts_file), judge, out_file, max_new_tokens=args.max_new_tokens,
                       temperature=0.0, seed=args.seed, batch_size=args.batch_size, progress=False)
    records: dict[str, list] = {name: [None] * len(held) for name in models}
    for line in out_file.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["model"] in records:
            records[r["model"]][r["i"]] = r
    return records


def interval(values) -> str:
    from thumbalign.analysis.metrics import bootstrap_interval

    mean, low, high = bootstrap_interval(values, n_boot=2000, seed=0)
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def table(setting: str, held: list[dict], records: dict[str, list[dict]], seconds: dict[str, float],
          yardstick: str = PLAIN_BCO) -> str:
    import numpy as np

    from thumbalign.analysis.metrics import bootstrap_interval

    verdicts = {m: np.array([float(r["verdict"]) for r in recs]) for m, recs in records.items()}
    # kinds: the pool or instruction kind, and for the topic setting also each prompt template
    masks = {k: np.array([row["kind"] == k for row in held]) for k in sorted({row["kind"] for row in held})}
    for t in sorted({row["template"] for row in held if "template" in row}):
        masks[f"template “{t.format('…')}”"] = np.array([row.get("template") == t for row in held])
    kinds = list(masks)
    rate = {m: {k: float(v[masks[k]].mean()) for k in kinds} for m, v in verdicts.items()}
    good = [k for k in kinds if rate["base"][k] >= 0.8]
    lines = [f"### {setting}: {len(held)} held-out prompts, one greedy answer each", "",
             f"| run | train time | 👍 rate [95% CI] | vs base | vs `{yardstick}` | worst fall where base ≥ 0.8 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for m, v in verdicts.items():
        mean, low, high = bootstrap_interval(v, n_boot=2000, seed=0)
        vs_base = interval(v - verdicts["base"]) if m != "base" else ""
        vs_bco = interval(v - verdicts[yardstick]) if m not in ("base", yardstick) and yardstick in verdicts else ""
        falls = [(rate[m][k] - rate["base"][k], k) for k in good]
        worst = min(falls) if falls and m != "base" else None
        worst_text = f"{worst[0]:+.3f} ({worst[1]})" if worst else ("no kind ≥ 0.8" if not good else "")
        minutes = f"{seconds[m] / 60:.1f} min" if seconds.get(m) else ""
        name = "base model" if m == "base" else f"`{m}`" + (" (default)" if m == "bco" else "")
        lines.append(f"| {name} | {minutes} | {mean:.3f} [{low:.3f}, {high:.3f}] | {vs_base} | {vs_bco} | {worst_text} |")
    lines += ["", "| kind | prompts | " + " | ".join(verdicts) + " |", "| --- | --- |" + " --- |" * len(verdicts)]
    for k in kinds:
        lines.append(f"| {k} | {int(masks[k].sum())} | " + " | ".join(f"{rate[m][k]:.3f}" for m in verdicts) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["topic", "constraints"], choices=["topic", "constraints"])
    parser.add_argument("--runs", nargs="+", default=RUNS,
                        help="each a --method value and its extra flags, e.g. 'bco --udm'; 'bco' alone is the "
                             "default thumbalign run")
    parser.add_argument("--yardstick", default=PLAIN_BCO, help="the run the 'vs' column compares with")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--route-steps", type=int, default=30, help="online steps of the 'route' run (× 4 prompts × "
                                                                    "8 answers)")
    parser.add_argument("--route-learning-rate", type=float, default=2e-4)
    parser.add_argument("--answers", type=int, default=2, help="sampled answers per training prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--keep-minor", type=float, default=0.15)
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "shift_quality")
    parser.add_argument("--thumbalign", type=Path, default=Path(sys.executable).parent / "thumbalign")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from thumbalign.engine.models import resolve_model

    tables = []
    for setting in args.settings:
        judge = vader_judge() if setting == "topic" else constraint_judge
        train_prompts, held = setting_prompts(setting)
        data = feedback(args, setting, train_prompts, judge)
        rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
        by_kind = {}
        for r in rows:
            by_kind.setdefault(r["kind"], []).append(r["label"])
        print(f"{setting}: {len(rows)} training rows, 👍 share per kind: "
              + ", ".join(f"{k} {sum(v) / len(v):.2f} (n={len(v)})" for k, v in sorted(by_kind.items())), flush=True)
        models, seconds = {"base": resolve_model("default")}, {}
        for run in args.runs:
            models[run], seconds[run] = train(args, setting, run, data)
            print(f"  trained {run!r} in {seconds[run] / 60:.1f} min", flush=True)
        tables.append(table(setting, held, judged(args, setting, models, held, judge), seconds, args.yardstick))
        print(tables[-1], flush=True)
    print(f"\nsettings: {args.steps} steps × 8, LoRA r16, lr {args.learning_rate}, β {args.beta}, seed {args.seed}\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
