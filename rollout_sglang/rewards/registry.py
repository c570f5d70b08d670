"""Reward functions: the result type, the built-in graders by name, user functions, and DAPO's
overlong penalty.

What it does: `RewardFn` is the protocol (decoded response, ground truth) -> RewardResult.
`load_reward_fn` resolves `reward.name`: a built-in ('dapo_math', the recipes' default and
verl's DAPO grading; 'dapo_math_strict_box'; 'math_verify'; 'arithmetic', the tests' single-digit task; 'exact_match', the CPU
demo's padded sums)
or 'package.module:function'. Built-ins are imported only when named, so the demo never loads
math-verify. `check_result` says why a returned value is not a usable reward.
`apply_overlong_penalty` is DAPO's linear penalty in the last buffer tokens before the max
length. What it does not: run rewards over a batch, time them out or count failures
(reward_scoring does), or decode tokens.
"""

from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RewardResult:
    """Score of one response."""

    score: float
    """Shaped score the advantage uses (e.g. +1 / -1)."""
    accuracy: float
    """0/1 correctness before shaping."""
    pred: str | None = None
    """The answer the grader read from the response, for logs; None when it does not say."""


class RewardFn(Protocol):
    def __call__(self, response_text: str, ground_truth: str) -> RewardResult: ...


def arithmetic(response_text: str, ground_truth: str) -> RewardResult:
    """The demo task: the response (up to its end token) must be the integer answer.

    An exact integer comparison: the demo's answers are integers, so a general math grader
    would only cost start-up time and per-response parsing.
    """
    text = response_text.strip()
    digits = text[1:] if text.startswith("-") else text
    ok = digits.isascii() and digits.isdigit() and int(text) == int(ground_truth)
    return RewardResult(1.0 if ok else -1.0, float(ok), text)


def exact_match(response_text: str, ground_truth: str) -> RewardResult:
    """The demo's padded sums: the response (up to its end token, outer spaces aside) must be
    the ground truth, character for character ("07" is right for "07", "7" is not)."""
    text = response_text.strip()
    ok = text == ground_truth.strip()
    return RewardResult(1.0 if ok else -1.0, float(ok), text)


BUILTIN_REWARDS = {
    "dapo_math": "rollout_sglang.rewards.dapo:dapo_math",
    "dapo_math_strict_box": "rollout_sglang.rewards.dapo:dapo_math_strict_box",
    "math_verify": "rollout_sglang.rewards.math_verify_grader:math_verify",
    "arithmetic": "rollout_sglang.rewards.registry:arithmetic",
    "exact_match": "rollout_sglang.rewards.registry:exact_match",
}
"""reward.name of each built-in grader -> where it lives (imported only when named)."""


def load_reward_fn(name: str) -> RewardFn:
    """A built-in name or 'package.module:function'; ValueError naming the module and the
    import error when it cannot be loaded."""
    target = BUILTIN_REWARDS.get(name, name)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward.name={name!r}: use one of {sorted(BUILTIN_REWARDS)} or "
                         "'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a user module may fail at import with any error
        raise ValueError(f"reward.name={name!r}: module {module_name!r} does not import: "
                         f"{type(exc).__name__}: {exc}; fix the module or PYTHONPATH") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward.name={name!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward.name={name!r}: {target} is a {type(fn).__name__}, not a function")
    return fn


def check_result(result: object) -> str | None:
    """Why `result` is not a usable reward (not a RewardResult, or a score / accuracy that is
    not a finite number), None when it is."""
    if not isinstance(result, RewardResult):
        return f"returned {result!r} ({type(result).__name__}), expected a RewardResult"
    for field in ("score", "accuracy"):
        value = getattr(result, field)
        # numbers.Real: Python and numpy scalars (bools included, as verl's acc flag is one).
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            return f"returned {field}={value!r}; rewards must be finite numbers"
    return None


def apply_overlong_penalty(score: float, response_tokens: int, max_response_tokens: int,
                           buffer_tokens: int, factor: float) -> float:
    """DAPO: penalty min(-(len - (max - buffer)) / buffer * factor, 0) added to the score."""
    expected = max_response_tokens - buffer_tokens
    exceed = response_tokens - expected
    return score + min(-exceed / buffer_tokens * factor, 0.0)
