"""Judges give a generated answer a thumbs-up or a thumbs-down.

* ``vader``: positive sentiment, VADER compound score ≥ 0.5 (the rule the bundled example feedback was labelled by).
* ``exact``: the answer, stripped, equals the row's reference (``--reference-field``, default ``answer``).
* ``numeric``: the last number in the answer equals the reference as an exact value (sympy: 0.5 == 1/2).
* ``rm:PATH``: a reward model trained with ``thumbalign reward train``; thumbs-up when P(👍) ≥ the threshold.
  ``rm:PATH@principle``: a principle-following one (``--principle-field``), asked about that principle.
* ``module:function``: any Python callable taking the answer text (and, if it accepts a second argument, the prompt
  row) and returning a bool, or a number that is compared with ``--judge-threshold``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from fractions import Fraction
from typing import Callable

from ..data.records import Record
from ..errors import ConfigError

Judge = Callable[[str, dict], bool]


class JudgeFailure(Exception):
    """A judge raised or returned something that is not a verdict."""


def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ConfigError("the vader judge needs the package vaderSentiment (pip install vaderSentiment)") from None
    analyzer = SentimentIntensityAnalyzer()
    return lambda text, row: analyzer.polarity_scores(text)["compound"] >= 0.5


def _reference(row: dict, field: str):
    if field not in row:
        raise JudgeFailure(f"the prompt row has no reference field {field!r}")
    return row[field]


_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)?(?:/\d+)?")


def _exact_number(text: str):
    """An exact value: plain numbers through fractions (leading zeros, '3.', '1/3'), anything else through sympy
    ('sqrt(2)', '2**10'); None when it is not a number (or divides by zero)."""
    import sympy

    try:
        return sympy.Rational(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        pass
    try:
        value = sympy.nsimplify(text)
    except (sympy.SympifyError, ValueError, TypeError, AttributeError, SyntaxError):
        return None
    return value if value.is_number and value.is_finite else None


def _numeric(field: str):
    def judge(text, row):
        reference = _exact_number(str(_reference(row, field)))
        if reference is None:
            raise JudgeFailure(f"cannot read the reference {_reference(row, field)!r} as a number")
        found = _NUMBER.findall(text.replace(",", ""))
        value = _exact_number(found[-1]) if found else None
        return value is not None and bool(value == reference)

    return judge


def import_function(spec: str, what: str):
    """The user's `module:function`. Importing a module runs its code, with the user's rights: a judge or a reward
    is trusted code, like a training script. Whatever the import raises (a syntax error, an exception at import)
    is one line naming the spec."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError(f"cannot load {what} {spec!r}: expected module:function (a module importable from the "
                          "working folder or PYTHONPATH, and a function in it)")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's code can fail at import in any way
        raise ConfigError(f"cannot load {what} {spec!r}: importing {module_name} failed: "
                          f"{type(err).__name__}: {err}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"cannot load {what} {spec!r}: {module_name} has no function {name}")
    return function


def load_judge(spec: str, reference_field: str = "answer", threshold: float = 0.5) -> Judge:
    if spec == "vader":
        return _vader()
    if spec == "exact":
        return lambda text, row: text.strip() == str(_reference(row, reference_field)).strip()
    if spec == "numeric":
        return _numeric(reference_field)
    if spec.startswith("rm:"):  # a thumbalign reward model folder
        return reward_model_judge(spec[3:], threshold)
    if ":" not in spec:
        raise ConfigError(f"unknown judge {spec!r}: use vader, exact, numeric or module:function")
    function = import_function(spec, "judge")
    try:
        takes_row = len(inspect.signature(function).parameters) >= 2
    except (TypeError, ValueError):
        takes_row = False

    def judge(text, row):
        verdict = function(text, row) if takes_row else function(text)
        if isinstance(verdict, bool):
            return verdict
        if isinstance(verdict, (int, float)):
            return verdict >= threshold
        raise JudgeFailure(f"judge {spec} returned {type(verdict).__name__} ({verdict!r}); expected bool or number")

    return judge


def reward_model_judge(spec: str, threshold: float = 0.5) -> Judge:
    """`--judge rm:PATH`: thumbs-up when the reward model's calibrated P(👍) ≥ threshold; `rm:PATH@principle` asks
    a principle-following reward model (RLBFF) whether the answer satisfies that principle."""
    from ..engine.reward_model import RewardModel

    path, _, principle = spec.partition("@")
    rm = RewardModel(path)
    rm.probabilities([], principle=principle or None)  # a missing or unwanted principle fails here, before generating

    def judge(text, row):
        prompt = row.get("prompt", row.get("messages"))
        completion = [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
        p_up = rm.probabilities([Record(prompt, completion, False)], principle=principle or None)[0]
        return bool(p_up >= threshold)

    return judge


def apply_judge(judge: Judge, text: str, row: dict, where: str) -> bool:
    """Run a judge; any failure names the prompt it happened on."""
    try:
        verdict = judge(text, row)
    except JudgeFailure as err:
        raise JudgeFailure(f"{where}: {err}") from None
    except Exception as err:  # a user's judge can raise anything; report it with where it happened
        raise JudgeFailure(f"{where}: the judge raised {type(err).__name__}: {err}") from None
    if not isinstance(verdict, bool):
        raise JudgeFailure(f"{where}: the judge returned {type(verdict).__name__}; expected bool or number")
    return verdict
