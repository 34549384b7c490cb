"""Runs TRL 1.13's BCOTrainer for benchmarks/vs_trl.py, inside the separate TRL environment; prints one JSON line.

    python trl_bco_runner.py --model DIR --data FILE --steps N [--lora] --lr LR --max-length L
"""

import argparse
import json
import time

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times, self.logs = [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({"step": state.global_step, **(logs or {})})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from trl.experimental.bco import BCOConfig, BCOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = load_dataset("json", data_files=args.data, split="train").select_columns(["prompt", "completion", "label"])
    config = BCOConfig(output_dir=args.out + ".trl", per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                       learning_rate=args.lr, max_length=args.max_length, logging_steps=1, save_strategy="no",
                       report_to=[], bf16=False, gradient_checkpointing=False, beta=0.1, seed=0,
                       lr_scheduler_type="linear", warmup_steps=0, use_cpu=True, dataloader_num_workers=0)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    callback = StepTimes()
    trainer = BCOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[callback])
    start = time.perf_counter()
    trainer.train()
    tokens = None
    print(json.dumps({"step_end_times": [t - start for t in callback.times], "logs": callback.logs,
                      "tokens": tokens}))


if __name__ == "__main__":
    main()
