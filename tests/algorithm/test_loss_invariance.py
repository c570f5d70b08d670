"""Each loss variant gives the same gradient over 1 / 2 / 4+ micro-batches, DP=2 (with
zero-advantage skipping where it is exact) and TP=2, on a tiny Qwen2 through megatron; the
frozen reference holds the run's initial weights (HF directory or the policy's init)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_qae.algorithm.objective import needs_selection
from testsupport import tiny
from testsupport.jobs import torchrun_jobs
from tests.dist_workers.loss_worker import VARIANTS

WORKER = tiny.ROOT / "tests" / "dist_workers" / "loss_worker.py"
BUDGETS = [1000, 96, 48]


def _load(prefix: str, name: str, budget: int) -> dict:
    return torch.load(f"{prefix}.{name}.mt{budget}.pt", weights_only=False)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The single-rank base, then the 2-rank layouts and the HF-directory reference in one
    launch (testsupport/jobs.py)."""
    out = tmp_path_factory.mktemp("losses")
    tiny.torchrun(WORKER, 1, ["--max-tokens", *map(str, BUDGETS), "--out", str(out / "base")])
    hf_dir = out / "hf"
    tiny.tiny_hf_model(tiny.tiny_hf_config(), seed=5).save_pretrained(hf_dir)
    torchrun_jobs(WORKER, 2, [
        ["--skip-zero", "--max-tokens", str(BUDGETS[1]), "--out", str(out / "dp2_skip")],
        ["--tp", "2", "--max-tokens", str(BUDGETS[1]), "--out", str(out / "tp2")],
        ["--tp", "2", "--hf-dir", str(hf_dir), "--out", str(out / "ref")]])
    return out


@pytest.fixture(scope="module")
def base(runs) -> str:
    return str(runs / "base")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_micro_batch_count_does_not_change_the_gradient(base, name):
    runs = [_load(base, name, b) for b in BUDGETS]
    counts = [r["micro_batches"] for r in runs]
    assert counts[0] == 1 and counts[1] >= 2 and counts[2] >= 4, counts
    assert runs[0]["reference_equals_initial_policy"]
    for other in runs[1:]:
        assert _max_diff(runs[0]["grads"], other["grads"]) < 1e-6
        assert abs(runs[0]["metrics"]["loss/loss"] - other["metrics"]["loss/loss"]) < 1e-7
    m = runs[0]["metrics"]
    assert all(math.isfinite(v) for v in m.values())
    if needs_selection(VARIANTS[name]):
        assert m["loss/cov_selected_frac"] > 0
    if VARIANTS[name].kl_coef > 0:
        assert m["loss/kl_ref"] > 0


@pytest.mark.parametrize("layout", ["dp2_skip", "tp2"])
def test_layout_reproduces_the_single_rank_gradient(runs, base, layout):
    out = str(runs / layout)
    for name, cfg in VARIANTS.items():
        ours, ref = _load(out, name, BUDGETS[1]), _load(base, name, BUDGETS[0])
        assert _max_diff(ours["grads"], ref["grads"]) < 1e-6, name
        assert abs(ours["metrics"]["loss/loss"] - ref["metrics"]["loss/loss"]) < 1e-6, name
        skipped = ours["batch"]["batch/skipped_samples_frac"]
        # Skipping happens exactly where it is exact: DAPO/GSPO without KL / entropy terms.
        exact = layout == "dp2_skip" and name == "gspo"
        assert (skipped > 0) == exact, (name, skipped)


def test_reference_from_an_hf_directory_is_the_loaded_policy(runs):
    res = torch.load(runs / "ref.hf.pt", weights_only=False)
    for before, ref, after in zip(res["before"], res["ref"], res["after"]):
        assert torch.equal(ref, after)  # the reference is what the policy becomes when it loads the HF weights
        assert (ref - before).abs().max() > 1e-3  # and not the policy's own init it was copied from
    assert not res["ref_grads"]
