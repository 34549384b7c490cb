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
# 3. benchmarks/vs_trl.py, when TRL 1.13 is importable (it is not installed from the network here);
# 4. when vLLM is importable (by $PYTHON, or by VLLM_PYTHON): online GRPO on the arithmetic task of
#    benchmarks/online_verifiable.py with answers from transformers and from vLLM in the training process
#    (--vllm-mode colocate), then from a `thumbalign vllm-serve` server on the same GPU (--vllm-mode server).
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

echo "== vLLM"
VLLM_PYTHON=${VLLM_PYTHON:-$PYTHON}
VLLM_STEPS=${GPU_CHECK_VLLM_STEPS:-20}
if "$VLLM_PYTHON" -c "import vllm" 2>/dev/null; then
  # colocate, beside the transformers path: same settings and seed
  "$VLLM_PYTHON" benchmarks/online_verifiable.py --use-vllm --objectives grpo --no-offline --steps "$VLLM_STEPS" \
    --max-new-tokens 40 --bf16 true --work "$OUT/vllm" 2>&1 | tail -6
  # server: its own process on the same GPU (a third of its memory), the trainer sends it the weights every step
  "$VLLM_PYTHON" -m thumbalign vllm-serve --model default --port 8123 --dtype bfloat16 \
    --gpu-memory-utilization 0.3 > "$OUT/vllm-server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 180); do grep -q " at http://" "$OUT/vllm-server.log" && break; sleep 1; done
  "$VLLM_PYTHON" -m thumbalign online --prompts "$OUT/vllm/train.jsonl" --eval-prompts "$OUT/vllm/held_out.jsonl" \
    --reward numeric --use-lora --learning-rate 2e-4 --max-steps "$VLLM_STEPS" --per-device-train-batch-size 4 \
    --num-generations 8 --max-new-tokens 40 --bf16 true --logging-steps 5 --save-steps 1000 --no-report \
    --use-vllm --vllm-mode server --vllm-server-base-url http://127.0.0.1:8123 --output-dir "$OUT/vllm-server" \
    --overwrite > "$OUT/vllm-server-run.log" 2>&1
  echo "server mode: exit $?"; grep "step $VLLM_STEPS:" "$OUT/vllm-server-run.log" | tail -1
  kill "$SERVER"; wait "$SERVER" 2>/dev/null
else
  echo "vLLM: not run (not importable by $VLLM_PYTHON; pip install 'thumbalign[vllm]' or set VLLM_PYTHON)"
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
