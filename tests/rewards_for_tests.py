"""A reward whose outcome the tests control: correct iff the response's first character is odd."""

from rollout_sglang.rewards import RewardResult


def first_char_odd(response_text: str, ground_truth: str) -> RewardResult:
    ok = bool(response_text) and response_text[0].isdigit() and int(response_text[0]) % 2 == 1
    return RewardResult(1.0 if ok else -1.0, float(ok))
