"""The trainer's weights as full HF Qwen2 tensors, in size-bounded buckets, for a weight sync.

What it does: gathers each megatron tensor from its TP shards (and, when every engine needs the
whole model, hands it along the pipeline one tensor at a time), maps it to HF Qwen2 names with
the one pure mapping (`qwen2_mapping`), and yields buckets just over a byte bound, with one
bucket and one gathered tensor alive at a time; `SyncTimes` holds a sync's seconds per phase
and bytes. Shared by both ways of pushing (weight_sync.py over a weight-update group,
colocated_sync.py by memory handles). What it does not: talk to engines or decide when to sync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_qae.model import qwen2_mapping as qm
from megatron_qae.model.policy import Policy
from megatron_qae.model.weights import full_param_specs, iter_full_params


@dataclass
class SyncTimes:
    """Seconds spent per phase of one weight sync, and bytes sent."""

    gather_s: float = 0.0
    transfer_s: float = 0.0
    engine_load_s: float = 0.0
    bytes: int = 0

    def metrics(self) -> dict[str, float]:
        total = self.gather_s + self.transfer_s + self.engine_load_s
        return {
            "sync/gather_s": self.gather_s,
            "sync/transfer_s": self.transfer_s,
            "sync/engine_load_s": self.engine_load_s,
            "sync/total_s": total,
            "sync/bytes": float(self.bytes),
            "sync/gb_per_s": self.bytes / 1e9 / total if total > 0 else 0.0,
        }


def stage_tensors(policy: Policy, all_stages: bool, all_replicas: bool = False):
    """(global megatron name, full tensor, is the last one), one tensor alive at a time;
    collective over the ranks of DP replica 0 (of every replica with `all_replicas`).

    `all_stages=False`: this rank's own stage only (the stage's TP ranks all-gather each
    tensor). `all_stages=True` (colocated: every engine needs the whole model): stage by stage,
    the stage's ranks gather one tensor and broadcast it in their PP group, the next tensor
    only after that one is handed on, so no rank ever holds a whole stage.
    """
    groups = policy.groups
    if groups.dp_rank != 0 and not all_replicas:
        return
    own = iter_full_params(policy.chunks, groups.tp)
    if not all_stages or groups.dims.pp == 1:
        count = len(full_param_specs(policy.chunks, groups.dims.tp))
        for i, (name, full) in enumerate(own):
            yield name, full, i == count - 1
        return
    for stage in range(groups.dims.pp):
        mine = groups.pp_rank == stage
        src = dist.get_global_rank(groups.pp, stage)
        # The shapes follow from the shards: no tensor is gathered just to announce it.
        meta = [full_param_specs(policy.chunks, groups.dims.tp)] if mine else [None]
        dist.broadcast_object_list(meta, src=src, group=groups.pp)
        for i, (name, shape, dtype) in enumerate(meta[0]):
            if mine:
                got, buf = next(own)
                assert got == name and buf.shape == shape, (got, name, buf.shape, shape)
            else:
                buf = torch.empty(shape, dtype=dtype, device=_device_of(policy))
            dist.broadcast(buf, src=src, group=groups.pp)
            yield name, buf, stage == groups.dims.pp - 1 and i == len(meta[0]) - 1
            buf = None  # before the next gather


def _device_of(policy: Policy) -> torch.device:
    return next(policy.chunks[0].parameters()).device


def hf_buckets(policy: Policy, bucket_bytes: int, times: SyncTimes, dtype: torch.dtype | None = None,
               all_stages: bool = False, all_replicas: bool = False, map_here: bool = True):
    """(bucket of (HF name, tensor), is the last bucket) in model order, each bucket just over
    `bucket_bytes` by at most one tensor group; one bucket and one gathered tensor are alive
    at once (the last tensor is known from the announced specs, so no bucket waits for the
    next to learn it is the last). The time spent gathering and mapping goes to
    `times.gather_s`. Collective like `stage_tensors` (this stage only unless `all_stages`);
    ranks with `map_here=False` take part in the gathers and get nothing."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size, start = 0, time.perf_counter()
    for name, full, last in stage_tensors(policy, all_stages, all_replicas):
        if not map_here:
            continue
        for hf_name, tensor in qm.megatron_to_hf(name, full, policy.hf_config):
            tensor = tensor.to(dtype) if dtype is not None else tensor
            bucket.append((hf_name, tensor))
            size += tensor.numel() * tensor.element_size()
        full = None  # the bucket holds what is needed of it
        if size >= bucket_bytes or last:
            times.gather_s += time.perf_counter() - start
            yield bucket, last
            bucket, size, start = [], 0, time.perf_counter()
