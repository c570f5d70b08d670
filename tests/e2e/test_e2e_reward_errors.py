"""End to end: a user reward that raises on one response (the first one its scoring process
sees) does not stop the run; the response gets reward.failure_score and the step's
`reward/errors` counts it (torchrun + local Ray + CPU engine, configs/test_tiny.yaml)."""

from __future__ import annotations

import pytest

from megatron_qae.persistence.metrics import read_metrics
from testsupport import tiny

pytestmark = pytest.mark.faults


def test_a_reward_that_raises_on_one_response_is_counted_and_the_run_finishes(tmp_path):
    run_dir = tmp_path / "run"
    tiny.train_run(run_dir, 1, ["reward.name=tests.rewards_for_tests:raise_on_first_call", "reward.num_workers=1",
                        "run.num_rollout_steps=2", "run.eval_interval_steps=2", "run.log_tensorboard=false"])
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    # One scoring process, which raises on its first call only: exactly one failure, in step 1.
    assert [r["reward/errors"] for r in rows] == [1.0, 0.0]
    assert rows[-1]["eval/reward_errors"] == 0.0
    assert all(r["train/optimizer_steps"] >= 1 for r in rows)


def test_a_reward_module_that_does_not_import_stops_the_run_at_start_naming_it(tmp_path):
    try:
        tiny.train_run(tmp_path / "run", 1, ["reward.name=tests.reward_module_that_does_not_import:reward"], timeout_s=300)
    except AssertionError as exc:
        out = str(exc)
    else:
        raise AssertionError("the run started with a reward module that does not import")
    assert ("ValueError: reward.name='tests.reward_module_that_does_not_import:reward': module "
            "'tests.reward_module_that_does_not_import' does not import: ModuleNotFoundError: "
            "No module named 'a_dependency_that_is_not_installed'") in out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
