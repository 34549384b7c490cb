"""Runs TRL's GRPOTrainer for benchmarks/vs_trl_grpo.py, inside the separate TRL environment; prints one JSON line.

    python trl_grpo_runner.py --model DIR --prompts FILE --out DIR [--steps 30] [--lr 2e-4] [--max-new-tokens 40]
                              [--num-generations 8] [--prompts-per-step 4] [--seed 0] [--gradient-checkpointing]

LoRA r16 (all linear layers), float32 on the CPU, transformers generation, loss_type "grpo", β 0. The reward is
the rule checker of benchmarks/shift_quality.py (1.0 when the answer follows the prompt's instruction). The merged
model is saved as a plain transformers folder in OUT/model.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shift_quality import constraint_judge  # noqa: E402  (stdlib and torch only: both in this environment)


def constraint_reward(completions, kind, **kwargs):
    """TRL's reward signature: one float per completion; completions are conversations, [{role, content}]."""
    return [1.0 if constraint_judge(c[0]["content"], {"kind": k}) else 0.0 for c, k in zip(completions, kind)]


class Logs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({"step": state.global_step, **(logs or {})})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's own default (off here, as "
                                                                               "thumbalign for a 135M model)")
    args = parser.parse_args()
    out = Path(args.out)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = load_dataset("json", data_files=args.prompts, split="train").select_columns(["prompt", "kind"])
    config = GRPOConfig(
        output_dir=str(out / "trl"), max_steps=args.steps, learning_rate=args.lr, seed=args.seed,
        # TRL counts completions: prompts per step × answers per prompt
        per_device_train_batch_size=args.prompts_per_step * args.num_generations, gradient_accumulation_steps=1,
        num_generations=args.num_generations, max_completion_length=args.max_new_tokens, temperature=1.0,
        beta=0.0, loss_type="grpo", lr_scheduler_type="linear", warmup_steps=0, bf16=False, use_cpu=True,
        gradient_checkpointing=args.gradient_checkpointing, logging_steps=5, save_strategy="no", report_to=[],
        use_vllm=False, dataloader_num_workers=0)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    logs = Logs()
    trainer = GRPOTrainer(model=model, reward_funcs=constraint_reward, args=config, train_dataset=data,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[logs])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    rewards = [log["reward"] for log in logs.logs if "reward" in log]
    print(json.dumps({"train_seconds": seconds, "last_reward": rewards[-1] if rewards else None, "logs": logs.logs}))


if __name__ == "__main__":
    main()
