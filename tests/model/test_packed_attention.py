"""The local spec's packed (THD) attention: per sequence, through length buckets, equals dense
attention over the whole row under a block-diagonal causal mask (values and gradients, fp32),
and attends over about the sum of the squared sequence lengths, not the row length squared."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_qae.model.packed_attention import (BUCKET_AREA_RATIO, BUCKET_FREE_AREA, WIDTH_MULTIPLE,
                                                 PackedDotProductAttention, segment_buckets, varlen_attention)

HEADS, GROUPS, DIM = 4, 2, 8
# The tails are what build_packed_micro_batch appends: the row's end padding, a sequence of its own.
LENGTH_MIXES = {
    "spread_with_tail": [130, 4, 13, 1, 27, 2, 70, 9, 1, 5],  # three buckets: 144, 80 and 32 wide
    "ones": [1, 1, 1, 1, 1],
    "one_sequence": [23],
    "long_then_ones_with_tail": [30, 1, 1, 7],
    "empty_sequence": [6, 0, 3, 5],
}


def block_causal_mask(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """[t, t] bool, True where attention is NOT allowed: token i sees token j only when both lie in
    the same packed sequence and j <= i (the dense path this module replaced)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    assert segment.numel() == total_tokens
    same = segment[:, None] == segment[None, :]
    return ~(same & torch.ones(total_tokens, total_tokens, dtype=torch.bool).tril())


def dense_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The whole row at once: [t, heads, dim] -> [t, heads * dim]."""
    k, v = (x.repeat_interleave(HEADS // GROUPS, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) / DIM ** 0.5
    scores = scores.masked_fill(block_causal_mask(cu_seqlens, q.shape[0]), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q.shape[0], -1)


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's causal SDPA on a padded batch: [s, b, heads, dim] (k / v: groups) -> [s, b, heads * dim]."""
    q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return out.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], -1)


def qkv(tokens: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, h, DIM, generator=g, requires_grad=True) for h in (HEADS, GROUPS, GROUPS)]


def cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def test_block_causal_reference_matches_a_hand_built_mask():
    allowed = torch.zeros(6, 6, dtype=torch.bool)
    for lo, hi in [(0, 2), (2, 5), (5, 6)]:
        for q in range(lo, hi):
            allowed[q, lo:q + 1] = True
    assert torch.equal(block_causal_mask(torch.tensor([0, 2, 5, 6]), 6), ~allowed)


@pytest.mark.parametrize("mix", list(LENGTH_MIXES))
def test_per_sequence_attention_equals_dense_block_masked_attention(mix):
    lengths = LENGTH_MIXES[mix]
    cu_seqlens, tokens = cu(lengths), sum(lengths)
    ours, theirs = qkv(tokens, seed=len(mix)), qkv(tokens, seed=len(mix))
    weight = torch.randn(tokens, HEADS * DIM, generator=torch.Generator().manual_seed(1))
    calls = []
    out = varlen_attention(*ours, cu_seqlens, lambda *qkv: calls.append(qkv[0].shape[:2]) or sdpa_causal(*qkv))
    assert len(calls) == len(segment_buckets(lengths))
    ref = dense_masked(*theirs, cu_seqlens)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    for name, a, b in zip("qkv", ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"d{n}: {m}")


def rounded(n: int) -> int:
    return -(-n // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def area_bound(n: int) -> float:
    """The most attention area a sequence of n tokens may be given in its bucket."""
    return max(BUCKET_AREA_RATIO * rounded(n) ** 2, rounded(n) ** 2 + BUCKET_FREE_AREA)


def test_buckets_bound_the_padding_and_cover_every_sequence_once():
    lengths = [170, 4, 13, 1, 27, 2, 9, 1, 5, 152, 133, 60, 120, 90]
    buckets = segment_buckets(lengths)
    assert sorted(i for _, b in buckets for i in b) == list(range(len(lengths)))
    assert 1 < len(buckets) < len(lengths)  # batched, but not one bucket padded to 170
    for width, b in buckets:
        assert width == rounded(lengths[b[0]]) and lengths[b[0]] == max(lengths[i] for i in b)
        assert all(width ** 2 <= area_bound(lengths[i]) for i in b), (width, b)
    assert segment_buckets([6, 0, 3]) == [(16, [0, 2])]  # an empty sequence attends nowhere


def packed_params(lengths: list[int]) -> PackedSeqParams:
    cu_seqlens = cu(lengths)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))


@pytest.fixture
def attention(monkeypatch):
    """The module on the THD path, its parent class (megatron's local attention) replaced by SDPA
    so no megatron world is needed; `attention.areas` records rows x width^2 of each call."""
    module = PackedDotProductAttention.__new__(PackedDotProductAttention)
    torch.nn.Module.__init__(module)
    module.areas = []

    def parent_forward(self, q, k, v, mask, mask_type=None, bias=None, packed=None):
        assert packed is None and mask is None  # a causal batch, as a padded micro-batch's
        self.areas.append(q.shape[1] * q.shape[0] ** 2)
        return sdpa_causal(q, k, v)

    monkeypatch.setattr(DotProductAttention, "forward", parent_forward)
    return module


def test_packed_forward_attends_per_sequence_through_the_parent(attention):
    lengths = LENGTH_MIXES["spread_with_tail"]
    q, k, v = qkv(sum(lengths), seed=0)
    out = attention.forward(q, k, v, None, packed_seq_params=packed_params(lengths))
    torch.testing.assert_close(out, dense_masked(q, k, v, cu(lengths)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"cu_seqlens_kv == cu_seqlens_q"):
        attention.forward(q, k, v, None, packed_seq_params=PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu(lengths), cu_seqlens_kv=cu(lengths[::-1])))


def test_a_packed_row_costs_about_the_sum_of_squares(attention):
    # 64 samples of 16..64 tokens in one 2,600-token row: the demo's packed micro-batch shape.
    lengths = torch.randint(16, 65, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    tokens = sum(lengths)
    q, k, v = (torch.zeros(tokens, h, DIM) for h in (HEADS, GROUPS, GROUPS))
    attention.forward(q, k, v, None, packed_seq_params=packed_params(lengths))
    assert sum(attention.areas) <= sum(area_bound(n) for n in lengths)
    assert sum(attention.areas) < tokens ** 2 / 10, (sum(attention.areas), tokens ** 2)
    assert len(attention.areas) <= 6  # a few batched calls, not one per sequence


def test_cu_seqlens_that_do_not_cover_the_row_are_refused():
    q, k, v = qkv(6, seed=0)
    with pytest.raises(ValueError, match=r"cu_seqlens \[0, 2, 5\] must rise from 0 to the packed row's 6 tokens"):
        varlen_attention(q, k, v, torch.tensor([0, 2, 5]), sdpa_causal)
