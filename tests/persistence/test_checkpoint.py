"""Checkpoints: layout changes on load, a crash mid-save leaves the previous one loadable, the
lighter optimizer format builds no host copies and refuses a tp / pp it cannot load into."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_qae.persistence.checkpoint import latest_checkpoint
from testsupport import tiny
from testsupport.jobs import torchrun_jobs

WORKER = tiny.ROOT / "tests" / "dist_workers" / "ckpt_worker.py"


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def resharded(tmp_path_factory) -> Path:
    """Saved at tp=2 and at dp=2 with the distributed optimizer (one 2-rank launch), each loaded
    on one rank (one 1-rank launch)."""
    out = tmp_path_factory.mktemp("reshard")
    torchrun_jobs(WORKER, 2, [["--mode", "save", "--tp", "2", "--run-dir", str(out / "tp2")],
                              ["--mode", "save", "--dist-opt", "--run-dir", str(out / "dp2")]])
    torchrun_jobs(WORKER, 1, [["--mode", "load", "--run-dir", str(out / "tp2")],
                              ["--mode", "load", "--dist-opt", "--run-dir", str(out / "dp2")]])
    return out


def test_save_tp2_dist_opt_load_tp1_continues_identically(resharded):
    run = resharded / "tp2"
    saved, loaded = torch.load(run / "saved.pp0.pt"), torch.load(run / "loaded.pp0.pt", weights_only=False)
    assert _max_diff(saved["params"], loaded["params"]) == 0.0
    assert loaded["state"] == {"step": 1, "cursor": [3, 4]}
    # The optimizer state came back too: the loss after one more update matches the original.
    assert abs(saved["loss2"] - loaded["loss2"]) < 1e-6
    assert abs(saved["loss3"] - loaded["loss3"]) < 1e-6


def test_dp2_distributed_optimizer_reshards_to_dp1(resharded):
    run = resharded / "dp2"
    saved, loaded = torch.load(run / "saved.pp0.pt"), torch.load(run / "loaded.pp0.pt", weights_only=False)
    assert _max_diff(saved["params"], loaded["params"]) == 0.0
    assert abs(saved["loss2"] - loaded["loss2"]) < 1e-6
    assert abs(saved["loss3"] - loaded["loss3"]) < 1e-6


@pytest.mark.faults
def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(AssertionError):  # the worker kills itself mid-save
        tiny.torchrun(WORKER, 1, ["--mode", "save", "--kill-during-save", "--run-dir", str(run)])
    assert list((run / "checkpoints").glob("tmp.step_2.*")), "the interrupted save left its temp dir"
    assert latest_checkpoint(run).name == "step_1"
    tiny.torchrun(WORKER, 1, ["--mode", "load", "--run-dir", str(run)])
    loaded = torch.load(run / "loaded.pp0.pt", weights_only=False)
    assert loaded["path"].endswith("step_1") and loaded["state"]["step"] == 1
    saved = torch.load(run / "saved.pp0.pt")
    assert _max_diff(saved["params"], loaded["params"]) == 0.0


def test_dp_reshardable_save_builds_no_host_copy_and_refuses_another_tp(tmp_path):
    # fully_reshardable gathers every rank's whole TP-PP shard of fp32 params and both Adam
    # moments into host tensors (megatron-core distrib_optimizer.py:1315-1321, 1729-1738):
    # 3 x 4 bytes per local parameter more than dp_reshardable, which writes the shards as they are.
    run = tmp_path / "run"
    tiny.torchrun(WORKER, 2, ["--mode", "save", "--tp", "2", "--dist-opt", "--compare-save-formats",
                              "--run-dir", str(run)])
    saved = torch.load(run / "saved.pp0.pt")
    peaks, n = saved["save_peaks"], saved["local_params"]
    assert peaks["fully_reshardable"] - peaks["dp_reshardable"] >= 0.9 * 12 * n, (peaks, n)
    marker = json.loads((run / "checkpoints" / "step_1" / "complete.json").read_text())
    assert marker["optimizer_format"] == "dp_reshardable" and marker["layout"]["tp"] == 2
    with pytest.raises(AssertionError, match="loads only under the same tp / pp / vpp.*fully_reshardable"):
        tiny.torchrun(WORKER, 1, ["--mode", "load", "--dist-opt", "--run-dir", str(run)])
