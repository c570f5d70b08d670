"""Rewards whose outcome the tests control.

first_char_odd: correct iff the response's first character is an odd digit.
misbehaving: first_char_odd, except on responses that name a failure ('raise', 'hang', 'nan',
'text', 'die'), which it then commits. raise_on_first_call: first_char_odd, except that the
first call in each scoring process raises (an e2e run with one worker fails on exactly one
response). hang_once: first_char_odd, except that the first call of the run's scoring
processes (all children of one parent) hangs past any timeout.
"""

import math
import os
import tempfile
import time
from pathlib import Path

from rollout_sglang.rewards.registry import RewardResult

_calls = {"n": 0}


def first_char_odd(response_text: str, ground_truth: str) -> RewardResult:
    ok = bool(response_text) and response_text[0].isdigit() and int(response_text[0]) % 2 == 1
    return RewardResult(1.0 if ok else -1.0, float(ok))


def misbehaving(response_text: str, ground_truth: str) -> RewardResult:
    if response_text == "raise":
        raise RuntimeError("deliberate failure of the test reward")
    if response_text == "hang":
        time.sleep(3600)
    if response_text == "nan":
        return RewardResult(math.nan, 0.0)
    if response_text == "text":
        return "1.0"
    if response_text == "die":
        os._exit(3)
    return first_char_odd(response_text, ground_truth)


def raise_on_first_call(response_text: str, ground_truth: str) -> RewardResult:
    _calls["n"] += 1
    if _calls["n"] == 1:
        raise RuntimeError("deliberate failure on the first response this process scores")
    return first_char_odd(response_text, ground_truth)


def hang_once(response_text: str, ground_truth: str) -> RewardResult:
    # The hung process is killed and replaced: a marker shared by the parent's children makes
    # the hang happen once per run, not once per process.
    marker = Path(tempfile.gettempdir()) / f"qae_hang_once_{os.getppid()}"
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return first_char_odd(response_text, ground_truth)
    time.sleep(3600)
