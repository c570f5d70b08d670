"""One typed shard per DP rank: how a rollout batch reaches the trainer ranks.

What it does: global rank 0 alone holds the rollout batch (the Ray side lives there). It cuts
the batch into one `TrainShard` per DP rank (`build_shards`) and sends each rank its own in one
scatter over the hand-off group (`scatter_shards`; `ParallelGroups.driver`, whose wait is sized
for rollouts: the other ranks wait there while rank 0 generates). Every TP / PP peer of a DP
rank gets the same shard. A shard holds, as flat tensors, the samples its DP rank trains on in
every mini-batch (`batching.dispatch`'s token-balanced split, exactly as before: zero-advantage
samples are left out first when skipping, so rank 0 takes the zero mask from advantage.py on
the whole batch), their (group id, score) pairs, the pairs of the skipped samples the rank
accounts for, and each mini-batch's loss denominators over all DP ranks. From its shard a rank
gets its advantages (`shard_advantages`: advantage.py's DP-aware reduction, one all-gather,
exactly the single-process values) and its micro-batches (`shard_micro_batches`: exactly those
built from the whole batch). What it does not: generate or score, compute log-probs, run the
model, or send the rollout metrics (rank 0 keeps them; it alone logs).

`HandoffBytes` counts what rank 0 sends per rollout step (benchmarks/bench_handoff.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from megatron_qae.algorithm.advantage import compute_group_advantages
from megatron_qae.batch.batching import build_micro_batches, dispatch, skip_count_metrics
from megatron_qae.batch.micro_batch import MicroBatch
from megatron_qae.config.algo import AlgoConfig
from megatron_qae.model.parallel import ParallelGroups
from rollout_sglang.types import RolloutBatch, Sample


@dataclass(frozen=True)
class ShareSample:
    """A sample as the trainer needs it (what `build_micro_batch` reads of a `Sample`)."""

    prompt_ids: tuple[int, ...]
    """Prompt token ids, [prompt_tokens]."""
    response_ids: tuple[int, ...]
    """Response token ids, [response_tokens]."""
    rollout_logprobs: tuple[float, ...]
    """The engine's log-prob (nats) of each response token, [response_tokens]."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class TrainShard:
    """One DP rank's part of a rollout step's batch; flat 1-D CPU tensors. n = samples it trains
    on (by mini-batch, each mini-batch's in `batching.dispatch` order), m = skipped samples it
    accounts for, M = the step's mini-batches (0: dynamic sampling kept no group)."""

    mini_batch: torch.Tensor
    """[n] int64: the mini-batch of each sample (0..M-1, non-decreasing)."""
    index: torch.Tensor
    """[n] int64: each sample's index within its mini-batch."""
    prompt_tokens: torch.Tensor
    """[n] int64: prompt length of each sample (tokens)."""
    response_tokens: torch.Tensor
    """[n] int64: response length of each sample (tokens)."""
    group_ids: torch.Tensor
    """[n] int64: the group of each sample."""
    skipped_group_ids: torch.Tensor
    """[m] int64: groups of the zero-advantage samples left out of training that this rank
    passes to the advantage reduction (the DP ranks together pass every sample once)."""
    mini_batch_response_tokens: torch.Tensor
    """[M] int64: response tokens of each whole mini-batch over all DP ranks, skipped samples
    included (the loss's token denominator)."""
    mini_batch_samples: torch.Tensor
    """[M] int64: samples of each whole mini-batch over all DP ranks, skipped included (the
    loss's sample denominator)."""
    mini_batch_skipped_samples: torch.Tensor
    """[M] int64: of those, the zero-advantage samples left out of training."""
    mini_batch_skipped_response_tokens: torch.Tensor
    """[M] int64: the response tokens of those left out."""
    token_ids: torch.Tensor
    """[sum(prompt_tokens + response_tokens)] int32: each sample's prompt then response ids,
    samples end to end (vocabularies < 2^31: half the bytes of int64)."""
    rollout_logprobs: torch.Tensor
    """[sum(response_tokens)] float32: the engine's log-prob (nats) of each response token."""
    scores: torch.Tensor
    """[n] float32: the score the baseline is taken over (`score_source`)."""
    skipped_scores: torch.Tensor
    """[m] float32: the scores of the skipped samples in `skipped_group_ids`."""

    @property
    def num_mini_batches(self) -> int:
        return self.mini_batch_samples.numel()


_4_BYTE = {"token_ids": torch.int32, "rollout_logprobs": torch.float32, "scores": torch.float32,
           "skipped_scores": torch.float32}
_WIRE = tuple((f.name, _4_BYTE.get(f.name, torch.int64)) for f in dataclasses.fields(TrainShard))
"""(field, dtype) in payload order: the 8-byte fields first, so every field starts aligned."""
assert [d.itemsize for _, d in _WIRE] == sorted((d.itemsize for _, d in _WIRE), reverse=True)


@dataclass(frozen=True)
class MiniBatchPlan:
    """What one DP rank trains in one mini-batch (one optimizer step)."""

    micro_batches: list[MicroBatch]
    """This rank's micro-batches (all-masked ones when it trains none of the mini-batch)."""
    response_tokens: int
    """Response tokens of the whole mini-batch over all DP ranks (loss denominator)."""
    samples: int
    """Samples of the whole mini-batch over all DP ranks (loss denominator)."""
    metrics: dict[str, float]
    """batch/* metrics: this rank's padding, the whole mini-batch's skip counts."""


@dataclass
class HandoffBytes:
    """Bytes rank 0 sent in one rollout step's hand-off (payloads, not transport framing)."""

    sent: int = 0
    """All bytes sent."""
    by_part: dict[str, int] = field(default_factory=dict)
    """Bytes per part ('sizes', 'shard')."""

    def add(self, part: str, nbytes: int) -> None:
        self.sent += nbytes
        self.by_part[part] = self.by_part.get(part, 0) + nbytes


def score_source(quantile_source: str) -> str:
    """The Sample field the advantage baseline is taken over (algo.quantile_source)."""
    return "accuracy" if quantile_source == "accuracy" else "reward"


def _advantages(scores: torch.Tensor, group_ids: torch.Tensor, algo: AlgoConfig,
                dp_group: dist.ProcessGroup | None) -> tuple[torch.Tensor, dict[str, float]]:
    return compute_group_advantages(scores, group_ids, quantile_k=algo.effective_quantile_k,
                                    quantile_method=algo.quantile_method, norm_by_std=algo.norm_adv_by_std,
                                    eps=algo.adv_eps, dp_group=dp_group)


def _flat(rows: Iterable[Sequence[int | float]], dtype: type[np.generic]) -> torch.Tensor:
    """The rows end to end as one tensor: numpy converts each row's tuple in one C loop,
    instead of `torch.tensor` walking a Python list of every element (3-5x the time); the
    values are the same (float32 rounds to nearest, as `torch.tensor` does; an id beyond
    int32 raises OverflowError in both)."""
    parts = [np.asarray(row, dtype=dtype) for row in rows]
    return torch.from_numpy(np.concatenate(parts) if parts else np.empty(0, dtype=dtype))


def _long(values: Iterable[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def _split(samples: list[Sample], zero: list[bool], per_mini: int, dp: int
           ) -> tuple[list[list[tuple[int, int]]], list[list[int]], list[list[int]]]:
    """Per DP rank: (mini-batch, index in it) of the samples it trains, in dispatch order, and
    the batch indices of the skipped samples it accounts for; per mini-batch: [response
    tokens, samples, skipped samples, skipped response tokens] of the whole mini-batch."""
    trained: list[list[tuple[int, int]]] = [[] for _ in range(dp)]
    skipped: list[list[int]] = [[] for _ in range(dp)]
    totals, n_skipped = [], 0
    for k, lo in enumerate(range(0, len(samples), per_mini)):
        part = range(lo, min(lo + per_mini, len(samples)))
        # dispatch leaves out exactly the samples given advantage 0.0: the zero-masked ones
        adv = [0.0 if zero[i] else 1.0 for i in part]
        for rank, mine in enumerate(dispatch([samples[i].num_tokens for i in part], adv, dp, True)):
            trained[rank].extend((k, j) for j in mine)
        left_out = [i for i in part if zero[i]]
        for i in left_out:  # round robin: each skipped pair is passed to the reduction once
            skipped[n_skipped % dp].append(i)
            n_skipped += 1
        totals.append([sum(len(samples[i].response_ids) for i in part), len(part), len(left_out),
                       sum(len(samples[i].response_ids) for i in left_out)])
    return trained, skipped, totals


def build_shards(samples: list[Sample], algo: AlgoConfig, samples_per_mini_batch: int,
                 skip_zero_advantage: bool, dp: int) -> list[TrainShard]:
    """One TrainShard per DP rank of the whole batch (rank 0). With `skip_zero_advantage`, the
    samples whose single-process advantage is exactly 0.0 are left out of training."""
    source = score_source(algo.quantile_source)
    scores = torch.tensor([getattr(s, source) for s in samples], dtype=torch.float32)
    gids = _long(s.group_id for s in samples)
    zero = [False] * len(samples)
    if skip_zero_advantage and samples:
        zero = (_advantages(scores, gids, algo, None)[0] == 0.0).tolist()
    trained, skipped, totals = _split(samples, zero, samples_per_mini_batch, dp)
    per_mini_totals = [_long(t[c] for t in totals) for c in range(4)]
    out = []
    for rank in range(dp):
        at = [k * samples_per_mini_batch + j for k, j in trained[rank]]
        picked = [samples[i] for i in at]
        out.append(TrainShard(
            _long(k for k, _ in trained[rank]), _long(j for _, j in trained[rank]),
            _long(len(s.prompt_ids) for s in picked), _long(len(s.response_ids) for s in picked),
            gids[at], gids[skipped[rank]], *per_mini_totals,
            _flat((ids for s in picked for ids in (s.prompt_ids, s.response_ids)), np.int32),
            _flat((s.rollout_logprobs for s in picked), np.float32), scores[at], scores[skipped[rank]]))
    return out


def _payload(shard: TrainShard) -> tuple[torch.Tensor, torch.Tensor]:
    """The shard as (element count of each field [fields] int64, all fields' bytes end to end)."""
    tensors = [getattr(shard, name).contiguous() for name, _ in _WIRE]
    sizes = _long(t.numel() for t in tensors)
    # An empty field adds no bytes (and an empty numpy-made tensor cannot be viewed as bytes).
    return sizes, torch.cat([torch.empty(0, dtype=torch.uint8), *(t.view(torch.uint8) for t in tensors if t.numel())])


def _from_payload(sizes: torch.Tensor, payload: torch.Tensor) -> TrainShard:
    fields, at = {}, 0
    for (name, dtype), n in zip(_WIRE, sizes.tolist()):
        nbytes = n * dtype.itemsize
        fields[name] = payload[at: at + nbytes].view(dtype)
        at += nbytes
    return TrainShard(**fields)


def scatter_shards(batch: RolloutBatch | None, algo: AlgoConfig, samples_per_mini_batch: int,
                   skip_zero_advantage: bool, groups: ParallelGroups, sent: HandoffBytes) -> TrainShard:
    """This rank's shard (`batch` on rank 0, None elsewhere): rank 0 sends every other rank its
    DP rank's shard, to all at once (a slow receiver does not hold up the others), each as its
    field sizes then one payload; the other ranks wait here while rank 0 rolls out."""
    if dist.get_rank() != 0:
        sizes = torch.zeros(len(_WIRE), dtype=torch.int64)
        dist.recv(sizes, src=0, group=groups.driver)
        payload = torch.empty(sum(n * d.itemsize for (_, d), n in zip(_WIRE, sizes.tolist())), dtype=torch.uint8)
        if payload.numel():  # gloo refuses empty messages; the size says there is none
            dist.recv(payload, src=0, group=groups.driver)
        return _from_payload(sizes, payload)
    assert batch is not None, "rank 0 hands off the rollout batch it generated"
    shards = build_shards(batch.samples, algo, samples_per_mini_batch, skip_zero_advantage, groups.dims.dp)
    payloads = [_payload(s) for s in shards]
    started = []
    for dst in range(1, dist.get_world_size()):
        for part, t in zip(("sizes", "shard"), payloads[groups.dp_rank_of[dst]]):
            if t.numel():
                started.append((dist.isend(t, dst=dst, group=groups.driver), t))
                sent.add(part, t.numel() * t.element_size())
    for work, _ in started:
        work.wait()
    return shards[groups.dp_rank]


def shard_advantages(shard: TrainShard, algo: AlgoConfig, dp_group: dist.ProcessGroup | None
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages [n] float32 of the shard's trained samples and the adv/* metrics over every
    sample of the batch: each DP rank passes its shard's (group, score) pairs, trained and
    accounted-for skipped, to advantage.py's DP-aware reduction (one all-gather); nothing,
    and no collective, when the step has no mini-batch."""
    if not shard.num_mini_batches:
        return torch.zeros(0), {}
    n = shard.scores.numel()
    adv, metrics = _advantages(torch.cat([shard.scores, shard.skipped_scores]),
                               torch.cat([shard.group_ids, shard.skipped_group_ids]), algo, dp_group)
    # Rank 0 left these out on its single-process advantages; the reduction must agree bit for bit.
    assert bool((adv[n:] == 0.0).all()), f"skipped samples got advantages {adv[n:].tolist()[:8]}"
    return adv[:n], metrics


def _mini_batch_rows(shard: TrainShard, advantages: torch.Tensor
                     ) -> list[tuple[dict[int, ShareSample], dict[int, float], list[int]]]:
    """Per mini-batch: this rank's samples and advantages keyed by index in the mini-batch, and
    those indices in dispatch order."""
    rows: list[tuple[dict[int, ShareSample], dict[int, float], list[int]]] = [
        ({}, {}, []) for _ in range(shard.num_mini_batches)]
    ids, lps, advs = shard.token_ids.tolist(), shard.rollout_logprobs.tolist(), advantages.tolist()
    t = r = 0
    for a, k, j, p, n in zip(advs, shard.mini_batch.tolist(), shard.index.tolist(),
                             shard.prompt_tokens.tolist(), shard.response_tokens.tolist(), strict=True):
        samples, adv, mine = rows[k]
        samples[j] = ShareSample(tuple(ids[t: t + p]), tuple(ids[t + p: t + p + n]), tuple(lps[r: r + n]))
        adv[j] = a
        mine.append(j)
        t, r = t + p + n, r + n
    return rows


def shard_micro_batches(shard: TrainShard, advantages: torch.Tensor, max_tokens: int, seq_multiple: int = 1,
                        count_multiple: int = 1, pack: bool = False) -> list[MiniBatchPlan]:
    """This rank's micro-batches of every mini-batch (`batching.build_micro_batches` on its
    share: exactly those built from the whole batch), with the loss denominators."""
    plans = []
    totals = zip(shard.mini_batch_response_tokens.tolist(), shard.mini_batch_samples.tolist(),
                 shard.mini_batch_skipped_samples.tolist(), shard.mini_batch_skipped_response_tokens.tolist())
    for (samples, adv, mine), (tokens, n, skipped, skipped_tokens) in zip(_mini_batch_rows(shard, advantages), totals):
        mbs, metrics = build_micro_batches(samples, adv, mine, max_tokens, seq_multiple, count_multiple, pack)
        plans.append(MiniBatchPlan(mbs, tokens, n, {**metrics, **skip_count_metrics(skipped, n, skipped_tokens)}))
    return plans
