"""`thumbalign inspect FILE`: what a user should know about a feedback file before training on it.

The file is streamed row by row: memory holds counters, one 8-byte digest per distinct (prompt, completion) and per
distinct prompt, and a bounded reservoir of prompts per label for the prompt-shift classifier, never the records
themselves.

The recommendations say what `benchmarks/shift_quality.py` measured (README, "Learning the answer, not the
prompt"): --udm added +0.03 to +0.04 judged 👍 rate to the paper's BCO on both shifted settings (intervals touching
0) and nothing to the default BCO with its 👍 anchor;
--method aft added +0.09 where a third of the prompts had both a 👍 and a 👎 answer, and lost 0.05 where 4% did.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.readers import iter_rows
from ..data.records import prompt_as_text, row_to_records
from ..data.tokens import encode_record
from ..methods.udm import embed_texts, prompt_shift_auc

LABEL_NAME = {True: "up", False: "down"}


class _Lengths:
    """Count, mean, min, max and approximate quantiles (from a reservoir) of a stream of lengths."""

    def __init__(self, rng: random.Random, keep: int = 10000):
        self.n, self.total, self.min, self.max, self.sample, self.rng, self.keep = 0, 0, None, None, [], rng, keep

    def add(self, value: int) -> None:
        self.n += 1
        self.total += value
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)
        if len(self.sample) < self.keep:
            self.sample.append(value)
        elif (j := self.rng.randrange(self.n)) < self.keep:
            self.sample[j] = value

    def summary(self) -> dict:
        if not self.n:
            return {}
        q = np.percentile(self.sample, [50, 95]).tolist()
        return {"mean": self.total / self.n, "min": self.min, "median": q[0], "p95": q[1], "max": self.max}


def _digest(*parts) -> int:
    text = json.dumps(parts, ensure_ascii=False, sort_keys=True)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def inspect_file(path: str, tokenizer=None, max_length: int = 1024, encoder: str | None = "minilm",
                 sample_per_class: int = 1024, seed: int = 0, cache_dir: Path | None = None,
                 progress: bool = True) -> dict:
    rng = random.Random(seed)
    rows = 0
    by_label: Counter = Counter()
    prompt_len = {True: _Lengths(rng), False: _Lengths(rng)}
    completion_len = {True: _Lengths(rng), False: _Lengths(rng)}
    truncated = Counter()
    seen: dict[int, int] = {}  # digest -> bit 1 (seen as 👍) | bit 2 (seen as 👎)
    prompt_labels: dict[int, int] = {}  # the same per prompt: does a prompt have both a 👍 and a 👎 answer
    duplicates = 0
    reservoir = {True: [], False: []}
    for where, row in tqdm(iter_rows(path), desc=f"inspecting {Path(path).name}", unit=" rows", disable=not progress):
        rows += 1
        for record in row_to_records(row, path, where):
            label = record.label
            by_label[label] += 1
            key, bit = _digest(record.prompt, record.completion), 1 if label else 2
            if key in seen:
                duplicates += 1
            seen[key] = seen.get(key, 0) | bit
            prompt_key = _digest(record.prompt)
            prompt_labels[prompt_key] = prompt_labels.get(prompt_key, 0) | bit
            if tokenizer is not None:
                p, c = encode_record(tokenizer, record)
                prompt_len[label].add(len(p))
                completion_len[label].add(len(c))
                if len(c) >= max_length:
                    truncated["dropped_completion_too_long"] += 1
                elif len(p) + len(c) > max_length:
                    truncated["prompt_cut"] += 1
            pool, n = reservoir[label], by_label[label]
            if len(pool) < sample_per_class:
                pool.append(prompt_as_text(record.prompt))
            elif (j := rng.randrange(n)) < sample_per_class:
                pool[j] = prompt_as_text(record.prompt)
    conflicts = sum(1 for v in seen.values() if v == 3)
    total = by_label[True] + by_label[False]
    report = {
        "file": str(path), "rows": rows, "records": total,
        "thumbs_up": by_label[True], "thumbs_down": by_label[False],
        "share_up": by_label[True] / total if total else None,
        "duplicates": duplicates, "conflicting_pairs": conflicts,
        "prompts": len(prompt_labels), "prompts_with_both_labels": sum(v == 3 for v in prompt_labels.values()),
    }
    report["method_hint"] = method_hint(report["prompts_with_both_labels"], report["prompts"])
    if tokenizer is not None:
        report["tokens"] = {LABEL_NAME[l]: {"prompt": prompt_len[l].summary(),
                                            "completion": completion_len[l].summary()}
                            for l in (True, False)}
        report["max_length"] = max_length
        report["truncation"] = {"prompt_cut": truncated["prompt_cut"],
                                "dropped_completion_too_long": truncated["dropped_completion_too_long"]}
    if encoder and min(len(reservoir[True]), len(reservoir[False])) >= 2:
        texts = reservoir[True] + reservoir[False]
        labels = np.array([True] * len(reservoir[True]) + [False] * len(reservoir[False]))
        embeddings = embed_texts(texts, encoder, cache_dir=cache_dir, disable_bar=not progress)
        auc = prompt_shift_auc(embeddings, labels, seed=seed)
        report["prompt_shift_auc"] = auc
        report["prompt_shift_sample"] = {"up": len(reservoir[True]), "down": len(reservoir[False])}
        report["recommendation"] = recommend(auc)
        report["route_hint"] = route_hint(auc, report["prompts"], path)
    return report


ROUTE_MIN_AUC = 0.7       # the prompts alone predict the label this well: the shift is large
ROUTE_MIN_PROMPTS = 100   # enough distinct prompts for online steps that do not repeat them many times


def route_hint(auc: float, prompts: int, path) -> str | None:
    """The reward-model route (`online --feedback`) when the shift is large and there are prompts enough to learn
    online from: it compares answers to the same prompt, so the prompt's share of the label cancels."""
    if auc < ROUTE_MIN_AUC or prompts < ROUTE_MIN_PROMPTS:
        return None
    return (f"large prompt shift and {prompts} distinct prompts: try `thumbalign online --feedback {path}` (a reward "
            f"model on the thumbs, then online learning on these prompts against it), {ROUTE_MEASURED}")


ROUTE_MEASURED = ("which compares answers to the same prompt, so what the label owes to the prompt cancels "
                  "(measured on two shifted sets: +0.058 and +0.071 judged 👍 rate over the default bco; "
                  "benchmarks/shift_quality.py)")


def recommend(auc: float) -> str:
    measured = ("measured on shifted feedback: +0.03 to +0.04 judged 👍 rate over the paper's BCO, nothing on top of "
                "the default 👍 anchor; benchmarks/shift_quality.py")
    if auc >= 0.7:
        return (f"prompts of 👍 and 👎 differ strongly (AUC {auc:.2f}): the labels can be learnt from the prompt "
                f"alone; --udm reweights for that ({measured})")
    if auc >= 0.6:
        return f"prompts of 👍 and 👎 differ somewhat (AUC {auc:.2f}): --udm may help ({measured})"
    return f"prompts of 👍 and 👎 look alike (AUC {auc:.2f}): --udm is not needed"


def method_hint(both: int, prompts: int) -> str | None:
    """--method aft learns within a prompt, from prompts with both a 👍 and a 👎 answer: worth a try when there
    are many (it beat bco by +0.09 judged 👍 rate with 117 of 360 such prompts, and lost 0.05 with 5 of 121)."""
    if not prompts or both < 50 or both / prompts < 0.2:
        return None
    return (f"{both} of {prompts} prompts have both a 👍 and a 👎 answer: try --method aft, which ranks the answers "
            "of each prompt (+0.09 judged 👍 rate over bco where a third of the prompts had both)")


def format_report(r: dict) -> str:
    lines = [f"{r['file']}: {r['rows']} rows, {r['records']} records",
             f"  labels: {r['thumbs_up']} 👍, {r['thumbs_down']} 👎 ({r['share_up']:.1%} 👍)" if r["records"] else "",
             f"  duplicates: {r['duplicates']} records repeat an earlier (prompt, completion); "
             f"{r['conflicting_pairs']} (prompt, completion) pairs carry both labels",
             f"  prompts: {r['prompts']} distinct, {r['prompts_with_both_labels']} answered with both a 👍 and a 👎"]
    if "tokens" in r:
        for name, icon in (("up", "👍"), ("down", "👎")):
            t = r["tokens"][name]
            if t["prompt"]:
                lines.append(f"  tokens {icon}: prompt mean {t['prompt']['mean']:.0f} (p95 {t['prompt']['p95']:.0f}, "
                             f"max {t['prompt']['max']}), completion mean {t['completion']['mean']:.0f} "
                             f"(p95 {t['completion']['p95']:.0f}, max {t['completion']['max']})")
        tr = r["truncation"]
        lines.append(f"  at --max-length {r['max_length']}: {tr['prompt_cut']} prompts would be cut from the left, "
                     f"{tr['dropped_completion_too_long']} records dropped (completion alone too long)")
    if "prompt_shift_auc" in r:
        s = r["prompt_shift_sample"]
        lines.append(f"  prompt shift: cross-validated AUC {r['prompt_shift_auc']:.3f} on {s['up']} 👍 and "
                     f"{s['down']} 👎 prompts (0.5 = no shift)")
        lines.append(f"  => {r['recommendation']}")
    if r.get("route_hint"):
        lines.append(f"  => {r['route_hint']}")
    if r.get("method_hint"):
        lines.append(f"  => {r['method_hint']}")
    return "\n".join(l for l in lines if l)
