"""Rewards: the DAPO rule-based math reward, the overlong penalty, and user reward functions.

What it does: `RewardFn` is the protocol (response text, ground truth) -> RewardResult(score,
accuracy). `dapo_math` checks the answer with math-verify (+1 correct / -1 wrong);
`arithmetic` (the CPU demo's task) checks an integer answer through the same math-verify path.
`apply_overlong_penalty` is DAPO's linear penalty in the last buffer tokens before the max
length. `score_batch` runs a reward over many responses in a process pool, because math-verify
uses signal.alarm, which works only on a main thread. What it does not: decode tokens.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RewardResult:
    """Score of one response."""

    score: float
    """Shaped score the advantage uses (e.g. +1 / -1)."""
    accuracy: float
    """0/1 correctness before shaping."""


class RewardFn(Protocol):
    def __call__(self, response_text: str, ground_truth: str) -> RewardResult: ...


def _verify(answer: str, response: str) -> bool:
    from math_verify import parse, verify

    gold = parse(f"${answer}$")
    pred = parse(response)
    return bool(gold) and bool(pred) and bool(verify(gold, pred))


def _last_boxed_or_answer(text: str) -> str:
    """The part of a response math-verify should read: after the last 'Answer:' if present."""
    idx = text.rfind("Answer:")
    return text[idx + len("Answer:"):] if idx >= 0 else text


def dapo_math(response_text: str, ground_truth: str) -> RewardResult:
    """+1 when math-verify finds the ground truth in the response (\\boxed{} or 'Answer:'), else -1."""
    ok = _verify(ground_truth, _last_boxed_or_answer(response_text))
    return RewardResult(1.0 if ok else -1.0, float(ok))


def arithmetic(response_text: str, ground_truth: str) -> RewardResult:
    """The demo task: the response (up to its end token) must be the integer answer."""
    text = response_text.strip()
    ok = text.lstrip("-").isdigit() and _verify(ground_truth, text)
    return RewardResult(1.0 if ok else -1.0, float(ok))


_BUILTIN = {"dapo_math": dapo_math, "arithmetic": arithmetic}


def load_reward_fn(name: str) -> RewardFn:
    """'dapo_math', 'arithmetic', or 'package.module:function'."""
    if name in _BUILTIN:
        return _BUILTIN[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"reward.name={name!r}: use 'dapo_math', 'arithmetic' or 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward.name={name!r}: cannot import it ({exc}); check the module path") from exc
    if not callable(fn):
        raise ValueError(f"reward.name={name!r} is not callable")
    return fn


def apply_overlong_penalty(score: float, response_tokens: int, max_response_tokens: int,
                           buffer_tokens: int, factor: float) -> float:
    """DAPO: penalty min(-(len - (max - buffer)) / buffer * factor, 0) added to the score."""
    expected = max_response_tokens - buffer_tokens
    exceed = response_tokens - expected
    return score + min(-exceed / buffer_tokens * factor, 0.0)


def _checked(result: RewardResult, index: int) -> RewardResult:
    for name in ("score", "accuracy"):
        value = getattr(result, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"reward function returned {name}={value!r} for response {index}; "
                             "rewards must be finite numbers")
    return result


def _score_one(args: tuple) -> RewardResult:
    fn, text, answer = args
    return fn(text, answer)


def die_with_parent() -> None:
    """Pool initializer: on Linux, end this worker when the process that spawned it dies
    (a killed rollout manager must not leave scoring processes behind)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def make_pool(num_workers: int) -> ProcessPoolExecutor:
    """Scoring processes (spawned: math-verify's signal.alarm needs their main thread)."""
    return ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=die_with_parent)


def score_batch(fn: RewardFn, texts: list[str], answers: list[str], num_workers: int = 0,
                pool: ProcessPoolExecutor | None = None) -> list[RewardResult]:
    """Rewards of many responses: in `pool` / `num_workers` processes, else on this thread."""
    jobs = list(zip([fn] * len(texts), texts, answers))
    if pool is not None:
        results = list(pool.map(_score_one, jobs, chunksize=16))
    elif num_workers > 0:
        with make_pool(num_workers) as tmp:
            results = list(tmp.map(_score_one, jobs, chunksize=16))
    else:
        results = [_score_one(j) for j in jobs]
    return [_checked(r, i) for i, r in enumerate(results)]
