"""thumbalign online (GRPO) vs TRL 1.16's GRPOTrainer on the same work: wall time, peak RSS, held-out pass rate.

    .venv/bin/python benchmarks/vs_trl_grpo.py                          # thumbalign (transformers) and TRL
    .venv/vllm/bin/python benchmarks/vs_trl_grpo.py --use-vllm          # also thumbalign online --use-vllm
    .venv/bin/python benchmarks/vs_trl_grpo.py --steps 1 --held-out-limit 8   # a smoke test

The first run creates benchmarks/.venv-trl-grpo with trl==1.16.*, peft and torch==2.13.0 (the CPU wheel, installed
first so that TRL does not pull a CUDA build); later runs reuse it. Both tools train the default
SmolLM2-135M-Instruct with GRPO on the 360 training prompts of benchmarks/shift_quality.py's "constraints" setting
(30 topics × 2 questions × 6 instruction kinds; 30 steps see 120 of them), rewarded by its rule checker (1 when the
answer follows the instruction): 30 steps × 4 prompts × 8 answers of at most 40 tokens sampled at temperature 1,
LoRA r16 α32 on every linear layer, learning rate 2e-4 decaying linearly without warm-up, β 0 (no reference model),
float32, seed 0. TRL: loss_type "grpo" (its default is "dapo"), transformers generation, gradient checkpointing off
as thumbalign has it for this model (TRL's default is on: --trl-gradient-checkpointing). Each run is a separate
process; wall time and peak RSS (wait4) cover the whole command: loading, training and saving the model. Then
`thumbalign eval` answers the 240 held-out prompts (20 topics never trained on) greedily with each trained model and
with the base, and the same rule checker judges every answer: pass rate with a 95% bootstrap interval, and the
paired difference from the base.
Everything is kept under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from common import run_measured

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TRL_ENV = BENCH / ".venv-trl-grpo"
TRL_SPEC = "trl==1.16.*"


def ensure_trl_env() -> tuple[Path, str]:
    """The TRL environment's python and its TRL version; created on first use."""
    python = TRL_ENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_ENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU wheel first: else TRL pulls a CUDA build
        subprocess.run([*pip, TRL_SPEC, "peft", "torch==2.13.0"], check=True)
    version = subprocess.run([str(python), "-c", "import trl; print(trl.__version__)"], check=True,
                             capture_output=True, text=True).stdout.strip()
    return python, version


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--held-out-limit", type=int, default=None, help="judge only the first N held-out prompts")
    parser.add_argument("--use-vllm", action="store_true", help="also thumbalign online --use-vllm (run this script "
                                                                "with the python of an environment that has vLLM)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's own default")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "vs_trl_grpo")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(BENCH))
    from shift_quality import setting_prompts
    from thumbalign.engine.models import resolve_model

    trl_python, trl_version = ensure_trl_env()
    print(f"TRL {trl_version} in {TRL_ENV}", flush=True)
    model_dir = resolve_model("default")
    train_rows, held_rows = setting_prompts("constraints")
    held_rows = held_rows[:args.held_out_limit]
    print(f"{len(train_rows)} training prompts, {len(held_rows)} held-out prompts", flush=True)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    train_file = write_jsonl(work / "train_prompts.jsonl", train_rows)
    held_file = write_jsonl(work / "held_out_prompts.jsonl", held_rows)

    thumbalign = str(Path(sys.executable).parent / "thumbalign")
    # shift_quality must import in the thumbalign process (--reward module:function), and this checkout's code runs
    env = {"PYTHONPATH": os.pathsep.join([str(BENCH), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    online = [thumbalign, "online", "--prompts", str(train_file), "--reward", "shift_quality:constraint_judge",
              "--objective", "grpo", "--use-lora", "--learning-rate", "2e-4", "--max-steps", str(args.steps),
              "--per-device-train-batch-size", "4", "--num-generations", "8", "--max-new-tokens", "40",
              "--bf16", "false", "--logging-steps", "5", "--save-steps", "1000", "--no-report", "--seed", "0",
              "--overwrite"]
    runs = {"thumbalign": online + ["--output-dir", str(work / "thumbalign")]}
    if args.use_vllm:
        runs["thumbalign-vllm"] = online + ["--output-dir", str(work / "thumbalign-vllm"), "--use-vllm"]
    runs[f"TRL {trl_version}" + (" (gradient checkpointing)" if args.trl_gradient_checkpointing else "")] = [
        str(trl_python), str(BENCH / "trl_grpo_runner.py"), "--model", str(model_dir), "--prompts", str(train_file),
        "--steps", str(args.steps), "--lr", "2e-4", "--out", str(work / "trl"), "--max-new-tokens", "40",
        "--num-generations", "8", "--prompts-per-step", "4", "--seed", "0",
        *(["--gradient-checkpointing"] if args.trl_gradient_checkpointing else [])]

    results = {}
    for name, command in runs.items():
        print(f"training {name}: {shlex.join(command)}", flush=True)
        folder = work / name.split()[0].lower()
        folder.mkdir(parents=True, exist_ok=True)
        wall, rss, stdout = run_measured(command, env=env, log=work / f"{folder.name}.log")
        results[name] = {"wall": wall, "rss": rss, "model": folder / "model"}
        if name.startswith("TRL"):
            results[name]["trl"] = json.loads(stdout.strip().splitlines()[-1])
        print(f"  {wall / 60:.1f} min, peak RSS {rss / 1024:.2f} GiB", flush=True)

    for name, r in results.items():
        out = work / f"eval-{r['model'].parent.name}"
        command = [thumbalign, "eval", "--model", str(r["model"]), "--baseline", "default", "--prompts",
                   str(held_file), "--judge", "shift_quality:constraint_judge", "--max-new-tokens", "40",
                   "--batch-size", "64", "--output-dir", str(out)]
        print(f"judging {name}: {shlex.join(command)}", flush=True)
        (out / "generations.jsonl").unlink(missing_ok=True)  # eval resumes from it: a rerun must answer anew
        with open(work / f"{out.name}.log", "w") as log:
            if subprocess.run(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT).returncode:
                sys.exit(f"failed: {shlex.join(command)}; see {log.name}")
        r["judged"] = json.loads((out / "eval.json").read_text())["judged"]

    def rate(m: dict) -> str:
        return f"{m['thumbs_up_rate']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"

    first = next(iter(results.values()))["judged"]
    lines = [f"\n{args.steps} steps × 4 prompts × 8 answers (≤ 40 tokens), LoRA r16, lr 2e-4, β 0, float32, "
             f"seed 0; {first['prompts']} held-out prompts, greedy answers judged by the rule checker", "",
             "| run | training wall time | peak RSS (GiB) | held-out pass rate [95% CI] | vs base (paired) |",
             "| --- | --- | --- | --- | --- |",
             f"| base model | | | {rate(first['models']['baseline'])} | |"]
    for name, r in results.items():
        d = r["judged"]["difference"]
        lines.append(f"| {name} | {r['wall'] / 60:.1f} min | {r['rss'] / 1024:.2f} | "
                     f"{rate(r['judged']['models']['model'])} | {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, "
                     f"{d['ci95'][1]:+.3f}] |")
    for name, r in results.items():
        if "trl" in r:
            reward = r["trl"]["last_reward"]
            print(f"{name}: trainer.train() {r['trl']['train_seconds'] / 60:.1f} min, last logged reward "
                  f"{'n/a' if reward is None else format(reward, '.3f')}")
    lines += ["", f"machine: {cpu_model()}",
              f"command: {shlex.join([sys.executable, *sys.argv])}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
