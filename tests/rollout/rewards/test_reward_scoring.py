"""RewardScorer: rewards run in worker processes; a reward that raises, hangs, returns NaN or a
non-number, or kills its process costs that response the failure score and is reported, and
the batch goes on; a reward module that does not import fails at construction."""

from __future__ import annotations

import logging

import pytest

from rollout_sglang.rewards.scoring import RewardScorer
from rollout_sglang.rewards.registry import RewardResult

FAILURE = -0.5  # not -1, so a failure cannot pass for an ordinary wrong answer


@pytest.fixture(scope="module")
def scorer():
    s = RewardScorer("tests.rewards_for_tests:misbehaving", num_workers=2, timeout_s=5.0, failure_score=FAILURE)
    yield s
    s.close()


@pytest.mark.faults
def test_each_kind_of_failure_gets_the_failure_score_and_the_batch_goes_on(scorer, caplog):
    texts = ["1", "raise", "2", "hang", "3", "nan", "text", "die", "5", "4"]
    labels = [f"prompt {i}" for i in range(len(texts))]
    with caplog.at_level(logging.ERROR, logger="rollout_sglang.rewards.scoring"):
        scored = scorer.score(texts, ["x"] * len(texts), labels)
    bad = {"raise": "raised", "hang": "timed out", "nan": "invalid result", "text": "invalid result",
           "die": "worker died"}
    for text, result in zip(texts, scored.results):
        if text in bad:
            assert result == RewardResult(FAILURE, 0.0, None), text
        else:  # first_char_odd, computed here independently
            odd = int(text) % 2 == 1
            assert result == RewardResult(1.0 if odd else -1.0, float(odd), None), text
    assert [(texts[f.index], f.reason) for f in scored.failures] == list(bad.items())
    assert "deliberate failure of the test reward" in scored.failures[0].detail
    assert "score=nan" in scored.failures[2].detail and "expected a RewardResult" in scored.failures[3].detail
    # The first failure is logged once, with its traceback and the sample's label.
    records = [r for r in caplog.records if "failed on" in r.getMessage()]
    assert len(records) == 1
    assert "prompt 1" in records[0].getMessage() and "Traceback" in records[0].getMessage()
    # Later batches: still counted, never logged again; the replaced workers still score.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="rollout_sglang.rewards.scoring"):
        again = scorer.score(["raise", "7", "8"], ["x"] * 3, ["a", "b", "c"])
    assert [f.index for f in again.failures] == [0]
    assert [r.score for r in again.results] == [FAILURE, 1.0, -1.0]
    assert not [r for r in caplog.records if "failed on" in r.getMessage()]


def test_builtin_rewards_score_the_same_in_workers_as_on_this_thread():
    from rollout_sglang.rewards.math_verify_grader import math_verify

    texts = ["Answer: \\frac12", "Answer: 0.5", "no answer, 1/2", "\\boxed{\\dfrac{1}{2}}"]
    s = RewardScorer("math_verify", num_workers=1, timeout_s=60.0, failure_score=FAILURE)
    try:
        scored = s.score(texts, ["\\frac{1}{2}"] * 4, ["p"] * 4)
    finally:
        s.close()
    assert scored.failures == []
    assert scored.results == [math_verify(t, "\\frac{1}{2}") for t in texts]
    assert [r.score for r in scored.results] == [1.0, 1.0, -1.0, 1.0]


@pytest.mark.parametrize("name,expected", [
    ("tests.reward_module_that_does_not_import:reward",
     r"module 'tests.reward_module_that_does_not_import' does not import: ModuleNotFoundError: "
     r"No module named 'a_dependency_that_is_not_installed'"),
    ("tests.no_such_reward_module:fn", r"module 'tests.no_such_reward_module' does not import"),
    ("tests.rewards_for_tests:no_such_function", r"has no attribute 'no_such_function'"),
    ("nonsense", r"use one of \['arithmetic', 'dapo_math'"),
])
def test_a_reward_that_cannot_be_loaded_fails_at_start_naming_module_and_error(name, expected):
    with pytest.raises(ValueError, match=expected):
        RewardScorer(name, num_workers=1, timeout_s=5.0, failure_score=FAILURE)


def test_reward_config_rejects_a_failure_score_or_timeout_that_cannot_work():
    from rollout_sglang.config import RewardConfig

    with pytest.raises(ValueError, match=r"reward.failure_score=nan: must be a finite number"):
        RewardConfig(failure_score=float("nan"))
    with pytest.raises(ValueError, match=r"reward.timeout_s=0: must be in \(0, "):
        RewardConfig(timeout_s=0)
