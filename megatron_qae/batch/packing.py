"""Packed micro-batches: a micro-batch's samples end to end in one row, no padding between them.

What it does: groups one DP rank's samples into micro-batches by their summed token count
(`pack_by_tokens`), lays each group out as a single row with per-sequence position ids and
next-token targets that never cross a sequence boundary (`build_packed_micro_batch`), and turns
a packed micro-batch into megatron-core's `PackedSeqParams` (qkv_format='thd') for the model
call (`packed_seq_params`). The row is padded at its end only, to the multiple sequence
parallel / FP8 need (`batching.seq_multiple`); that tail is a sequence of its own in
`cu_seqlens`, so no real token attends to it. What it does not: run attention (Transformer
Engine's THD attention on GPU, `model/packed_attention.py` on CPU) or split samples over DP
ranks (batching.py).

Exactness: every position sees exactly the tokens it sees in a padded row (its own sequence's
prefix), RoPE restarts at 0 per sequence (megatron applies it per `cu_seqlens` segment), and
the loss reads the same response positions; packed and padded steps agree to float rounding
(tests/batch/test_packing.py).
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_qae.batch.micro_batch import MicroBatch, Samples, round_up


def pack_by_tokens(lengths: list[int], max_tokens: int, multiple: int = 1) -> list[list[int]]:
    """Indices grouped into micro-batches whose total length, rounded up to `multiple`, is
    <= max_tokens; longest first (the order `batching.pack_by_budget` uses). A sample longer
    than the budget gets a micro-batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for idx in order:
        if current and round_up(total + lengths[idx], multiple) > max_tokens:
            batches.append(current)
            current, total = [], 0
        current.append(idx)
        total += lengths[idx]
    if current:
        batches.append(current)
    return batches


def build_packed_micro_batch(samples: Samples, indices: list[int], advantages: Samples, multiple: int = 1) -> MicroBatch:
    """samples[indices] end to end in one [1, t] row, t = their total length rounded up to
    `multiple` (at least one token of tail, so an empty pack is still a valid row); the
    tail is one more sequence in `cu_seqlens`. `advantages` is indexed like `samples`."""
    rows = [samples[i] for i in indices]
    real = sum(r.num_tokens for r in rows)
    total = round_up(max(real, 1), multiple)
    tokens = torch.zeros(1, total, dtype=torch.long)
    targets = torch.zeros(1, total, dtype=torch.long)
    position_ids = torch.zeros(1, total, dtype=torch.long)
    loss_mask, adv, rollout_lp = torch.zeros(1, total), torch.zeros(1, total), torch.zeros(1, total)
    starts, lo = [0], 0
    for i, s in zip(indices, rows):
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        tokens[0, lo: lo + p + r] = ids
        # Targets stay inside the sequence: its last token predicts nothing (0, masked).
        targets[0, lo: lo + p + r - 1] = ids[1:]
        position_ids[0, lo: lo + p + r] = torch.arange(p + r)
        resp = slice(lo + p - 1, lo + p + r - 1)
        loss_mask[0, resp] = 1.0
        adv[0, resp] = advantages[i]
        rollout_lp[0, resp] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
        lo += p + r
        starts.append(lo)
    if total > real:  # the tail: its own sequence, so no real token attends to it
        position_ids[0, real:] = torch.arange(total - real)
        starts.append(total)
    cu = torch.tensor(starts, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return MicroBatch(tokens, position_ids, targets, loss_mask, adv, rollout_lp, list(indices),
                      cu_seqlens=cu, max_seqlen=longest)


def packed_seq_params(mb: MicroBatch) -> PackedSeqParams | None:
    """megatron-core's THD parameters of a packed micro-batch (None for a padded one); the
    same on CPU and GPU. `mb` is the device copy, so `cu_seqlens` is on the model's device."""
    if mb.cu_seqlens is None:
        return None
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=mb.cu_seqlens, cu_seqlens_kv=mb.cu_seqlens,
                           max_seqlen_q=mb.max_seqlen, max_seqlen_kv=mb.max_seqlen)
