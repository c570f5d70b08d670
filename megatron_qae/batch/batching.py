"""From samples to micro-batches: DP dispatch by tokens and token-budget grouping.

What it does: splits a mini-batch's samples over data-parallel ranks so every rank gets about
the same token count, and groups one rank's samples into micro-batches bounded by a
max-tokens budget (longest first): padded (one row per sample, here) or packed (one row per
micro-batch, packing.py). Builds the tensors the train step needs, aligned to next-token
prediction. What it does not: compute advantages or log-probs,
or run the model.

Alignment: position p predicts token p+1. A sample with prompt length P and response length R
has its response log-probs at positions P-1 .. P+R-2; `loss_mask` is 1 exactly there.
"""

from __future__ import annotations

import heapq
import math

import torch

from megatron_qae.batch.micro_batch import (MicroBatch, Samples, round_up, with_old_logprobs,  # noqa: F401 (re-exported)
                                         with_ref_logprobs)
from megatron_qae.batch.packing import build_packed_micro_batch, pack_by_tokens
from rollout_sglang.types import Sample


def split_by_tokens(lengths: list[int], parts: int) -> list[list[int]]:
    """Indices of `lengths` split into `parts` lists of about equal total length.

    Greedy longest-first onto the least-loaded part; deterministic (ties by part index).
    """
    heap = [(0, part) for part in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for idx in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, part = heapq.heappop(heap)
        out[part].append(idx)
        heapq.heappush(heap, (load + lengths[idx], part))
    return [sorted(ix) for ix in out]


def seq_multiple(tp: int, sequence_parallel: bool = False, fp8: bool = False) -> int:
    """What every micro-batch row (padded row, packed THD row, the empty filler) is padded to a
    multiple of: lcm(16, tp), or lcm(16, 8 * tp) with FP8 and sequence parallel both on.

    Sequence parallel scatters the [s, b, h] activations over TP ranks along s (s % tp == 0),
    and Transformer Engine's FP8 GEMMs need the token dimension % 16. Under sequence parallel
    TE checks FP8's rule on each TP rank's local shard, before its all-gather: TE 2.20.2
    pytorch/module/layernorm_linear.py:174-184 views the local [s/tp, b, h] input and
    pytorch/utils.py:704-714 (`assert_dim_for_fp8_exec`) requires the product of all dims but
    the last to be divisible by 8; megatron-core 0.19.2 extensions/transformer_engine.py:1266
    builds TELayerNormColumnParallelLinear with `sequence_parallel`. A row of s tokens leaves
    s / tp on each rank, so s % (8 * tp) == 0 makes every shard pass whatever the row count
    (at tp=8, lcm(16, 8) = 16 would leave 2 tokens a rank). Applied on CPU too, so the CPU run
    pads exactly like the GPU run."""
    return math.lcm(16, 8 * tp if sequence_parallel and fp8 else tp)


def schedule_multiple(pp: int, vpp: int | None) -> int:
    """What a rank's micro-batch count must be a multiple of for megatron's schedule.

    The interleaved (VPP) schedule runs micro-batches in groups of
    `microbatch_group_size_per_vp_stage` (default pp) and refuses a count below the group size
    or with a remainder in 1..pp-1 (megatron-core 0.19 pipeline_parallel/schedules.py,
    forward_backward_pipelining_with_interleaving): the count must be a positive multiple of
    pp. The other schedules take any count >= 1."""
    return pp if vpp else 1


def pack_by_budget(lengths: list[int], max_tokens: int, multiple: int = 1) -> list[list[int]]:
    """Indices grouped into micro-batches whose padded size (rows * longest, the longest
    rounded up to `multiple`) <= max_tokens.

    Sorted longest first, so each micro-batch holds samples of similar length.
    A sample longer than the budget gets a micro-batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for idx in order:
        longest = round_up(lengths[current[0]] if current else lengths[idx], multiple)
        if current and longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(idx)
    if current:
        batches.append(current)
    return batches


def split_to_count(packs: list[list[int]], count_multiple: int) -> list[list[int]]:
    """Split the packs with the most rows in two until their number is a positive multiple
    of `count_multiple`; empty packs make up the rest when no pack has two rows left."""
    packs = [list(p) for p in packs]
    target = max(round_up(len(packs), count_multiple), count_multiple)
    while len(packs) < target:
        widest = max(range(len(packs)), key=lambda i: len(packs[i])) if packs else None
        if widest is None or len(packs[widest]) < 2:
            packs.append([])
            continue
        rows = packs.pop(widest)
        packs[widest:widest] = [rows[: len(rows) // 2], rows[len(rows) // 2:]]
    return packs


def build_micro_batch(samples: Samples, indices: list[int], advantages: Samples, multiple: int = 1) -> MicroBatch:
    """Padded tensors of samples[indices]; `advantages` is indexed like `samples`; the
    sequence length is the longest sample rounded up to `multiple` (`seq_multiple`)."""
    rows = [samples[i] for i in indices]
    if not rows:
        return empty_micro_batch(multiple)
    seq = round_up(max(r.num_tokens for r in rows), multiple)
    b = len(rows)
    tokens = torch.zeros(b, seq, dtype=torch.long)
    loss_mask = torch.zeros(b, seq)
    adv = torch.zeros(b, seq)
    rollout_lp = torch.zeros(b, seq)
    for row, (i, s) in enumerate(zip(indices, rows)):
        p, r = len(s.prompt_ids), len(s.response_ids)
        tokens[row, : p + r] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        loss_mask[row, p - 1 : p + r - 1] = 1.0
        adv[row, p - 1 : p + r - 1] = advantages[i]
        rollout_lp[row, p - 1 : p + r - 1] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    position_ids = torch.arange(seq, dtype=torch.long)[None].expand(b, -1).contiguous()
    return MicroBatch(tokens, position_ids, targets, loss_mask, adv, rollout_lp, list(indices))


def dispatch(lengths: list[int], advantages: list[float], dp: int, skip_zero_advantage: bool) -> list[list[int]]:
    """Indices of a mini-batch's samples each DP rank trains on (`lengths` = tokens per sample).

    With `skip_zero_advantage`, samples whose advantage is exactly 0 are left out before the
    DP split (they contribute exactly zero gradient when the loss has no KL / entropy term);
    the caller keeps the full mini-batch's token count as the loss denominator.
    """
    keep = [i for i in range(len(lengths)) if not (skip_zero_advantage and advantages[i] == 0.0)]
    return [[keep[j] for j in part] for part in split_by_tokens([lengths[i] for i in keep], dp)]


def build_micro_batches(
    samples: Samples,
    advantages: Samples,
    mine: list[int],
    max_tokens: int,
    seq_multiple: int = 1,
    count_multiple: int = 1,
    pack: bool = False,
) -> tuple[list[MicroBatch], dict[str, float]]:
    """Micro-batches of samples[mine] (`samples` / `advantages` indexed by mini-batch index:
    a list, or a dict holding only this rank's share), plus padding metrics.

    Sequence lengths are padded to `seq_multiple`; the micro-batch count is a positive
    multiple of `count_multiple` (`schedule_multiple`), so a rank without samples still gets
    all-masked micro-batches that keep it in step with its peers' collectives. With `pack`
    the micro-batches are packed rows (train.pack_sequences), else padded ones.
    """
    group, build = (pack_by_tokens, build_packed_micro_batch) if pack else (pack_by_budget, build_micro_batch)
    packs = split_to_count(group([samples[i].num_tokens for i in mine], max_tokens, seq_multiple), count_multiple)
    mbs = [build(samples, [mine[j] for j in p], advantages, seq_multiple) for p in packs]
    real = sum(samples[i].num_tokens for i in mine)
    padded = sum(mb.padded_tokens for mb in mbs)
    return mbs, {"batch/padding_frac": 1.0 - real / padded if padded else 0.0,
                 "batch/micro_batches": float(len(mbs))}


def skip_metrics(samples: list[Sample], advantages: list[float], skip_zero_advantage: bool) -> dict[str, float]:
    """Share of a mini-batch's samples (and their response tokens) left out as zero-advantage."""
    skipped = [i for i in range(len(samples)) if skip_zero_advantage and advantages[i] == 0.0]
    return skip_count_metrics(len(skipped), len(samples), sum(len(samples[i].response_ids) for i in skipped))


def skip_count_metrics(skipped: int, samples: int, skipped_response_tokens: int) -> dict[str, float]:
    """`skip_metrics` from the counts: `skipped` of a mini-batch's `samples` left out, with
    their `skipped_response_tokens`."""
    return {"batch/skipped_samples_frac": skipped / max(samples, 1),
            "batch/skipped_response_tokens": float(skipped_response_tokens)}


def rank_micro_batches(
    samples: list[Sample],
    advantages: list[float],
    dp_rank: int,
    dp: int,
    max_tokens: int,
    skip_zero_advantage: bool = False,
    seq_multiple: int = 1,
    count_multiple: int = 1,
    pack: bool = False,
) -> tuple[list[MicroBatch], dict[str, float]]:
    """This DP rank's micro-batches of one mini-batch, plus padding / skip metrics, from the
    whole mini-batch (`dispatch` then `build_micro_batches`)."""
    mine = dispatch([s.num_tokens for s in samples], advantages, dp, skip_zero_advantage)[dp_rank]
    mbs, metrics = build_micro_batches(samples, advantages, mine, max_tokens, seq_multiple, count_multiple, pack)
    return mbs, {**metrics, **skip_metrics(samples, advantages, skip_zero_advantage)}


def response_tokens(samples: list[Sample]) -> int:
    """Loss denominator of a mini-batch: all its response tokens, skipped samples included."""
    return sum(len(s.response_ids) for s in samples)


def empty_micro_batch(multiple: int = 1) -> MicroBatch:
    """A one-row micro-batch with an all-zero loss mask, its length padded like any other
    (`seq_multiple`): it keeps a rank that got no samples in step with the collectives of its
    peers while adding exactly zero gradient."""
    seq = round_up(2, multiple)
    zeros = torch.zeros(1, seq)
    ids = torch.zeros(1, seq, dtype=torch.long)
    pos = torch.arange(seq, dtype=torch.long)[None]
    return MicroBatch(ids, pos, ids.clone(), zeros, zeros.clone(), zeros.clone(), [])
