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
length (rounded up to WIDTH_MULTIPLE) squared: padding costs at most 50% more attention for it,
while a 10x length spread needs about 12 buckets, not one call per sequence."""

WIDTH_MULTIPLE = 16
"""Bucket widths are multiples of 16, as a padded micro-batch's rows are (batching.seq_multiple):
CPU kernels reduce over a row in fixed-width vector lanes plus a tail, so a width off that grid
sums a sequence's scores in another order and its log-probs move by float rounding."""

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""Causal attention of one padded batch: q [s, b, heads, dim], k / v [s, b, groups, dim] ->
[s, b, heads * dim]."""


def segment_buckets(lengths: list[int], area_ratio: float = BUCKET_AREA_RATIO,
                    multiple: int = WIDTH_MULTIPLE) -> list[tuple[int, list[int]]]:
    """(width, indices) buckets of the non-empty `lengths`, longest first: a bucket is its first
    (longest) sequence's length rounded up to `multiple` wide, and the next sequence joins while
    width^2 <= area_ratio * (its length rounded up)^2."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    buckets: list[tuple[int, list[int]]] = []
    for i in order:
        width = -(-lengths[i] // multiple) * multiple
        if buckets and buckets[-1][0] ** 2 <= area_ratio * width ** 2:
            buckets[-1][1].append(i)
        else:
            buckets.append((width, [i]))
    return buckets


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
    lengths = [b - a for a, b in zip(starts, starts[1:])]
    outputs, positions = [], []
    for width, bucket in segment_buckets(lengths):
        lo = torch.tensor([starts[i] for i in bucket], device=query.device)
        length = torch.tensor([lengths[i] for i in bucket], device=query.device)
        steps = torch.arange(width, device=query.device)
        # [width, rows]: row r holds its sequence, then repeats of its last token.
        index = (lo[None, :] + torch.minimum(steps[:, None], length[None, :] - 1))
        out = attend(query[index], key[index], value[index])  # [width, rows, heads * dim]
        real = (steps[None, :] < length[:, None])  # [rows, width]
        outputs.append(out.transpose(0, 1)[real])
        positions.append(index.t()[real])
    # The buckets' real positions, in bucket order, are a permutation of the row.
    order = torch.cat(positions)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(tokens, device=query.device)
    return torch.cat(outputs)[inverse]


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
