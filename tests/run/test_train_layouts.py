"""The RL train step under TP / PP / DP / distributed optimizer / micro-batching equals TP=1,
and TP=1 equals an independent transformers computation of the same loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_qae.model import qwen2_mapping as qm
from testsupport import tiny
from testsupport.jobs import torchrun_jobs

WORKER = tiny.ROOT / "tests" / "dist_workers" / "train_worker.py"


def _load(prefix: str, budget: int, pp: int = 1) -> dict:
    merged: dict = {"grads": {}, "params": {}}
    for stage in range(pp):
        part = torch.load(f"{prefix}.mt{budget}.pp{stage}.pt", weights_only=False)
        merged["grads"].update(part["grads"])
        merged["params"].update(part["params"])
        if stage == pp - 1 or "metrics" not in merged:
            merged["metrics"] = part["metrics"]
            merged["micro_batches"] = part["micro_batches"]
    return merged


# Every run of this module, by name: one launch per world size (testsupport/jobs.py).
ONE_RANK = {
    "base": ["--max-tokens", "1000", "64", "16"],
    "learn": ["--learn-steps", "3", "--max-tokens", "1000"],
    "skip1": ["--skip-zero", "--max-tokens", "16"],
    "nopad": ["--seq-multiple", "1", "--max-tokens", "64"],  # base pads to 16 (the loop's rule)
    "chunks": ["--chunk-tokens", "3", "--max-tokens", "64"],  # chunks recomputed in backward
}
TWO_RANKS = {
    "tp2": ["--tp", "2", "--max-tokens", "64"],
    "pp2": ["--pp", "2", "--max-tokens", "64"],
    "dp2": ["--max-tokens", "64"],
    "dp2do": ["--dist-opt", "--max-tokens", "64"],
    "skip2": ["--skip-zero", "--max-tokens", "16"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layouts")
    for nproc, jobs in ((1, ONE_RANK), (2, TWO_RANKS)):
        torchrun_jobs(WORKER, nproc, [[*args, "--out", str(out / name)] for name, args in jobs.items()])
    return out


@pytest.fixture(scope="module")
def base(runs) -> str:
    return str(runs / "base")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _reference_grads() -> tuple[dict, float]:
    """Independent: transformers' model, per-sample forward, the DAPO loss written out here."""
    hf = tiny.tiny_hf_config()
    model = tiny.tiny_hf_model(hf).train()
    samples, advs = tiny.synthetic_samples()
    total_tokens = sum(len(s.response_ids) for s in samples)
    loss = 0.0
    for i, (s, adv) in enumerate(zip(samples, advs)):
        ids = torch.tensor([list(s.prompt_ids) + list(s.response_ids)])
        p = len(s.prompt_ids)
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        lp = logp[torch.arange(p - 1, ids.shape[1] - 1), ids[0, p:]]
        noise = torch.tensor([math.sin(31.0 * i + 7.0 * pos) * 0.4 for pos in range(p - 1, ids.shape[1] - 1)])
        ratio = torch.exp(lp - (lp.detach() + noise))
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
        if adv < 0:
            pg = torch.minimum(pg, torch.full_like(pg, -adv * 10.0))
        loss = loss + pg.sum()
    loss = loss / total_tokens
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    meg = {name: qm.hf_to_megatron(name, grads, hf) for name in qm.megatron_names(hf)}
    return meg, float(loss.detach())


def test_tp1_matches_transformers_reference(base):
    ours = _load(base, 64)
    ref, ref_loss = _reference_grads()
    assert abs(ours["metrics"]["loss/loss"] - ref_loss) < 1e-6
    assert _max_diff(ours["grads"], ref) < 1e-5


def test_micro_batch_count_does_not_change_the_gradient(base):
    one, many = _load(base, 1000), _load(base, 16)
    assert one["micro_batches"] == 1 and many["micro_batches"] >= 4
    assert _max_diff(one["grads"], many["grads"]) < 1e-6
    assert abs(one["metrics"]["loss/loss"] - many["metrics"]["loss/loss"]) < 1e-7


@pytest.mark.parametrize("name,pp", [("tp2", 1), ("pp2", 2), ("dp2", 1)])
def test_layout_reproduces_tp1_gradients(runs, base, name, pp):
    ours, ref = _load(str(runs / name), 64, pp), _load(base, 64)
    assert _max_diff(ours["grads"], ref["grads"]) < 1e-6
    assert abs(ours["metrics"]["loss/loss"] - ref["metrics"]["loss/loss"]) < 1e-6
    assert abs(ours["metrics"]["loss/entropy"] - ref["metrics"]["loss/entropy"]) < 1e-5


def test_distributed_optimizer_dp2_matches_tp1_step(runs, base):
    ours, ref = _load(str(runs / "dp2do"), 64), _load(base, 64)
    assert _max_diff(ours["params"], ref["params"]) < 1e-5
    hf = tiny.tiny_hf_config()
    initial = tiny.tiny_hf_model(hf).state_dict()
    start = {name: qm.hf_to_megatron(name, initial, hf) for name in qm.megatron_names(hf)}
    assert _max_diff(ours["params"], start) > 1e-3  # the step really moved the weights


def test_positive_advantages_raise_logprobs(runs):
    res = torch.load(runs / "learn.mt1000.pp0.pt", weights_only=False)
    _, advs = tiny.synthetic_samples()
    mb = res["mbs"][0]
    for row, i in enumerate(mb.sample_index):
        mask = mb.loss_mask[row].bool()
        delta = (res["after"][0][row][mask] - res["before"][0][row][mask]).mean().item()
        if advs[i] > 0:
            assert delta > 0.05, (i, delta)
        elif advs[i] < 0:
            assert delta < -0.01, (i, delta)


@pytest.mark.parametrize("nproc", [1, 2])
def test_skipping_zero_advantage_samples_gives_the_same_step(runs, base, nproc):
    out = str(runs / f"skip{nproc}")
    ours, ref = _load(out, 16), _load(base, 16)
    part = torch.load(f"{out}.mt16.pp0.pt", weights_only=False)
    _, advs = tiny.synthetic_samples()
    assert part["batch"]["batch/skipped_samples_frac"] == sum(a == 0.0 for a in advs) / len(advs)
    assert ours["micro_batches"] >= 2
    assert _max_diff(ours["grads"], ref["grads"]) < 1e-6
    assert _max_diff(ours["params"], ref["params"]) < 1e-5


def _same_step_as_base(base: str, out: str) -> None:
    ours, ref = _load(out, 64), _load(base, 64)
    assert _max_diff(ours["grads"], ref["grads"]) < 1e-6
    assert abs(ours["metrics"]["loss/loss"] - ref["metrics"]["loss/loss"]) < 1e-7
    assert abs(ours["metrics"]["loss/entropy"] - ref["metrics"]["loss/entropy"]) < 1e-6


def test_sequence_padding_does_not_change_the_step(runs, base):
    # base pads every micro-batch to a multiple of 16 (the loop's rule); this run does not pad.
    _same_step_as_base(base, str(runs / "nopad"))


def test_logprob_chunks_do_not_change_the_gradient(runs, base):
    # Chunks of 3 response tokens, each recomputed in backward, against base's single chunk.
    _same_step_as_base(base, str(runs / "chunks"))
