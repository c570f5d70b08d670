"""Colocated weight sync: engines share the trainer's devices and read its tensors in place.

What it does: every trainer rank hosts one engine TP rank (engine e on trainer ranks
[e*engine_tp, (e+1)*engine_tp), the same node and GPUs). `engine_placements` tells the
rollout manager where each engine must run. `ColocatedSync.push` gathers the full HF tensors
on every rank (TP all-gather, PP broadcast one tensor at a time, all DP replicas), packs each bucket into one
buffer per dtype, and sends SGLang's `/update_weights_from_tensor` with one serialized entry
per engine TP rank, inside one weight-update session per engine (`/begin_weight_update` ...
`/end_weight_update`): only memory handles travel (CUDA IPC on GPU, shared memory on CPU), no
copy through a process group. An engine that refuses (the session or an update) is returned
(`PushOutcome`) with its URL and SGLang's message, not raised, so every rank finishes the
collective and the placement can restart the engine and push again.
What it does not: release / resume engine memory (placement.py's `Colocated` asks the rollout
manager) or start engines.
"""

from __future__ import annotations

import logging
import socket
import time

import torch
import torch.distributed as dist

from megatron_qae.model.policy import Policy
from megatron_qae.sync.hf_buckets import SyncTimes, hf_buckets
from megatron_qae.sync.weight_sync import PushOutcome
from rollout_sglang.sglang.client import EngineError, SGLangClient
from rollout_sglang.sglang.tensor_payload import pack_bucket, serialize_named_tensors
from rollout_sglang.types import EnginePlacement

log = logging.getLogger(__name__)


def check_colocated_layout(world: int, num_engines: int, engine_tp: int) -> None:
    if num_engines * engine_tp != world:
        raise ValueError(
            f"engine.num_engines={num_engines} x engine.engine_tp={engine_tp} = "
            f"{num_engines * engine_tp} but colocated engines need one engine TP rank per trainer "
            f"rank ({world}); set engine.num_engines={world // engine_tp}"
            if world % engine_tp == 0 else
            f"engine.engine_tp={engine_tp} must divide the trainer world size {world} when colocated")


def engine_placements(num_engines: int, engine_tp: int) -> list[EnginePlacement]:
    """Node and device of each engine, from its trainer ranks (collective over all ranks)."""
    world = dist.get_world_size()
    check_colocated_layout(world, num_engines, engine_tp)
    device = ""
    if torch.cuda.is_available():
        device = f"GPU-{torch.cuda.get_device_properties(torch.cuda.current_device()).uuid}"
    ranks: list = [None] * world
    dist.all_gather_object(ranks, (socket.gethostname(), device))
    out = []
    for e in range(num_engines):
        mine = ranks[e * engine_tp: (e + 1) * engine_tp]
        hosts = {h for h, _ in mine}
        if len(hosts) != 1:
            raise ValueError(f"colocated engine {e} would span nodes {sorted(hosts)}: engine.engine_tp="
                             f"{engine_tp} must divide the trainer ranks per node")
        out.append(EnginePlacement(hosts.pop(), tuple(d for _, d in mine if d)))
    return out


class ColocatedSync:
    """One trainer rank's side of colocated weight sync (create on every rank, same order)."""

    def __init__(self, num_engines: int, engine_tp: int, timeout_s: float, api_key: str | None = None) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        check_colocated_layout(world, num_engines, engine_tp)
        self.engine_tp, self.timeout_s, self.api_key = engine_tp, timeout_s, api_key
        self.engine_index = rank // engine_tp
        self.first_rank = self.engine_index * engine_tp
        self.is_poster = rank == self.first_rank
        self.group = None
        self.buffers: dict[torch.dtype, torch.Tensor] = {}  # reused shared-memory buckets (CPU)
        for e in range(num_engines):  # every rank creates every group (new_group is collective)
            g = dist.new_group(list(range(e * engine_tp, (e + 1) * engine_tp)))
            if e == self.engine_index:
                self.group = g

    def push(self, policy: Policy, urls: list[str], version: int, bucket_bytes: int,
             dtype: torch.dtype | None = None, api_key: str | None = None) -> tuple[SyncTimes, PushOutcome]:
        """Send every weight to this rank's engine; returns the times and whether this rank's
        engine accepted all (its first refusal otherwise). `api_key` is the engines' key
        (defaults to the one given at construction)."""
        client = None
        if self.is_poster:
            client = SGLangClient(urls[self.engine_index], timeout_s=self.timeout_s,
                                  api_key=api_key or self.api_key)
        times = SyncTimes()
        outcome = _call(client, client.begin_weight_update) if client is not None else PushOutcome()
        opened = client is not None and outcome.ok
        for bucket, last in hf_buckets(policy, bucket_bytes, times, dtype, all_stages=True, all_replicas=True):
            outcome = outcome.merged(self._send(client if outcome.ok else None, bucket, version, times, flush=last))
        if opened:  # also after a refused update, so the next push can open a session
            outcome = outcome.merged(_call(client, client.end_weight_update))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the freed blocks back before the engine resumes its cache
        return times, outcome

    def _send(self, client: SGLangClient | None, bucket, version: int, times: SyncTimes,
              flush: bool) -> PushOutcome:
        """One bucket by handle: every TP rank's serialized entry to the poster, which sends
        them to `client` (None: this rank posts nothing, or a refusal came first)."""
        t0 = time.perf_counter()
        packed = pack_bucket(bucket, self.buffers)
        text = serialize_named_tensors(packed)
        texts = [text]
        if self.engine_tp > 1:
            texts = [None] * self.engine_tp if self.is_poster else None
            dist.gather_object(text, texts, dst=self.first_rank, group=self.group)
        t1 = time.perf_counter()
        outcome = PushOutcome()
        if client is not None:
            outcome = _call(client, lambda: client.update_weights_from_tensor(
                texts, flush_cache=flush, weight_version=str(version)))
        if self.engine_tp > 1:
            dist.barrier(group=self.group)  # the engine has read every rank's buffer: free them
        times.transfer_s += t1 - t0
        times.engine_load_s += time.perf_counter() - t1
        times.bytes += sum(t.numel() * t.element_size() for _, t in packed)
        return outcome


def _call(client: SGLangClient, request) -> PushOutcome:
    """`request()`; a refusal is logged and returned with the engine and SGLang's message
    instead of raised (the other ranks are in this push's collectives too)."""
    try:
        request()
        return PushOutcome()
    except EngineError as exc:
        log.warning("colocated weight sync to engine %s refused: %s", client.base_url, exc)
        return PushOutcome(f"engine {client.base_url} refused a colocated weight update: {exc}")
