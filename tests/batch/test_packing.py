"""Packed micro-batches (train.pack_sequences): the layout, and that a packed step equals the
padded one (loss, log-probs, gradients) under TP=1 and TP=2, plus a 2-rank run with packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_qae.batch.batching import build_micro_batch, rank_micro_batches
from megatron_qae.batch.packing import build_packed_micro_batch, pack_by_tokens, packed_seq_params
from testsupport import tiny
from testsupport.jobs import torchrun_jobs

WORKER = tiny.ROOT / "tests" / "dist_workers" / "train_worker.py"


def test_pack_by_tokens_respects_the_rounded_budget():
    lengths = [9, 3, 7, 5, 30, 1]
    packs = pack_by_tokens(lengths, 16, multiple=4)
    assert sorted(i for p in packs for i in p) == list(range(6))
    for p in packs:
        total = sum(lengths[i] for i in p)
        assert len(p) == 1 or -(-total // 4) * 4 <= 16, (p, total)
    assert [4] in packs  # longer than the budget: a micro-batch of its own


def test_packed_row_holds_each_sample_where_the_padded_row_does():
    samples, advs = tiny.synthetic_samples(5)
    idx = [3, 0, 4]
    packed = build_packed_micro_batch(samples, idx, advs, multiple=16)
    padded = build_micro_batch(samples, idx, advs)
    n = sum(samples[i].num_tokens for i in idx)
    assert packed.tokens.shape == (1, -(-n // 16) * 16)
    starts = packed.cu_seqlens.tolist()
    assert starts[:4] == [0, *torch.tensor([samples[i].num_tokens for i in idx]).cumsum(0).tolist()]
    assert starts[-1] == packed.tokens.shape[1]  # the tail is a sequence of its own
    for k, i in enumerate(idx):
        lo, hi = starts[k], starts[k + 1]
        width = hi - lo
        for name in ("tokens", "position_ids", "loss_mask", "advantages", "rollout_logprobs"):
            assert torch.equal(getattr(packed, name)[0, lo:hi], getattr(padded, name)[k, :width]), name
        # Inside a sequence the targets are the padded ones; the last token predicts nothing.
        assert torch.equal(packed.targets[0, lo:hi - 1], padded.targets[k, :width - 1])
        assert packed.targets[0, hi - 1] == 0 and packed.loss_mask[0, hi - 1] == 0
    assert packed.max_seqlen == max(samples[i].num_tokens for i in idx)
    params = packed_seq_params(packed)
    assert params.qkv_format == "thd" and params.cu_seqlens_q is packed.cu_seqlens
    assert packed_seq_params(padded) is None


def test_packing_removes_the_padding():
    samples, advs = tiny.synthetic_samples(24)
    _, padded = rank_micro_batches(samples, advs, 0, 1, 64, seq_multiple=16)
    _, packed = rank_micro_batches(samples, advs, 0, 1, 64, seq_multiple=16, pack=True)
    assert packed["batch/padding_frac"] < padded["batch/padding_frac"] / 2


def _load(prefix: str) -> dict:
    return torch.load(f"{prefix}.mt64.pp0.pt", weights_only=False)


def _assert_same_step(packed: dict, padded: dict) -> None:
    assert packed["logprobs"].keys() == padded["logprobs"].keys() and len(packed["logprobs"]) == 12
    assert max((packed["logprobs"][i] - padded["logprobs"][i]).abs().max().item() for i in padded["logprobs"]) < 1e-6
    assert abs(packed["metrics"]["loss/loss"] - padded["metrics"]["loss/loss"]) < 1e-6
    assert abs(packed["metrics"]["loss/entropy"] - padded["metrics"]["loss/entropy"]) < 1e-6
    assert packed["grads"].keys() == padded["grads"].keys() and packed["grads"]
    assert max((packed["grads"][k] - padded["grads"][k]).abs().max().item() for k in padded["grads"]) < 1e-6
    # Adam divides by sqrt(v): a 1e-8 gradient difference can move a parameter by ~1e-6.
    assert max((packed["params"][k] - padded["params"][k]).abs().max().item() for k in padded["params"]) < 1e-5
    # The packed run really packed: fewer, fuller micro-batches.
    assert packed["batch"]["batch/padding_frac"] < padded["batch"]["batch/padding_frac"]


PACKED_CASES = [(1, "dapo"), (2, "dapo"), (1, "gspo"), (1, "kl_cov")]


@pytest.fixture(scope="module")
def packed_runs(tmp_path_factory) -> Path:
    """Every (tp, loss) case padded and packed: one launch per tp (testsupport/jobs.py)."""
    out = tmp_path_factory.mktemp("packed")
    for tp in sorted({tp for tp, _ in PACKED_CASES}):
        jobs = [["--tp", str(tp), "--max-tokens", "64", "--out", str(out / f"{mode}-tp{tp}-{loss}"),
                 "--policy-loss", loss, *(["--pack"] if mode == "packed" else [])]
                for t, loss in PACKED_CASES if t == tp for mode in ("padded", "packed")]
        torchrun_jobs(WORKER, tp, jobs)
    return out


@pytest.mark.parametrize("tp,loss", PACKED_CASES)
def test_packed_step_equals_padded_step(packed_runs, tp, loss):
    # GSPO's sequence ratio and KL-Cov's token selection work per response: a packed row holds
    # several (they read it through MicroBatch.per_sample / sample_spans).
    _assert_same_step(_load(str(packed_runs / f"packed-tp{tp}-{loss}")),
                      _load(str(packed_runs / f"padded-tp{tp}-{loss}")))


def test_two_rank_run_with_packing(tmp_path):
    run_dir = tmp_path / "run"
    tiny.train_run(run_dir, 2, ["train.pack_sequences=true", "run.num_rollout_steps=2"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert torch.isfinite(torch.tensor(r["loss/loss"])) and r["loss/trained_tokens"] > 0
        assert r["batch/padding_frac"] < 0.5
        assert r["handoff/sent_bytes"] > 0  # rank 0 sent rank 1 its share (handoff.py)
