"""`thumbalign best-of-n`: sample N answers per prompt, keep the one the reward model prefers, as a 👍 row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.prompts import load_prompts
from ..data.records import Record
from ..engine.inference import generate
from ..engine.models import inference_device, load_causal_lm, load_tokenizer, resolve_model
from ..engine.reward_model import RewardModel
from ..files import write_atomically


def best_of_n(policy: str, rm_path: str, prompts_file: str, out: str, n: int = 4, max_new_tokens: int = 64,
              temperature: float = 1.0, seed: int = 0, batch_size: int = 8, use_vllm: bool = False) -> int:
    """Returns the number of rows written (prompts whose every answer came out empty are skipped). `rm_path` may
    end with @principle for a principle-following reward model: the answer that best satisfies it is kept.
    `use_vllm`: vLLM writes every answer first (answer k of prompt i with seed `seed` + i·n + k)."""
    rm_path, _, principle = rm_path.partition("@")
    rm = RewardModel(rm_path)
    rm.probabilities([], principle=principle or None)  # a missing or unwanted principle fails before generating
    model_dir = resolve_model(policy)
    rows = load_prompts(prompts_file)
    written, ready = 0, None
    if use_vllm:
        from ..engine.vllm_engine import text_answers

        flat = text_answers(model_dir, [row.prompt for row in rows for _ in range(n)], max_new_tokens, temperature,
                            [seed + i for i in range(len(rows) * n)], max(batch_size, n))
        ready = [flat[i * n:(i + 1) * n] for i in range(len(rows))]
    else:
        tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir).to(inference_device()).eval()
        model.config.use_cache = True

    def write(tmp):
        nonlocal written
        with open(tmp, "w", encoding="utf-8") as handle:
            for index, row in enumerate(tqdm(rows, desc="best-of-n", unit="prompt")):
                answers = list(ready[index]) if ready is not None else []
                # the prompt once, its k answers from one forward each step
                for start in range(0, n, batch_size) if ready is None else ():
                    k = min(batch_size, n - start)
                    answers += generate(model, tokenizer, [row.prompt], max_new_tokens, temperature,
                                        seed + written * n + start, num_return_sequences=k)
                candidates = [a for a in answers if a.strip()]
                if not candidates:
                    continue
                records = [Record(row.prompt, [{"role": "assistant", "content": a}] if isinstance(row.prompt, list)
                                  else a, True) for a in candidates]
                probs = rm.probabilities(records, principle=principle or None)
                best = int(np.argmax(probs))
                handle.write(json.dumps({"prompt": row.prompt, "completion": records[best].completion, "label": True,
                                         "p_up": float(probs[best]), "n": len(candidates)}, ensure_ascii=False) + "\n")
                written += 1
    write_atomically(Path(out), write, "the best answers")
    return written
