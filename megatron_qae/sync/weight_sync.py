"""Push the trainer's weights to the rollout engines after each step.

What it does: gathers TP shards (all-gather in the TP group) and pipeline stages (broadcast in
the PP group to global rank 0), maps megatron tensors to HF Qwen2 names with the one pure
mapping, and sends them in size-bounded buckets inside one weight-update session per engine
(`/begin_weight_update` ... `/end_weight_update`, required by SGLang >= 0.5.21): the engines
are told the names / dtypes / shapes over HTTP (`/update_weights_from_distributed`) while
rank 0 broadcasts the tensors over the weight-update group that joins it with every engine
rank. No broadcast starts before every engine has opened its session; an engine that refuses
(its 400 arrives before it would join the broadcast) stops the push at once with an error
naming the engine and SGLang's message, instead of leaving rank 0 waiting in the broadcast.
Every reply is awaited with a deadline and a /health watch: an engine that stops answering
(stopped, wedged) fails the push within seconds and is listed in `link.hung`, so the loop has
the rollout manager kill and restart it before the push is repeated.
Timed per phase. What it does not: decide when to sync (the loop does) or start engines (the
rollout manager does).

Every trainer rank calls `push`; only data-parallel replica 0 takes part in the gathers, and
only global rank 0 talks to the engines.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_qae.model import qwen2_mapping as qm
from megatron_qae.model.policy import Policy
from megatron_qae.model.weights import iter_full_params
from rollout_sglang.client import EngineError, SGLangClient
from rollout_sglang.watchdog import EngineHung, HealthWatch, WatchPolicy, wait_watching
from rollout_sglang.weight_group import destroy_weight_group, init_weight_group

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


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


@dataclass
class EngineLink:
    """Rank 0's side of the weight-update group with a set of engines."""

    clients: list[SGLangClient]
    group: dist.ProcessGroup
    group_name: str
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(8))
    failed: str | None = None
    """Why the last push did not reach every engine (the group must then be re-formed)."""
    abandoned: list[tuple[dist.Work, list[torch.Tensor]]] = field(default_factory=list)
    """Broadcasts (and their tensors) left in flight when an engine refused mid-push: the
    group is not destroyed while they may still block in it."""
    watch: WatchPolicy = field(default_factory=lambda: WatchPolicy(0.0, 600.0))
    """Deadline of each engine reply (floor_s) and how a hung engine is found."""
    hung: dict[str, float] = field(default_factory=dict)
    """Engines found hung during a push: {url: seconds without a /health answer}."""


def connect_engines(
    endpoints: list[tuple[str, int]],
    master_address: str,
    master_port: int,
    backend: str,
    timeout_s: float,
    api_key: str | None = None,
    watch: WatchPolicy | None = None,
) -> EngineLink:
    """Form the weight-update group: rank 0 = this process, engine i's TP ranks after it.
    `watch` probes the engines while their replies are awaited (default: probes every 2 s,
    each reply's deadline `timeout_s`)."""
    clients = [SGLangClient(url, timeout_s=timeout_s, api_key=api_key) for url, _ in endpoints]
    world = 1 + sum(tp for _, tp in endpoints)
    group_name = f"qae_weights_{uuid.uuid4().hex[:8]}"
    pool = ThreadPoolExecutor(max(8, len(clients)))
    offsets = [1 + sum(tp for _, tp in endpoints[:i]) for i in range(len(endpoints))]
    futures = [
        pool.submit(c.init_weights_update_group, master_address, master_port, off, world,
                    group_name, backend)
        for c, off in zip(clients, offsets)
    ]
    group = init_weight_group(master_address, master_port, 0, world, group_name, backend, timeout_s)
    for f in futures:
        f.result()
    return EngineLink(clients, group, group_name, pool, watch=watch or WatchPolicy(0.0, timeout_s))


def disconnect(link: EngineLink) -> None:
    """Drop the weight-update group (engines re-join a new one after a restart)."""
    if any(not work.is_completed() for work, _ in link.abandoned):
        # Destroying a group waits for its queued work, which may wait for an engine that
        # refused: leave it to the process' exit rather than block the trainer here.
        log.warning("left weight group %s undestroyed: a refused push left a broadcast in flight",
                    link.group_name)
    else:
        destroy_weight_group(link.group)
    link.pool.shutdown(wait=False)


def _each_client(link: EngineLink, call, what: str) -> list[SGLangClient]:
    """`call(client)` on every engine at once; returns the clients that accepted and sets
    `link.failed` (naming the engine and its message) for the first refusal."""
    futures = [(c, link.pool.submit(call, c)) for c in link.clients]
    accepted = []
    for c, f in futures:
        try:
            _wait(link, c, f, what)
            accepted.append(c)
        except EngineError as exc:
            link.failed = link.failed or f"engine {c.base_url} did not accept {what}: {exc}"
    return accepted


def _open_sessions(link: EngineLink) -> list[SGLangClient]:
    """Open a weight-update session on every engine; on any refusal close the ones opened
    (so no engine is left in a session) and leave `link.failed` set."""
    opened = _each_client(link, SGLangClient.begin_weight_update,
                          "a weight-update session (/begin_weight_update)")
    if link.failed:
        _close_sessions(link, opened)
        return []
    return opened


def _wait(link: EngineLink, client: SGLangClient, future, what: str) -> None:
    """Wait for one engine's reply within the link's deadline; a hung engine (no /health
    answer) raises EngineHung at once and is recorded in `link.hung`."""
    try:
        wait_watching([(client, future)], link.watch, link.watch.floor_s, what)
    except EngineHung as exc:
        link.hung[client.base_url] = exc.stuck_s
        raise


def _close_sessions(link: EngineLink, opened: list[SGLangClient], timeout_s: float | None = None) -> None:
    """End the sessions of `opened` (a hung engine is left to be killed); a refusal sets
    `link.failed` (the engine and why)."""
    for c in opened:
        if c.base_url in link.hung:
            continue
        try:
            c.end_weight_update(timeout_s)
        except EngineError as exc:
            link.failed = link.failed or f"engine {c.base_url} refused to end the weight update: {exc}"


def _send_bucket(link: EngineLink, bucket: list[tuple[str, torch.Tensor]], version: int,
                 times: SyncTimes, flush: bool) -> None:
    """Broadcast one bucket while the engines receive it; a dead engine (gloo raises at once)
    or a refused request sets `link.failed` instead of raising, so the trainer ranks still
    finish the push's collectives and the loop can restart the engine and push again."""
    if link.failed:
        return
    names = [n for n, _ in bucket]
    dtypes = [_DTYPE_NAMES[t.dtype] for _, t in bucket]
    shapes = [list(t.shape) for _, t in bucket]
    futures = [
        link.pool.submit(c.update_weights_from_distributed, names, dtypes, shapes,
                         link.group_name, flush, str(version))
        for c in link.clients
    ]
    start = time.perf_counter()
    _broadcast_watching(link, [t.contiguous() for _, t in bucket], futures)
    sent = time.perf_counter()
    # After a failed broadcast the live engines wait for tensors that will not come; they are
    # released (with an error) when the loop destroys this group, so do not wait for them.
    for c, f in zip(link.clients, futures if not link.failed else []):
        try:
            _wait(link, c, f, "a weight update")
        except EngineError as exc:
            link.failed = link.failed or f"engine {c.base_url} refused the weight update: {exc}"
    if link.failed:
        log.warning("weight sync incomplete: %s", link.failed)
    times.transfer_s += sent - start
    times.engine_load_s += time.perf_counter() - sent
    times.bytes += sum(t.numel() * t.element_size() for _, t in bucket)


def _broadcast_watching(link: EngineLink, tensors: list[torch.Tensor], futures: list) -> None:
    """Broadcast `tensors` from rank 0 while watching the engines' HTTP replies: SGLang
    answers a refused update (400) without joining the broadcast, so a reply that arrives
    before the broadcast completes is a refusal and ends the wait (never a hang)."""
    watch = HealthWatch(link.clients, link.watch)
    try:
        works = [dist.broadcast(t, src=0, group=link.group, async_op=True) for t in tensors]
        while not all(w.is_completed() for w in works):
            for c, f in zip(link.clients, futures):
                if f.done() and f.exception() is not None:
                    link.failed = f"engine {c.base_url} refused the weight update: {f.exception()}"
                    link.abandoned += [(w, tensors) for w in works]
                    return
            # A stopped engine never drains its socket: a broadcast beyond the socket
            # buffers would wait for it forever.
            found = watch.hung([c for c, f in zip(link.clients, futures) if not f.done()])
            if found is not None:
                link.hung[found[0]] = found[1]
                link.failed = str(EngineHung(found[0], found[1], "a weight broadcast"))
                link.abandoned += [(w, tensors) for w in works]
                return
            time.sleep(0.001)
        for w in works:
            w.wait()  # raises what a completed-with-error broadcast hit (a dead engine)
    except RuntimeError as exc:
        link.failed = f"broadcast to the engines failed: {exc}"


def stage_tensors(policy: Policy, all_replicas: bool = False):
    """(global megatron name, full tensor) of the whole model, on every rank of DP replica 0
    (of every replica with `all_replicas`); collective over those ranks.

    Stage by stage: the stage's TP ranks all-gather, then its TP rank 0 broadcasts each tensor
    in its PP group.
    """
    groups = policy.groups
    if groups.dp_rank != 0 and not all_replicas:
        return
    for stage in range(groups.dims.pp):
        mine = groups.pp_rank == stage
        tensors = iter_full_params(policy.chunks, groups.tp) if mine else iter(())
        if groups.dims.pp == 1:
            yield from tensors
            continue
        src = dist.get_global_rank(groups.pp, stage)
        local = dict(tensors)
        meta = [[(n, t.shape, t.dtype) for n, t in local.items()]] if mine else [None]
        dist.broadcast_object_list(meta, src=src, group=groups.pp)
        for name, shape, dtype in meta[0]:
            buf = local.get(name)
            if buf is None:
                buf = torch.empty(shape, dtype=dtype, device=_device_of(policy))
            dist.broadcast(buf, src=src, group=groups.pp)
            yield name, buf


def _device_of(policy: Policy) -> torch.device:
    return next(policy.chunks[0].parameters()).device


def push_weights(policy: Policy, link: EngineLink | None, version: int,
                 bucket_bytes: int, dtype: torch.dtype | None = None) -> SyncTimes:
    """Send every weight to the engines as HF Qwen2 tensors; collective over DP replica 0.

    `link` is only used (and only needed) on global rank 0; after the call `link.failed` says
    whether every engine got everything. `dtype` casts on the way out (bf16 engines from an
    fp32 trainer); None keeps the trainer's dtype.
    """
    times = SyncTimes()
    is_sender = dist.get_rank() == 0
    opened = _open_sessions(link) if is_sender else []
    for bucket, last in hf_buckets(policy, bucket_bytes, times, dtype, map_here=is_sender):
        _send_bucket(link, bucket, version, times, flush=last)
    if is_sender and not link.failed:
        _close_sessions(link, opened)
    elif opened:
        # Best effort, so the next push can open a session: an engine that refused closes
        # its session now; one still waiting in the failed broadcast may not answer in time
        # (it is then restarted if it stays broken).
        _close_sessions(link, opened, timeout_s=10.0)
    return times


def hf_buckets(policy: Policy, bucket_bytes: int, times: SyncTimes, dtype: torch.dtype | None = None,
               all_replicas: bool = False, map_here: bool = True):
    """(bucket of (HF name, tensor), is the last bucket) in model order, each bucket just over
    `bucket_bytes` at most one tensor group; the time spent gathering and mapping goes to
    `times.gather_s`. Collective like `stage_tensors`; ranks with `map_here=False` take part in
    the gathers and get nothing."""
    ready: list[tuple[str, torch.Tensor]] | None = None
    bucket: list[tuple[str, torch.Tensor]] = []
    size, start = 0, time.perf_counter()
    for name, full in stage_tensors(policy, all_replicas):
        if not map_here:
            continue
        for hf_name, tensor in qm.megatron_to_hf(name, full, policy.hf_config):
            tensor = tensor.to(dtype) if dtype is not None else tensor
            bucket.append((hf_name, tensor))
            size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            if ready is not None:  # one bucket of look-ahead, so the last one is known as such
                times.gather_s += time.perf_counter() - start
                yield ready, False
                start = time.perf_counter()
            ready, bucket, size = bucket, [], 0
    times.gather_s += time.perf_counter() - start
    if ready is not None:
        yield ready, not bucket
    if bucket:
        yield bucket, True
