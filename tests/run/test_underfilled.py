"""Dynamic sampling that does not throw a run away: when the generation batches run out before
the batch is full, the loop trains on the groups kept (and says so), or stops when asked to."""

from __future__ import annotations

import pytest

from megatron_qae.persistence.metrics import read_metrics
from testsupport import tiny

# At most 4 groups can be kept per step (one generation batch of 4 prompts) for a batch of 8:
# every step is underfilled, whatever the policy samples.
UNDERFILLED = ["rollout.prompts_per_step=8", "rollout.gen_batch_prompts=4", "rollout.max_gen_batches=1",
               "rollout.mini_batch_prompts=2", "run.num_rollout_steps=2", "run.log_tensorboard=false"]


def test_an_underfilled_batch_is_trained_on_and_reported(tmp_path):
    run_dir = tmp_path / "run"
    proc = tiny.train_run(run_dir, 1, UNDERFILLED)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rollout/underfilled"] == 1.0
        assert 0 <= r["rollout/groups"] <= 4  # a step that kept nothing makes no update
        # One optimizer step per mini-batch of the groups actually kept (2 prompts each).
        assert r["train/optimizer_steps"] == -(-r["rollout/groups"] // 2)
        assert r["sync/engine_version_min"] == r["step"]
    assert "step 1: dynamic sampling kept" in proc.stderr and "rollout.on_underfilled=train" in proc.stderr


def test_strict_mode_stops_naming_the_option(tmp_path):
    with pytest.raises(AssertionError) as err:
        tiny.train_run(tmp_path / "run", 1, [*UNDERFILLED, "rollout.on_underfilled=fail"])
    assert "rollout.on_underfilled=fail" in str(err.value) and "of rollout.prompts_per_step=8" in str(err.value)
