#!/usr/bin/env bash
# The GPU checks, in one go, for a machine with one CUDA GPU (under 8 minutes; installs nothing, reads nothing from
# the network). Run from the repository root after `make install` on that machine (or with a venv that has
# a CUDA torch and this project):
#
#     bash benchmarks/gpu_check.sh [PYTHON]
#
# 1. the tests marked `gpu` (bf16 training, QLoRA gradients, Liger, one process under FSDP2 and ZeRO-3);
# 2. BCO on the bundled feedback with the default model (SmolLM2-135M) in bf16: full fine-tuning, LoRA, and 4-bit
#    QLoRA, 60 steps each, then the held-out implicit-reward accuracy;
# 3. benchmarks/vs_trl.py, when TRL 1.13 is importable (it is not installed from the network here).
# It ends with one table: run, s/step, samples/s, peak GPU memory, held-out accuracy before → after.
set -u
PYTHON=${1:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
STEPS=${GPU_CHECK_STEPS:-60}
mkdir -p "$OUT"

"$PYTHON" - <<'EOF' || { echo "gpu_check: no CUDA GPU visible to $PYTHON"; exit 2; }
import torch
assert torch.cuda.is_available()
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

echo "== tests marked gpu"
"$PYTHON" -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -3
TESTS=${PIPESTATUS[0]}

run() {  # name, extra flags
  local name=$1; shift
  echo "== $name"
  "$PYTHON" -m thumbalign train --data examples/feedback.jsonl --eval-split 0.2 --model default --bf16 true \
    --max-steps "$STEPS" --per-device-train-batch-size 8 --max-length 256 --learning-rate 5e-5 --logging-steps 10 \
    --save-steps 1000 --no-report --output-dir "$OUT/$name" --overwrite "$@" > "$OUT/$name.log" 2>&1
  echo "exit $?" >> "$OUT/$name.log"
  tail -n 2 "$OUT/$name.log"
}
run bf16-full
run bf16-lora --use-lora --learning-rate 1e-4
run qlora-4bit --use-lora --learning-rate 1e-4 --load-in-4bit

echo "== vs_trl"
if "$PYTHON" -c "import trl" 2>/dev/null; then
  "$PYTHON" benchmarks/vs_trl.py --steps 23 --modes full,lora 2>&1 | tail -8
else
  echo "vs_trl: not run (TRL is not installed in $PYTHON, and this script installs nothing)"
fi

"$PYTHON" - "$OUT" "$TESTS" <<'EOF'
import json, sys
from pathlib import Path

out, tests = Path(sys.argv[1]), sys.argv[2]
print(f"\ntests marked gpu: {'passed' if tests == '0' else 'FAILED (exit ' + tests + ')'}")
print(f"{'run':<12} {'s/step':>7} {'samples/s':>9} {'peak GPU GiB':>12} {'held-out acc before → after':>28}")
for name in ("bf16-full", "bf16-lora", "qlora-4bit"):
    run = out / name
    try:
        summary = json.loads((run / "summary.json").read_text())
        lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        print(f"{name:<12} failed: see {out / (name + '.log')}")
        continue
    rates = [l["samples_per_s"] for l in lines if l.get("samples_per_s")]
    rate = sorted(rates)[len(rates) // 2] if rates else float("nan")
    peak = summary.get("peak_gpu_memory_gib") or float("nan")  # this process's, on the main GPU
    before, after = summary.get("eval_before", {}), summary.get("eval_after", {})
    print(f"{name:<12} {8 / rate:>7.3f} {rate:>9.1f} {peak:>12.2f} "
          f"{before.get('accuracy', float('nan')):>13.3f} → {after.get('accuracy', float('nan')):.3f}")
EOF
