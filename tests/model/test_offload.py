"""Colocated mode's offload of gradient buffers and optimizer state around generation: after
an offload / restore round trip between two optimizer steps, training goes on bit for bit as
without it, and during the window the released storages really hold no bytes (the bytes the
offload reports equal what the buffers and the optimizer held, counted independently); the host
copies live in one arena that every offload reuses (one storage, the same addresses each step)."""

from __future__ import annotations

import pytest
import torch

from testsupport import tiny
from testsupport.jobs import torchrun_jobs

WORKER = tiny.ROOT / "tests" / "dist_workers" / "train_worker.py"


def _mini_steps(tmp_path, nproc: int, flags: list[str]) -> tuple[dict, dict]:
    """Two optimizer steps without and with an offload round trip between them (one launch)."""
    args = [*flags, "--mini-steps", "2", "--max-tokens", "64"]
    torchrun_jobs(WORKER, nproc, [[*args, "--out", str(tmp_path / "plain")],
                                  [*args, "--offload", "--out", str(tmp_path / "offload")]])
    return tuple(torch.load(tmp_path / f"{name}.mt64.pp0.pt", weights_only=False) for name in ("plain", "offload"))


@pytest.mark.parametrize("nproc,flags", [(1, []), (2, ["--bf16", "--dist-opt"])],
                         ids=["fp32", "bf16-distopt-dp2"])
def test_training_after_an_offload_round_trip_is_bit_exact(tmp_path, nproc, flags):
    plain, offloaded = _mini_steps(tmp_path, nproc, flags)
    assert plain["params"].keys() == offloaded["params"].keys()
    for name, want in plain["params"].items():
        assert torch.equal(offloaded["params"][name], want), name
    assert offloaded["params"] != {}  # the steps did move the params (checked below)
    moved = max(float((a - b).abs().max()) for a, b in zip(plain["params"].values(),
                                                           plain["history"][0]["params"].values()))
    assert moved > 0
    trips = [step["offload"] for step in offloaded["history"]]
    # One host arena, reused: every tensor's bytes sit in one storage, the same one at every
    # offload, each tensor at the same address; and what comes back is bit for bit what left.
    assert all(len(t["host_storages"]) == 1 for t in trips), [len(t["host_storages"]) for t in trips]
    assert trips[0]["host_storages"] == trips[1]["host_storages"]
    assert trips[0]["host_ptrs"] == trips[1]["host_ptrs"] and len(trips[0]["host_ptrs"]) > 1
    assert all(t["restored_bit_exact"] for t in trips)
    for step in offloaded["history"]:
        trip = step["offload"]
        window, expected = trip["window"], trip["expected"]
        assert trip["moments"] > 0 and expected["grad"] > 0
        assert window["grad_storage"] == window["moment_storage"] == window["main_storage"] == 0
        assert window["model_storage"] > 0  # the params stay: weight sync reads them
        assert window["grad_bytes"] == expected["grad"]
        assert window["optimizer_bytes"] >= expected["moments"] + expected["mains"]
        if "--bf16" in flags:
            assert trip["mains"] > 0  # fp32 main params are copies here, and go too
