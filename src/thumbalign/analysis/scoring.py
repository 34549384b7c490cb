"""`thumbalign reward score`: P(👍) of every row of a file by a trained reward model."""

from __future__ import annotations

import json
from pathlib import Path

from ..data.records import load_unlabelled
from ..engine.reward_model import RewardModel
from ..files import write_text_atomically


def score_file(model_path: str, data: str, out: str, max_length: int = 512, batch_size: int = 16,
               principle: str | None = None) -> int:
    rm = RewardModel(model_path, max_length, batch_size)
    rows, records = load_unlabelled(data)
    probs = rm.probabilities(records, progress=True, principle=principle)
    text = "".join(json.dumps({**row, "p_up": float(p)}, ensure_ascii=False) + "\n" for row, p in zip(rows, probs))
    write_text_atomically(Path(out), text, "the scores")
    return len(rows)
