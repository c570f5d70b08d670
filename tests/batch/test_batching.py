"""Token-balanced DP dispatch and token-budget micro-batches."""

from __future__ import annotations

import itertools
import math
import random

import torch

import pytest

from megatron_qae.batch.batching import (build_micro_batch, empty_micro_batch, pack_by_budget, rank_micro_batches,
                                   schedule_multiple, seq_multiple, split_by_tokens)
from rollout_sglang.types import Sample


def _sample(p: int, r: int, gid: int = 0) -> Sample:
    return Sample(gid, tuple(range(1, p + 1)), tuple(range(100, 100 + r)),
                  tuple(-0.1 * (i + 1) for i in range(r)), "stop", 1.0, 1.0, 0)


def test_split_by_tokens_balances_and_covers_every_index_once():
    rng = random.Random(0)
    lengths = [rng.randint(50, 500) for _ in range(64)]
    parts = split_by_tokens(lengths, 4)
    assert sorted(i for p in parts for i in p) == list(range(64))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(lengths)


def test_padding_under_ten_percent_with_lengths_spread_ten_times():
    rng = random.Random(1)
    lengths = [rng.randint(100, 1000) for _ in range(256)]
    packs = pack_by_budget(lengths, max_tokens=8192)
    assert sorted(i for p in packs for i in p) == list(range(256))
    padded = sum(max(lengths[i] for i in p) * len(p) for p in packs)
    assert all(max(lengths[i] for i in p) * len(p) <= 8192 for p in packs)
    assert 1 - sum(lengths) / padded < 0.10


def test_rank_micro_batches_reports_padding_like_an_independent_count():
    samples = [_sample(4, r) for r in (3, 30, 7, 12, 25, 9)]
    mbs, m = rank_micro_batches(samples, [1.0] * 6, 0, 1, max_tokens=70)
    real = sum(s.num_tokens for s in samples)
    padded = sum(mb.tokens.numel() for mb in mbs)
    assert abs(m["batch/padding_frac"] - (1 - real / padded)) < 1e-12
    assert all(mb.tokens.numel() <= 70 or mb.tokens.shape[0] == 1 for mb in mbs)


def test_micro_batch_alignment_puts_logprobs_on_the_positions_that_predict_the_response():
    s = _sample(3, 4)
    mb = build_micro_batch([s, _sample(2, 1)], [0, 1], [0.5, -2.0])
    # Row 0: tokens [1,2,3,100,101,102,103]; position p predicts token p+1.
    assert mb.tokens[0].tolist() == [1, 2, 3, 100, 101, 102, 103]
    assert mb.loss_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 0]
    assert mb.targets[0, 2:6].tolist() == [100, 101, 102, 103]
    assert torch.allclose(mb.rollout_logprobs[0, 2:6], torch.tensor([-0.1, -0.2, -0.3, -0.4]))
    assert mb.advantages[0, 2:6].tolist() == [0.5] * 4 and mb.advantages[0, 6] == 0
    assert mb.loss_mask[1].tolist() == [0, 1, 0, 0, 0, 0, 0]


def test_skip_zero_advantage_drops_exactly_the_zero_samples():
    samples = [_sample(3, r, gid=i) for i, r in enumerate((5, 6, 7, 8))]
    mbs, m = rank_micro_batches(samples, [0.0, 1.0, 0.0, -1.0], 0, 1, 1000, skip_zero_advantage=True)
    kept = sorted(i for mb in mbs for i in mb.sample_index)
    assert kept == [1, 3]
    assert m["batch/skipped_samples_frac"] == 0.5
    assert m["batch/skipped_response_tokens"] == 5 + 7


@pytest.mark.parametrize("tp,multiple", [(1, 16), (2, 16), (3, 48), (8, 16), (12, 48)])
def test_sequence_lengths_are_padded_to_lcm_16_tp(tp, multiple):
    assert seq_multiple(tp) == multiple == seq_multiple(tp, sequence_parallel=True) == seq_multiple(tp, fp8=True)
    samples = [_sample(4, r, gid=i) for i, r in enumerate((3, 30, 7, 12, 25, 9, 50))]
    mbs, _ = rank_micro_batches(samples, [1.0] * 7, 0, 1, max_tokens=200, seq_multiple=multiple)
    assert sorted(i for mb in mbs for i in mb.sample_index) == list(range(7))
    for mb in mbs:
        assert mb.tokens.shape[1] % multiple == 0
        assert mb.tokens.numel() <= 200 or mb.tokens.shape[0] == 1
        for row, i in enumerate(mb.sample_index):
            s = samples[i]
            n = s.num_tokens
            # The padding is all zeros and outside the loss.
            assert mb.tokens[row, :n].tolist() == list(s.prompt_ids + s.response_ids)
            assert not mb.tokens[row, n:].any() and not mb.loss_mask[row, n - 1:].any()
            assert mb.loss_mask[row].sum() == len(s.response_ids)
    assert empty_micro_batch(multiple).tokens.shape == (1, multiple)
    assert empty_micro_batch(multiple).loss_mask.sum() == 0


@pytest.mark.parametrize("n,budget", [(0, 64), (1, 64), (3, 1000), (5, 40), (12, 64)])
def test_interleaved_schedule_gets_a_multiple_of_pp_micro_batches(n, budget):
    assert schedule_multiple(2, None) == 1 and schedule_multiple(4, 2) == 4
    samples = [_sample(4, 3 + 2 * i, gid=i) for i in range(n)]
    for pp in (2, 4):
        mbs, m = rank_micro_batches(samples, [1.0] * n, 0, 1, budget, seq_multiple=16,
                                    count_multiple=schedule_multiple(pp, 2))
        assert len(mbs) >= pp and len(mbs) % pp == 0 and m["batch/micro_batches"] == len(mbs)
        assert sorted(i for mb in mbs for i in mb.sample_index) == list(range(n))
        assert sum(mb.num_response_tokens for mb in mbs) == sum(len(s.response_ids) for s in samples)


def _te_accepts(mb, tp: int, sequence_parallel: bool, fp8: bool) -> bool:
    """Transformer Engine's view of one micro-batch, written from its rule, not from our
    padding: megatron runs [s, b, h]; under sequence parallel each TP rank holds [s / tp, b, h]
    (s % tp == 0), and an FP8 GEMM asserts the product of all dims but the last % 8 on that
    local input (TE 2.20.2 pytorch/utils.py:704-714 via layernorm_linear.py:174-184)."""
    b, s = mb.tokens.shape
    if sequence_parallel and s % tp:
        return False
    local = (s // tp if sequence_parallel else s, b)
    return not fp8 or (math.prod(local) % 8 == 0 and s % 16 == 0)


@pytest.mark.parametrize("tp,sequence_parallel,fp8,pack",
                         list(itertools.product((2, 4, 8), (False, True), (False, True), (False, True))))
def test_every_micro_batch_meets_fp8_sequence_parallel_local_shard_rule(tp, sequence_parallel, fp8, pack):
    """Random length mixes over DP ranks, some with no samples (the filler micro-batch) and a
    count multiple (interleaved schedule): every row the batching and packing code emits
    passes TE's local-shard check, and with FP8 + SP is a multiple of lcm(16, 8 * tp)."""
    rng = random.Random(tp * 8 + 4 * sequence_parallel + 2 * fp8 + pack)
    multiple = seq_multiple(tp, sequence_parallel, fp8)
    rule = math.lcm(16, 8 * tp) if sequence_parallel and fp8 else math.lcm(16, tp)
    for trial in range(12):
        n = rng.choice((0, 1, 3, 17))
        samples = [_sample(rng.randint(1, 40), rng.randint(1, 200), gid=i) for i in range(n)]
        advs = [rng.choice((0.0, 1.0, -0.5)) for _ in range(n)]
        dp, budget = rng.choice((1, 2, 4)), rng.choice((256, 1024))
        for dp_rank in range(dp):
            mbs, _ = rank_micro_batches(samples, advs, dp_rank, dp, budget, skip_zero_advantage=trial % 2 == 1,
                                        seq_multiple=multiple, count_multiple=rng.choice((1, 2)), pack=pack)
            for mb in mbs:
                b, s = mb.tokens.shape
                assert _te_accepts(mb, tp, sequence_parallel, fp8), (
                    f"tp={tp} sp={sequence_parallel} fp8={fp8} pack={pack}: a [{b}, {s}] micro-batch "
                    f"({len(mb.sample_index)} samples) leaves TE a [{s // tp if sequence_parallel else s}, {b}] input")
                assert s % rule == 0, f"row of {s} tokens is not a multiple of {rule}"
