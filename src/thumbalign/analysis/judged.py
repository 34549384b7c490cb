"""Generate answers from two models on the same prompts, judge each, and compare with bootstrap intervals.

Every judged answer is appended to a JSONL file as soon as it exists, so an interrupted comparison resumes from
that file without redoing the prompts already done, and a judge that fails leaves the verdicts before it intact.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from ..data.prompts import load_prompts
from ..engine.inference import generate
from ..engine.models import inference_device, load_causal_lm, load_tokenizer
from ..errors import ThumbalignError
from ..files import file_operation
from .judges import JudgeFailure, apply_judge
from .metrics import bootstrap_interval


def _done(path: Path) -> dict[tuple[str, int], dict]:
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                done[(row["model"], row["i"])] = row
    return done


def judged_generations(models: dict[str, Path], prompts_file: str, judge, out_file: Path, *, max_new_tokens: int = 64,
                       temperature: float = 0.0, seed: int = 0, batch_size: int = 8, progress: bool = True,
                       condition: str | None = None, device: str | None = None, use_vllm: bool = False) -> dict:
    """Generate with each model in `models` (name -> folder), judge, append to `out_file`; return the comparison.
    `condition` picks the reward token a reward-token model answers after (default: its template's, 👍). Models run
    in float32 on `device`: by default the GPU where there is one, else the CPU. `use_vllm`: vLLM writes the
    answers, each prompt's with seed `seed` + its index."""
    device = device or inference_device()
    prompts = load_prompts(prompts_file)
    done = _open(out_file)
    for name, folder in models.items():
        todo = [i for i in range(len(prompts)) if (name, i) not in done]
        if not todo:
            continue
        if use_vllm:
            from ..engine.vllm_engine import text_answers

            answers = text_answers(folder, [prompts[i].prompt for i in todo], max_new_tokens, temperature,
                                   [seed + i for i in todo], batch_size, condition)
            _judge_and_append(judge, name, dict(zip(todo, answers)), prompts, out_file, done)
            continue
        tokenizer, model = load_tokenizer(folder), load_causal_lm(folder).to(device).eval()
        model.config.use_cache = True
        for start in tqdm(range(0, len(todo), batch_size), desc=f"generating ({name})", unit="batch",
                          disable=not progress):
            batch = todo[start:start + batch_size]
            answers = generate(model, tokenizer, [prompts[i].prompt for i in batch], max_new_tokens,
                               temperature, seed + batch[0], condition=condition)
            _judge_and_append(judge, name, dict(zip(batch, answers)), prompts, out_file, done)
        del model
    return compare(done, list(models), len(prompts))


def judge_answers(answers: dict[str, list[str]], prompts_file: str, judge, out_file: Path) -> dict:
    """Like :func:`judged_generations` for answers already generated (name -> one answer per prompt, in order):
    by a run whose weights are sharded over several processes, say."""
    prompts = load_prompts(prompts_file)
    done = _open(out_file)
    for name, texts in answers.items():
        todo = {i: text for i, text in enumerate(texts) if (name, i) not in done}
        _judge_and_append(judge, name, todo, prompts, out_file, done)
    return compare(done, list(answers), len(prompts))


def _open(out_file: Path) -> dict[tuple[str, int], dict]:
    """The verdicts `out_file` already holds (its folder created if need be)."""
    with file_operation("create the folder of", out_file):
        out_file.parent.mkdir(parents=True, exist_ok=True)
    return _done(out_file)


def _judge_and_append(judge, name: str, answers: dict[int, str], prompts, out_file: Path, done: dict) -> None:
    """Judge each answer (prompt index -> text) and append its record to `out_file` at once (and to `done`)."""
    with file_operation("append answers to", out_file), open(out_file, "a", encoding="utf-8") as handle:
        for i, answer in answers.items():
            try:
                verdict = apply_judge(judge, answer, prompts[i].row, f"{prompts[i].source} ({name})")
            except JudgeFailure as err:
                raise ThumbalignError(f"judge failed: {err}; {len(_done(out_file))} verdicts kept in "
                                      f"{out_file}, rerun to continue") from None
            record = {"model": name, "i": i, "prompt": prompts[i].prompt, "answer": answer, "verdict": verdict}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            done[(name, i)] = record


def compare(done: dict, names: list[str], n: int, seed: int = 0) -> dict:
    """Thumbs-up rate per model with a bootstrap 95% interval; for two models, the paired difference over prompts
    (first minus second) with its interval and the win/tie/loss counts."""
    import numpy as np

    verdicts = {name: np.array([float(done[(name, i)]["verdict"]) for i in range(n)]) for name in names}
    result = {"prompts": n, "models": {}}
    for name, v in verdicts.items():
        rate, lo, hi = bootstrap_interval(v, seed=seed)
        result["models"][name] = {"thumbs_up_rate": rate, "ci95": [lo, hi]}
    if len(names) == 2:
        a, b = verdicts[names[0]], verdicts[names[1]]
        diff, lo, hi = bootstrap_interval(a - b, seed=seed)
        result["difference"] = {"of": f"{names[0]} - {names[1]}", "mean": diff, "ci95": [lo, hi],
                                "wins": int((a > b).sum()), "ties": int((a == b).sum()), "losses": int((a < b).sum())}
    return result


def format_comparison(result: dict) -> str:
    lines = [f"{'model':<10} {'👍 rate':>8}  95% interval   ({result['prompts']} prompts)"]
    for name, m in result["models"].items():
        lines.append(f"{name:<10} {m['thumbs_up_rate']:>8.3f}  [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]")
    if "difference" in result:
        d = result["difference"]
        lines.append(f"difference ({d['of']}): {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]; "
                     f"wins {d['wins']}, ties {d['ties']}, losses {d['losses']}")
    return "\n".join(lines)
