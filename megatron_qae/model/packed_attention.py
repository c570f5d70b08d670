"""Core attention of the local (CPU) layer spec that also takes packed (THD) micro-batches.

What it does: `PackedDotProductAttention` is megatron-core's local `DotProductAttention` that,
given `PackedSeqParams(qkv_format='thd')`, attends within each packed sequence only, through a
block-diagonal causal mask built from `cu_seqlens`; without packed parameters it is exactly the
parent class. What it does not: apply rotary embeddings (megatron's attention does that per
packed sequence from `cu_seqlens`, rope_utils._apply_rotary_pos_emb_thd, before calling here)
or run on Transformer Engine (its `TEDotProductAttention` takes THD natively on GPU).

Why a subclass: megatron-core 0.19's local attention refuses packed parameters
(transformer/dot_product_attention.py, `assert packed_seq_params is None`), and the GPT model
feeds RoPE a position range, not position ids (models/gpt/gpt_model.py, `_preprocess`), so the
only way for a packed row to get per-sequence positions is the THD path; this class lets the
CPU run take it too, so packing, positions and loss are the same code on CPU and GPU.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def block_causal_mask(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """[1, 1, t, t] bool, True where attention is NOT allowed (megatron's mask convention):
    token i sees token j only when both lie in the same packed sequence and j <= i."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    if segment.numel() != total_tokens:
        raise ValueError(f"cu_seqlens covers {segment.numel()} tokens, the packed row has {total_tokens}")
    same = segment[:, None] == segment[None, :]
    causal = torch.ones(total_tokens, total_tokens, dtype=torch.bool, device=cu_seqlens.device).tril()
    return ~(same & causal)[None, None]


class PackedDotProductAttention(DotProductAttention):
    """Local attention; packed THD input attends block-diagonally (see module docstring)."""

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
        if self.config.masked_softmax_fusion:
            # The fused causal kernel builds its own triangle and ignores the mask it is given.
            raise ValueError("packed sequences with the local layer spec need masked_softmax_fusion off "
                             "(the fused causal softmax ignores the block mask); use "
                             "model.transformer_impl=transformer_engine or train.pack_sequences=false")
        if attention_mask is not None:
            raise ValueError("a packed micro-batch carries its mask in cu_seqlens; got an attention_mask too")
        # megatron's attention squeezed the dummy batch dimension for THD: [t, heads, dim].
        tokens = query.shape[0]
        mask = block_causal_mask(packed_seq_params.cu_seqlens_q, tokens)
        out = super().forward(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask,
                              attn_mask_type, attention_bias, None)
        return out  # [t, 1, heads * dim]; the caller reshapes THD output to (t, 1, -1) itself
