"""Process-group rules of the GPU run, checked on CPU.

The accelerator backend is replaced by a CUDA-only stand-in (gloo registered for the `cuda`
device type only, as NCCL is), so a CPU tensor handed to a group without a CPU backend
raises here exactly as on an H100. And rank 0's rollout may outlast the collective timeout:
the other ranks wait on the hand-off group, not in a collective of the default group.
"""

from __future__ import annotations

import json

import pytest

from megatron_qae.model.parallel import process_group_backend
from testsupport import tiny

WORKER = tiny.ROOT / "tests" / "dist_workers" / "collectives_worker.py"


def _results(out: str, n: int = 2) -> list[dict]:
    return [json.loads(open(f"{out}.rank{r}.json").read()) for r in range(n)]


def test_backend_rule():
    assert process_group_backend(None) == "gloo"
    assert process_group_backend("nccl") == "cpu:gloo,cuda:nccl"


@pytest.mark.parametrize("pp", [1, 2])
def test_loop_collectives_run_under_the_gpu_group_rules(tmp_path, pp):
    out = str(tmp_path / "groups")
    tiny.torchrun(WORKER, 2, ["--mode", "groups", "--pp", str(pp), "--out", out])
    ranks = _results(out)
    assert all(r["backend"] == "cpu:gloo,cuda:cudaonlygloo" for r in ranks)
    assert ranks[0]["adv"] == ranks[1]["adv"] and any(a != 0.0 for a in ranks[0]["adv"])
    assert all(r["same_micro_batches"] for r in ranks)  # the lean hand-off changes no input bit
    assert ranks[0]["loss"] == ranks[1]["loss"] and ranks[0]["loss"] != 0.0


def test_rollout_longer_than_the_collective_timeout_is_waited_for(tmp_path):
    out = str(tmp_path / "wait")
    tiny.torchrun(WORKER, 2, ["--mode", "wait", "--timeout-s", "5", "--rollout-s", "15", "--out", out])
    for r in _results(out):
        assert r["received"] == 1000 and r["waited_s"] >= 15.0


def test_the_same_wait_in_a_default_group_collective_times_out(tmp_path):
    # The control: what the loop did before (broadcast_object_list on the default group).
    with pytest.raises(AssertionError, match="Timed out waiting 5000ms"):
        tiny.torchrun(WORKER, 2, ["--mode", "wait", "--control", "--timeout-s", "5", "--rollout-s", "15",
                                  "--out", str(tmp_path / "control")])
