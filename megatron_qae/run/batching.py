"""From samples to padded micro-batches: DP dispatch by tokens and token-budget packing.

What it does: splits a mini-batch's samples over data-parallel ranks so every rank gets about
the same token count, and packs one rank's samples into micro-batches bounded by a
max-tokens budget (longest first, so padding stays small). Builds the tensors the train step
needs, aligned to next-token prediction. What it does not: compute advantages or log-probs,
or run the model.

Alignment: position p predicts token p+1. A sample with prompt length P and response length R
has its response log-probs at positions P-1 .. P+R-2; `loss_mask` is 1 exactly there.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass

import torch

from rollout_sglang.types import Sample


@dataclass(frozen=True)
class MicroBatch:
    """One padded micro-batch; all tensors [b, s] unless noted (s = longest sample here).

    Frozen: the train step works on device copies, so anything computed from a micro-batch
    comes back as a return value (`with_old_logprobs` makes the new micro-batches)."""

    tokens: torch.Tensor
    """Prompt + response token ids, right-padded with 0 (int64)."""
    position_ids: torch.Tensor
    """0..s-1 per row (int64)."""
    targets: torch.Tensor
    """tokens shifted left by one (next-token targets, int64)."""
    loss_mask: torch.Tensor
    """1.0 where `targets` is a response token, else 0.0."""
    advantages: torch.Tensor
    """Sequence advantage broadcast to its response positions (float32)."""
    rollout_logprobs: torch.Tensor
    """Engine log-probs of the response tokens at their positions (float32)."""
    sample_index: list[int]
    """Index of each row in the list of samples the micro-batch was built from."""
    old_logprobs: torch.Tensor | None = None
    """Trainer log-probs before this rollout step's updates (`compute_logprobs`), 0 outside
    the response; None until `with_old_logprobs` attaches them."""
    ref_logprobs: torch.Tensor | None = None
    """Reference policy log-probs (KL penalty), 0 outside the response; None without KL."""
    cov_selected: torch.Tensor | None = None
    """1.0 on the tokens the Clip-Cov / KL-Cov selection picked (run/token_selection.py)."""

    @property
    def num_response_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    @property
    def padded_tokens(self) -> int:
        return self.tokens.numel()

    def to(self, device: torch.device) -> MicroBatch:
        """A copy with every tensor on `device`; the same step on CPU and GPU (on CPU the
        tensors are shared, the micro-batch object is still a new one)."""
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True)
                 for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)


def with_old_logprobs(mbs: list[MicroBatch], old: list[torch.Tensor | None]) -> list[MicroBatch]:
    """New micro-batches carrying the old log-probs `compute_logprobs` returned for them
    (None on pipeline stages that do not compute log-probs)."""
    if len(mbs) != len(old):
        raise ValueError(f"{len(old)} old log-prob tensors for {len(mbs)} micro-batches")
    return [dataclasses.replace(mb, old_logprobs=lp) for mb, lp in zip(mbs, old)]


def with_ref_logprobs(mbs: list[MicroBatch], ref: list[torch.Tensor | None]) -> list[MicroBatch]:
    """New micro-batches carrying the reference policy's log-probs (KL penalty)."""
    if len(mbs) != len(ref):
        raise ValueError(f"{len(ref)} reference log-prob tensors for {len(mbs)} micro-batches")
    return [dataclasses.replace(mb, ref_logprobs=lp) for mb, lp in zip(mbs, ref)]


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


def seq_multiple(tp: int) -> int:
    """What every micro-batch's sequence length is padded to a multiple of: lcm(16, tp).

    Sequence parallel scatters the [s, b, h] activations over TP ranks along s (s % tp == 0),
    and Transformer Engine's FP8 GEMMs need the token dimension % 16. Applied on CPU too, so
    the CPU run pads exactly like the GPU run."""
    return math.lcm(16, tp)


def schedule_multiple(pp: int, vpp: int | None) -> int:
    """What a rank's micro-batch count must be a multiple of for megatron's schedule.

    The interleaved (VPP) schedule runs micro-batches in groups of
    `microbatch_group_size_per_vp_stage` (default pp) and refuses a count below the group size
    or with a remainder in 1..pp-1 (megatron-core 0.19 pipeline_parallel/schedules.py,
    forward_backward_pipelining_with_interleaving): the count must be a positive multiple of
    pp. The other schedules take any count >= 1."""
    return pp if vpp else 1


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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
        longest = _round_up(lengths[current[0]] if current else lengths[idx], multiple)
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
    target = max(_round_up(len(packs), count_multiple), count_multiple)
    while len(packs) < target:
        widest = max(range(len(packs)), key=lambda i: len(packs[i])) if packs else None
        if widest is None or len(packs[widest]) < 2:
            packs.append([])
            continue
        rows = packs.pop(widest)
        packs[widest:widest] = [rows[: len(rows) // 2], rows[len(rows) // 2:]]
    return packs


def build_micro_batch(
    samples: list[Sample], indices: list[int], advantages: list[float], multiple: int = 1
) -> MicroBatch:
    """Padded tensors of samples[indices]; `advantages` is indexed like `samples`; the
    sequence length is the longest sample rounded up to `multiple` (`seq_multiple`)."""
    rows = [samples[i] for i in indices]
    if not rows:
        return empty_micro_batch(multiple)
    seq = _round_up(max(r.num_tokens for r in rows), multiple)
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


def rank_micro_batches(
    samples: list[Sample],
    advantages: list[float],
    dp_rank: int,
    dp: int,
    max_tokens: int,
    skip_zero_advantage: bool = False,
    seq_multiple: int = 1,
    count_multiple: int = 1,
) -> tuple[list[MicroBatch], dict[str, float]]:
    """This DP rank's micro-batches of one mini-batch, plus padding / skip metrics.

    With `skip_zero_advantage`, samples whose advantage is exactly 0 are left out before the
    DP split (they contribute exactly zero gradient when the loss has no KL / entropy term);
    the caller keeps the full mini-batch's token count as the loss denominator. Sequence
    lengths are padded to `seq_multiple`; the micro-batch count is a positive multiple of
    `count_multiple` (`schedule_multiple`), so a rank without samples still gets all-masked
    micro-batches that keep it in step with its peers' collectives.
    """
    keep = [i for i in range(len(samples)) if not (skip_zero_advantage and advantages[i] == 0.0)]
    lengths = [samples[i].num_tokens for i in keep]
    mine = [keep[j] for j in split_by_tokens(lengths, dp)[dp_rank]]
    packs = pack_by_budget([samples[i].num_tokens for i in mine], max_tokens, seq_multiple)
    packs = split_to_count(packs, count_multiple)
    mbs = [build_micro_batch(samples, [mine[j] for j in pack], advantages, seq_multiple) for pack in packs]
    real = sum(samples[i].num_tokens for i in mine)
    padded = sum(mb.padded_tokens for mb in mbs)
    skipped = [i for i in range(len(samples)) if i not in set(keep)]
    metrics = {
        "batch/padding_frac": 1.0 - real / padded if padded else 0.0,
        "batch/skipped_samples_frac": len(skipped) / max(len(samples), 1),
        "batch/skipped_response_tokens": float(sum(len(samples[i].response_ids) for i in skipped)),
        "batch/micro_batches": float(len(mbs)),
    }
    return mbs, metrics


def response_tokens(samples: list[Sample]) -> int:
    """Loss denominator of a mini-batch: all its response tokens, skipped samples included."""
    return sum(len(s.response_ids) for s in samples)


def empty_micro_batch(multiple: int = 1) -> MicroBatch:
    """A one-row micro-batch with an all-zero loss mask, its length padded like any other
    (`seq_multiple`): it keeps a rank that got no samples in step with the collectives of its
    peers while adding exactly zero gradient."""
    seq = _round_up(2, multiple)
    zeros = torch.zeros(1, seq)
    ids = torch.zeros(1, seq, dtype=torch.long)
    pos = torch.arange(seq, dtype=torch.long)[None]
    return MicroBatch(ids, pos, ids.clone(), zeros, zeros.clone(), zeros.clone(), [])
