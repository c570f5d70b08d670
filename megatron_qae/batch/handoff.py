"""Lean hand-off of a rollout batch from global rank 0 to the trainer ranks.

What it does: rank 0 alone holds the rollout batch (the Ray side lives there). Instead of
pickling the whole batch to every rank, it sends each rank only its data-parallel share, as
tensors, point to point over the hand-off group (`ParallelGroups.driver`, whose wait is sized
for rollouts):
1. `hand_off_header`: the sample count and the rollout metrics (a small object, broadcast);
2. `hand_off_scores`: the (index, group id, score) of the samples whose advantage this DP rank
   reduces (`split_by_tokens` over the whole batch, as before);
3. `hand_off_train_share`: once every rank holds every advantage (the advantage all-gather in
   loop.py, the only collective over all samples), the token ids and rollout log-probs of the
   samples this DP rank trains on, per mini-batch (`batching.dispatch`, as before), plus each
   mini-batch's response-token count (the loss denominator).
Every rank of a DP rank (its TP / PP peers) gets the same share. The micro-batches built from
a share are exactly those built from the whole batch. What it does not: compute advantages,
build micro-batches, or move anything the trainer computes.

`HandoffBytes` counts what rank 0 sends per rollout step (benchmarks/bench_handoff.py).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from megatron_qae.model.parallel import ParallelGroups, broadcast_from_driver
from megatron_qae.batch.batching import dispatch, split_by_tokens
from rollout_sglang.types import RolloutBatch, Sample


@dataclass(frozen=True)
class ShareSample:
    """A sample as the trainer needs it (what `build_micro_batch` reads of a `Sample`)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    rollout_logprobs: tuple[float, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class BatchHeader:
    """What every rank learns of a rollout batch."""

    num_samples: int
    metrics: dict[str, float]
    """The rollout's flat metrics (logged by rank 0)."""


@dataclass(frozen=True)
class ScoreShare:
    """The samples one DP rank reduces advantages for; all [n]."""

    index: torch.Tensor
    """Index of each sample in the rollout batch (int64, ascending)."""
    group_ids: torch.Tensor
    """Group id of each sample (int64)."""
    scores: torch.Tensor
    """The score the baseline is taken over (reward or accuracy, algo.quantile_source; float32)."""


@dataclass(frozen=True)
class TrainShare:
    """The samples one DP rank trains on in one rollout step."""

    samples: list[dict[int, ShareSample]]
    """Per mini-batch: this rank's samples, keyed by their index in the mini-batch."""
    mine: list[list[int]]
    """Per mini-batch: those indices in the order `batching.dispatch` gave them."""
    response_tokens: list[int]
    """Per mini-batch: response tokens of the whole mini-batch over all DP ranks (loss denominator)."""


@dataclass
class HandoffBytes:
    """Bytes rank 0 sent in one rollout step's hand-off (payloads, not transport framing)."""

    sent: int = 0
    by_part: dict[str, int] = field(default_factory=dict)

    def add(self, part: str, nbytes: int) -> None:
        self.sent += nbytes
        self.by_part[part] = self.by_part.get(part, 0) + nbytes


def _send(tensors: list[torch.Tensor], dst: int, groups: ParallelGroups, stats: HandoffBytes,
          part: str) -> list[tuple[dist.Work, torch.Tensor]]:
    """Start sending `tensors` (their sizes first) to `dst`; the sends to wait for, each with
    the tensor it reads (kept alive until then)."""
    sizes = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
    started = []
    for t in (sizes, *tensors):
        if t.numel():  # gloo refuses empty messages; the receiver knows the size from `sizes`
            t = t.contiguous()
            started.append((dist.isend(t, dst=dst, group=groups.driver), t))
            stats.add(part, t.numel() * t.element_size())
    return started


def _recv(dtypes: list[torch.dtype], groups: ParallelGroups) -> list[torch.Tensor]:
    sizes = torch.zeros(len(dtypes), dtype=torch.int64)
    dist.recv(sizes, src=0, group=groups.driver)
    out = []
    for n, dtype in zip(sizes.tolist(), dtypes):
        t = torch.empty(n, dtype=dtype)
        if n:
            dist.recv(t, src=0, group=groups.driver)
        out.append(t)
    return out


def _scatter(per_dp: list[list[torch.Tensor]] | None, dtypes: list[torch.dtype], groups: ParallelGroups,
             stats: HandoffBytes, part: str) -> list[torch.Tensor]:
    """Rank 0 sends every other rank its DP rank's tensors (`per_dp[dp_rank]`), to all ranks at
    once (a slow receiver does not hold up the others); every rank returns its own."""
    if dist.get_rank() != 0:
        return _recv(dtypes, groups)
    started = [sent for dst in range(1, dist.get_world_size())
               for sent in _send(per_dp[groups.dp_rank_of[dst]], dst, groups, stats, part)]
    for work, _ in started:
        work.wait()
    return per_dp[groups.dp_rank]


def hand_off_header(batch: RolloutBatch | None, groups: ParallelGroups, stats: HandoffBytes) -> BatchHeader:
    """Rank 0's batch header on every rank; the other ranks wait here while rank 0 rolls out."""
    header = BatchHeader(len(batch.samples), dict(batch.metrics)) if batch is not None else None
    if header is not None:
        stats.add("header", len(pickle.dumps(header)) * (dist.get_world_size() - 1))
    return broadcast_from_driver(header, groups)


def score_source(quantile_source: str) -> str:
    """The Sample field the advantage baseline is taken over (algo.quantile_source)."""
    return "accuracy" if quantile_source == "accuracy" else "reward"


def hand_off_scores(samples: list[Sample] | None, source: str, groups: ParallelGroups,
                    stats: HandoffBytes) -> ScoreShare:
    """This DP rank's advantage share: the samples `split_by_tokens` gives it over the whole
    batch (`samples` on rank 0, None elsewhere)."""
    per_dp = None
    if samples is not None:
        per_dp = []
        for mine in split_by_tokens([s.num_tokens for s in samples], groups.dims.dp):
            per_dp.append([torch.tensor(mine, dtype=torch.int64),
                           torch.tensor([samples[i].group_id for i in mine], dtype=torch.int64),
                           torch.tensor([getattr(samples[i], source) for i in mine], dtype=torch.float32)])
    index, group_ids, scores = _scatter(per_dp, [torch.int64, torch.int64, torch.float32], groups, stats, "scores")
    return ScoreShare(index, group_ids, scores)


def _flat(rows: Iterable[Sequence[int | float]], dtype: type[np.generic]) -> torch.Tensor:
    """The rows end to end as one tensor: numpy converts each row's tuple in one C loop,
    instead of `torch.tensor` walking a Python list of every element (3-5x the time); the
    values are the same (float32 rounds to nearest, as `torch.tensor` does; an id beyond
    int32 raises OverflowError in both)."""
    parts = [np.asarray(row, dtype=dtype) for row in rows]
    return torch.from_numpy(np.concatenate(parts) if parts else np.empty(0, dtype=dtype))


def _train_tensors(samples: list[Sample], advantages: list[float], per_mini: int, skip_zero: bool,
                   dp: int) -> list[list[torch.Tensor]]:
    """Per DP rank: [mini-batch index + local index, mini-batch of each, prompt and response
    lengths, token ids, rollout log-probs, every mini-batch's response-token count]."""
    minis = [range(lo, min(lo + per_mini, len(samples))) for lo in range(0, len(samples), per_mini)]
    totals = torch.tensor([sum(len(samples[i].response_ids) for i in m) for m in minis], dtype=torch.int64)
    rows: list[list[tuple[int, int]]] = [[] for _ in range(dp)]
    for k, m in enumerate(minis):
        part = [samples[i] for i in m]
        for rank, mine in enumerate(dispatch([s.num_tokens for s in part], advantages[m.start: m.stop], dp, skip_zero)):
            rows[rank].extend((k, j) for j in mine)
    out = []
    for share in rows:
        picked = [samples[k * per_mini + j] for k, j in share]
        out.append([torch.tensor([j for _, j in share], dtype=torch.int64),
                    torch.tensor([k for k, _ in share], dtype=torch.int64),
                    torch.tensor([len(s.prompt_ids) for s in picked], dtype=torch.int64),
                    torch.tensor([len(s.response_ids) for s in picked], dtype=torch.int64),
                    # Token ids fit int32 (vocabularies < 2^31): half the bytes of int64.
                    _flat((ids for s in picked for ids in (s.prompt_ids, s.response_ids)), np.int32),
                    _flat((s.rollout_logprobs for s in picked), np.float32),
                    totals])
    return out


def hand_off_train_share(samples: list[Sample] | None, advantages: list[float], per_mini: int, skip_zero: bool,
                         groups: ParallelGroups, stats: HandoffBytes) -> TrainShare:
    """This DP rank's training samples of every mini-batch (`samples` on rank 0, None
    elsewhere; `advantages` of the whole batch on every rank, from the all-gather)."""
    per_dp = None if samples is None else _train_tensors(samples, advantages, per_mini, skip_zero, groups.dims.dp)
    dtypes = [torch.int64] * 4 + [torch.int32, torch.float32, torch.int64]
    local, mini, prompt_len, resp_len, tokens, logprobs, totals = _scatter(per_dp, dtypes, groups, stats, "train")
    shares: list[dict[int, ShareSample]] = [{} for _ in range(totals.numel())]
    mine: list[list[int]] = [[] for _ in range(totals.numel())]
    ids, lps = tokens.tolist(), logprobs.tolist()
    t = r = 0
    for j, k, p, n in zip(local.tolist(), mini.tolist(), prompt_len.tolist(), resp_len.tolist()):
        shares[k][j] = ShareSample(tuple(ids[t: t + p]), tuple(ids[t + p: t + p + n]), tuple(lps[r: r + n]))
        mine[k].append(j)
        t, r = t + p + n, r + n
    return TrainShare(shares, mine, totals.tolist())
