"""Rewards for online training: what every sampled answer is worth, and whether it counts as 👍.

A reward is one of
  * a judge (``vader``, ``exact``, ``numeric``, or ``module:function`` taking the answer text and optionally the
    prompt row): 1.0 for 👍, 0.0 for 👎 (a judge returning a number gives that number);
  * ``rm:PATH``: a thumbalign reward model's calibrated P(👍) (RLUF's P[Love] reward);
  * ``module:function`` with TRL's reward-function signature ``f(prompts, completions, **columns)`` returning one
    float (or None) per answer, so that reward functions written for TRL plug in unchanged: ``completions`` are
    strings for text prompts and ``[{"role": "assistant", "content": ...}]`` for conversations, and every other
    column of the prompts file comes as a keyword argument holding one value per answer.

The total is the weighted sum; an answer for which any reward says None is left out. The *binary outcome* (👍 when
the total reaches ``pass_threshold``) decides pass rates, filtering and the NFT/RFT labels.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError, ThumbalignError
from .judges import Judge, JudgeFailure, import_function, load_judge

BUILTIN = ("vader", "exact", "numeric")


class RewardFailure(ThumbalignError):
    """A reward function raised, or returned something that is not a reward; names the prompt."""


@dataclass
class Answer:
    """One sampled answer to score."""

    prompt: str | list            # as in the prompts file
    text: str                     # the answer
    row: dict                     # the prompt's row (every column)
    token_ids: list[int]          # the answer's tokens
    source: str                   # "file, line N" of the prompt


def _batch_signature(function) -> tuple[bool, set[str] | None]:
    """(is it a TRL batch reward function, the keyword names it takes — None for **kwargs)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False, set()
    if not {"prompts", "completions"} <= set(parameters):
        return False, set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return True, None
    return True, set(parameters)


class Reward:
    """One reward function over a batch of answers; values are floats or None (left out)."""

    def __init__(self, spec: str, reference_field: str = "answer", threshold: float = 0.5):
        self.spec = spec
        self.batch_function: Callable | None = None
        self.judge: Judge | None = None
        self.reward_model = None
        if spec.startswith("rm:"):
            from ..engine.reward_model import RewardModel

            self.reward_model = RewardModel(spec[3:])
        elif spec in BUILTIN or ":" not in spec:
            self.judge = load_judge(spec, reference_field, threshold)
        else:
            function = import_function(spec, "reward")
            is_batch, self.accepts = _batch_signature(function)
            if is_batch:
                self.batch_function = function
            else:
                self.judge = load_judge(spec, reference_field, threshold)

    def __call__(self, answers: list[Answer]) -> list[float | None]:
        if self.reward_model is not None:
            return self._reward_model(answers)
        if self.batch_function is not None:
            return self._batch(answers)
        values = []
        for a in answers:
            try:
                verdict = self.judge(a.text, a.row)
            except JudgeFailure as err:
                raise RewardFailure(f"{a.source}: reward {self.spec}: {err}") from None
            except Exception as err:  # a user's judge can raise anything: name the prompt it failed on
                raise RewardFailure(f"{a.source}: reward {self.spec} raised {type(err).__name__}: {err}") from None
            values.append(float(verdict))
        return values

    def _reward_model(self, answers: list[Answer]) -> list[float]:
        from ..data.records import Record

        records = [Record(a.prompt, [{"role": "assistant", "content": a.text}] if isinstance(a.prompt, list)
                          else a.text, False, a.source) for a in answers]
        return [float(p) for p in self.reward_model.probabilities(records)]

    def _batch(self, answers: list[Answer]) -> list[float | None]:
        columns = sorted({k for a in answers for k in a.row} - {"prompt", "messages"})
        kwargs = {k: [a.row.get(k) for a in answers] for k in columns}
        kwargs["completion_ids"] = [a.token_ids for a in answers]
        if self.accepts is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepts}
        completions = [[{"role": "assistant", "content": a.text}] if isinstance(a.prompt, list) else a.text
                       for a in answers]
        where = answers[0].source if len({a.source for a in answers}) == 1 else f"{answers[0].source} (and others)"
        try:
            values = self.batch_function(prompts=[a.prompt for a in answers], completions=completions, **kwargs)
        except Exception as err:
            raise RewardFailure(f"{where}: reward {self.spec} raised {type(err).__name__}: {err}") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(answers):
            raise RewardFailure(f"{where}: reward {self.spec} returned {type(values).__name__} of length "
                                f"{len(values) if hasattr(values, '__len__') else '?'}; expected {len(answers)} values")
        out = []
        for v in values:
            if v is not None and not isinstance(v, (int, float)):
                raise RewardFailure(f"{where}: reward {self.spec} returned {type(v).__name__} ({v!r}); "
                                    "expected a number or None")
            out.append(None if v is None else float(v))
        return out




class RewardSet:
    """Several rewards, weighted; the total and the binary outcome of each answer."""

    def __init__(self, specs: list[str], weights: list[float] | None, reference_field: str = "answer",
                 pass_threshold: float = 0.5):
        if not specs:
            raise ConfigError("no reward: pass --reward (a judge, rm:PATH or module:function), once per reward")
        if weights is not None and len(weights) != len(specs):
            raise ConfigError(f"--reward-weights has {len(weights)} values for {len(specs)} rewards")
        self.rewards = [Reward(s, reference_field, pass_threshold) for s in specs]
        self.weights = list(weights) if weights is not None else [1.0] * len(specs)
        self.pass_threshold = pass_threshold

    def score(self, answers: list[Answer]) -> list[float | None]:
        """The weighted total of each answer, None when any reward left it out."""
        return self.score_parts(answers)[0]

    @property
    def reward_model(self):
        """The first rm:PATH reward's model, or None: the reward whose over-optimisation online training watches."""
        return next((r.reward_model for r in self.rewards if r.reward_model is not None), None)

    def score_parts(self, answers: list[Answer]) -> tuple[list[float | None], list[float | None]]:
        """(the weighted totals, the first reward model's own values — None without one)."""
        per_reward = [reward(answers) for reward in self.rewards]
        first_rm = next((values for reward, values in zip(self.rewards, per_reward) if reward.reward_model), None)
        totals = []
        for values in zip(*per_reward):
            totals.append(None if any(v is None for v in values)
                          else sum(w * v for w, v in zip(self.weights, values)))
        return totals, first_rm if first_rm is not None else [None] * len(answers)

    def passed(self, total: float) -> bool:
        return total >= self.pass_threshold

    def judge(self, text: str, row: dict) -> bool:
        """The binary outcome of one answer to a prompt row, as a judge (text, row) -> bool: 👎 when left out."""
        prompt = row.get("prompt", row.get("messages"))
        total = self.score([Answer(prompt, text, row, [], "")])[0]
        return total is not None and self.passed(total)
