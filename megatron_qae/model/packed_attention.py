"""Core attention of the local (CPU) layer spec that also takes packed (THD) micro-batches.

What it does: `PackedDotProductAttention` is megatron-core's local `DotProductAttention` that,
given `PackedSeqParams(qkv_format='thd')`, attends within each packed sequence only: the
sequences of the row (from `cu_seqlens`, as Transformer Engine's THD attention reads them) are
grouped by length into buckets (`segment_buckets`), each bucket's sequences are stacked as the
rows of an ordinary causal batch padded at their ends to a multiple of 16, the parent class attends over that batch,
and the real positions go back to their places in the row (`varlen_attention`). Attention then
costs about the sum of the sequences' squared lengths, not the row length squared. Without
packed parameters it is exactly the parent class. What it does not: apply rotary embeddings
(megatron's attention does that per packed sequence from `cu_seqlens`,
rope_utils._apply_rotary_pos_emb_thd, before calling here), take `cu_seqlens_*_padded` (context
parallel's layout; the local attention has no context parallel) or run on Transformer Engine
(its `TEDotProductAttention` takes THD natively on GPU).

Exactness: a sequence in a bucket is the row of a causal batch padded at its end, which is how
a padded micro-batch's rows reach the parent class, so a packed step computes what the padded
one does (tests/batch/test_packing.py); the positions past a sequence's end are copies of its
last token, seen by no real position (causal) and dropped from the output.

Why a subclass: megatron-core 0.19's local attention refuses packed parameters
(transformer/dot_product_attention.py, `assert packed_seq_params is None`), and the GPT model
feeds RoPE a position range, not position ids (models/gpt/gpt_model.py, `_preprocess`), so the
only way for a packed row to get per-sequence positions is the THD path; this class lets the
CPU run take it too, so packing, positions and loss are the same code on CPU and GPU.
"""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

BUCKET_AREA_RATIO = 1.5
"""A sequence joins a bucket while the bucket's width squared is at most this times its own
length (rounded up to WIDTH_MULTIPLE) squared, or while padding it costs at most
BUCKET_FREE_AREA score elements: padding costs at most 50% more attention for a long sequence,
a 10x length spread needs about 12 buckets, not one call per sequence."""

BUCKET_FREE_AREA = 64 * 64
"""Padding a sequence by fewer score elements than this costs less than one more attention call
(its fixed cost of ~20 kernel launches, forward and backward), so short sequences share one."""

WIDTH_MULTIPLE = 16
"""Bucket widths are multiples of 16, as a padded micro-batch's rows are (batching.seq_multiple):
CPU kernels reduce over a row in fixed-width vector lanes plus a tail, so a width off that grid
sums a sequence's scores in another order and its log-probs move by float rounding."""

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""Causal attention of one padded batch: q [s, b, heads, dim], k / v [s, b, groups, dim] ->
[s, b, heads * dim]."""


def segment_buckets(lengths: list[int], area_ratio: float = BUCKET_AREA_RATIO,
                    multiple: int = WIDTH_MULTIPLE, free_area: int = BUCKET_FREE_AREA) -> list[tuple[int, list[int]]]:
    """(width, indices) buckets of the non-empty `lengths`, longest first: a bucket is its first
    (longest) sequence's length rounded up to `multiple` wide, and the next sequence, w wide
    rounded, joins while width^2 <= area_ratio * w^2 or width^2 - w^2 <= free_area."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    buckets: list[tuple[int, list[int]]] = []
    for i in order:
        w = -(-lengths[i] // multiple) * multiple
        if buckets and (buckets[-1][0] ** 2 <= area_ratio * w ** 2 or buckets[-1][0] ** 2 - w ** 2 <= free_area):
            buckets[-1][1].append(i)
        else:
            buckets.append((w, [i]))
    return buckets


def bucket_indices(starts: list[int], buckets: list[tuple[int, list[int]]],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(gather, source) of a packed row's buckets: `gather` [sum width * rows] are the row's
    token indices of the buckets' padded batches, each [width, rows] row-major (row r holds its
    sequence, then repeats of its last token); `source` [t] is, for each token of the row, where
    its output lies in those batches laid end to end."""
    gathers, sources, positions, offset = [], [], [], 0
    for width, bucket in buckets:
        lo = torch.tensor([starts[i] for i in bucket])
        length = torch.tensor([starts[i + 1] - starts[i] for i in bucket])
        steps = torch.arange(width)[:, None]
        gathers.append((lo + torch.minimum(steps, length - 1)).flatten())
        real = steps < length
        positions.append((lo + steps)[real])
        sources.append((offset + torch.arange(width * len(bucket)).view(width, -1))[real])
        offset += width * len(bucket)
    source = torch.empty(starts[-1], dtype=torch.long)
    source[torch.cat(positions)] = torch.cat(sources)
    return torch.cat(gathers).to(device), source.to(device)


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                     attend: Attend) -> torch.Tensor:
    """Causal attention within each sequence of a packed row: q [t, heads, dim], k / v
    [t, groups, dim], `cu_seqlens` [n + 1] int (starts, then t) -> [t, heads * dim], token i
    attending to the tokens of its own sequence up to itself, through `attend` on one padded
    batch per length bucket."""
    starts = cu_seqlens.tolist()
    tokens = query.shape[0]
    if starts[0] != 0 or starts[-1] != tokens or any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"cu_seqlens {starts} must rise from 0 to the packed row's {tokens} tokens")
    buckets = segment_buckets([b - a for a, b in zip(starts, starts[1:])])
    gather, source = bucket_indices(starts, buckets, query.device)
    # One gather per input and one for the output: their gradients are one index_add each,
    # and split's is one cat (a slice per bucket would zero-fill the whole input per bucket).
    sizes = [width * len(bucket) for width, bucket in buckets]
    parts = [x.index_select(0, gather).split(sizes) for x in (query, key, value)]
    outputs = [attend(*(p.view(width, len(bucket), *p.shape[1:]) for p in batch)).view(size, -1)
               for (width, bucket), size, *batch in zip(buckets, sizes, *parts)]
    return torch.cat(outputs).index_select(0, source)


class PackedDotProductAttention(DotProductAttention):
    """Local attention; packed THD input attends per sequence (see module docstring)."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        p = packed_seq_params
        if attention_mask is not None:
            raise ValueError("a packed micro-batch carries its mask in cu_seqlens; got an attention_mask too")
        if p.cu_seqlens_q_padded is not None or p.cu_seqlens_kv_padded is not None:
            raise ValueError("PackedSeqParams.cu_seqlens_*_padded (context parallel's layout) is not taken by "
                             "the local attention; leave them None or use model.transformer_impl=transformer_engine")
        if p.cu_seqlens_kv is not p.cu_seqlens_q and not torch.equal(p.cu_seqlens_kv, p.cu_seqlens_q):
            raise ValueError(f"self-attention needs cu_seqlens_kv == cu_seqlens_q; got {p.cu_seqlens_kv.tolist()} "
                             f"and {p.cu_seqlens_q.tolist()}")

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # No mask: the parent's causal softmax builds the triangle (fused or not), as for a
            # padded micro-batch (fusions/fused_softmax.py, FusedScaleMaskSoftmax.forward).
            return super(PackedDotProductAttention, self).forward(q, k, v, None, attn_mask_type,
                                                                  attention_bias, None)

        # megatron's attention squeezed the dummy batch dimension for THD: [t, heads, dim]; it
        # reshapes the [t, heads * dim] output to (t, 1, -1) itself.
        return varlen_attention(query, key, value, p.cu_seqlens_q, attend)
