"""Push the trainer's weights to the rollout engines after each step.

What it does: each pipeline stage's sender (TP rank 0 of DP replica 0) gathers its own
stage's weights as HF Qwen2 tensors one at a time (hf_buckets.py) and sends them in
size-bounded buckets straight to the engines over a weight-update group of its own, whose
rendezvous port it holds from before the engines are told it (SGLang receives each update by
broadcast from rank 0 of the named group; an engine may be in several named groups): no
stage's weights cross the pipeline, and a sync holds at most two buckets and one gathered
tensor per sender. The stages take turns, one bucket each, so every engine receives the
updates in one order (`_send_in_turns`). All of it happens inside one weight-update session
per engine (`/begin_weight_update` ... `/end_weight_update`, required by SGLang >= 0.5.21),
opened by the first stage's sender before any stage sends and closed after every stage has:
the engines are told the names / dtypes / shapes over HTTP (`/update_weights_from_distributed`)
while the sender broadcasts the tensors. An engine that refuses (its 400 arrives before it
would join the broadcast) stops the push at once with an error naming the engine and SGLang's
message; a request with no reply in time is reported as a timeout. Every reply is awaited
with a deadline and a /health watch: an engine that stops answering (stopped, wedged) fails
the push within seconds and is listed in the push's `PushOutcome.hung`, so the manager kills
and restarts it before the push is repeated. A failed push aborts the trainer's side of the
group at once (NCCL and gloo alike); re-forming tells every engine to destroy its side
(`disconnect`). Every step of a push returns what it found (`PushOutcome`); the link holds
connection state only. Timed per phase. What it does not: decide when to sync (the loop
does), decide when links must be re-formed (global rank 0's `Rollout.prepare_sync` does) or
start engines (the rollout manager does).

Every trainer rank calls `push_weights`; only data-parallel replica 0 takes part in the gathers.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_qae.model.policy import Policy
from megatron_qae.sync.hf_buckets import SyncTimes, hf_buckets
from rollout_sglang.sglang.client import EngineError, SGLangClient
from rollout_sglang.engines.watchdog import EngineHung, HealthWatch, WatchPolicy, wait_watching
from rollout_sglang.sglang.weight_group import abort_weight_group, host_rendezvous, host_weight_group

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class PushOutcome:
    """What a push (or one step of it) found on this rank's link; `merged` folds steps together."""

    failed: str | None = None
    """Why the push did not reach every engine (the group must then be re-formed); None: it did."""
    hung: Mapping[str, float] = field(default_factory=dict)
    """Engines found hung: {url: seconds without a /health answer}, for the manager to kill."""

    @property
    def ok(self) -> bool:
        return self.failed is None

    def merged(self, later: PushOutcome) -> PushOutcome:
        """This outcome followed by `later`: the first refusal wins, hung engines add up."""
        return PushOutcome(self.failed or later.failed, {**self.hung, **later.hung})


@dataclass
class EngineLink:
    """Rank 0's side of the weight-update group with a set of engines (connection state only)."""

    clients: list[SGLangClient]
    group: dist.ProcessGroup | None
    """Rank 0's side of the group; None once aborted (a push on it failed: it is re-formed)."""
    group_name: str
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(8))
    abandoned: list[tuple[dist.Work, list[torch.Tensor]]] = field(default_factory=list)
    """Broadcasts (and their tensors) left in flight when an engine refused or hung mid-push;
    `abort_link` hands them over with the group."""
    watch: WatchPolicy = field(default_factory=lambda: WatchPolicy(0.0, 600.0))
    """Deadline of each engine reply (floor_s) and how a hung engine is found."""


def connect_engines(
    endpoints: list[tuple[str, int]],
    master_address: str,
    backend: str,
    timeout_s: float,
    api_key: str | None = None,
    group_name: str | None = None,
    watch: WatchPolicy | None = None,
) -> EngineLink:
    """Form a weight-update group: rank 0 = this process, engine i's TP ranks after it. An
    engine can be in several such groups at once (one per pipeline stage's sender), told
    apart by `group_name` (a fresh one when None). The rendezvous port is bound here before
    the engines are told it (never probed, then bound). `watch` probes the engines while
    their replies are awaited (default: probes every 2 s, each reply's deadline `timeout_s`)."""
    clients = [SGLangClient(url, timeout_s=timeout_s, api_key=api_key) for url, _ in endpoints]
    world = 1 + sum(tp for _, tp in endpoints)
    group_name = group_name or f"qae_weights_{uuid.uuid4().hex[:8]}"
    store = host_rendezvous(master_address, world, timeout_s)
    pool = ThreadPoolExecutor(max(8, len(clients)))
    offsets = [1 + sum(tp for _, tp in endpoints[:i]) for i in range(len(endpoints))]
    futures = [
        pool.submit(c.init_weights_update_group, master_address, store.port, off, world,
                    group_name, backend)
        for c, off in zip(clients, offsets)
    ]
    group = host_weight_group(store, world, group_name, backend, timeout_s)
    for f in futures:
        f.result()
    return EngineLink(clients, group, group_name, pool, watch=watch or WatchPolicy(0.0, timeout_s))


@dataclass(frozen=True)
class SyncTarget:
    """What every stage's sender needs to form its weight link; decided by global rank 0."""

    endpoints: list[tuple[str, int]]
    """(URL, engine TP size) of every live engine, in engine order."""
    backend: str
    """Backend of the weight-update groups ("nccl" on GPU, "gloo" on CPU)."""
    timeout_s: float
    """Engine request timeout (and rendezvous timeout) in seconds."""
    api_key: str | None
    """The engines' API key."""
    reform: bool
    """Engines changed or the last push failed: every sender forms its link anew."""
    watch: WatchPolicy | None = None
    """Deadline of each engine reply and the /health watch that finds a hung engine."""


def reachable_address(master_address: str) -> str:
    """This host's address on the interface that reaches `master_address`: where the engines
    (which reach the trainer's rank 0 there) can reach this rank's weight group."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((master_address, 9))  # UDP: picks the route, sends nothing
        return s.getsockname()[0]


class StageLink:
    """One trainer rank's weight link: formed on each pipeline stage's sender, None elsewhere.
    Create on every rank; `prepare` is called by every rank with the same target."""

    def __init__(self, policy: Policy, master_address: str) -> None:
        self.active = is_stage_sender(policy)
        self.pp_rank = policy.groups.pp_rank
        self.address = master_address
        if self.active and dist.get_rank() != 0:
            self.address = reachable_address(master_address)
        self.link: EngineLink | None = None

    def prepare(self, target: SyncTarget) -> EngineLink | None:
        """This rank's link to every engine in `target`, re-formed when it says so (global rank
        0 says so after any rank's push failed: `Rollout.prepare_sync(last_failed=True)`)."""
        if not self.active:
            return None
        if self.link is None or target.reform:
            self.close()
            name = f"qae_weights_pp{self.pp_rank}_{uuid.uuid4().hex[:8]}"
            self.link = connect_engines(target.endpoints, self.address, target.backend,
                                        target.timeout_s, target.api_key, name, target.watch)
        return self.link

    def close(self) -> None:
        if self.link is not None:
            disconnect(self.link)
            self.link = None


DESTROY_TIMEOUT_S = 10.0
"""Seconds an engine gets to answer /destroy_weights_update_group (a dead one fails at once)."""


def abort_link(link: EngineLink) -> None:
    """Abort rank 0's side of the link's weight group now (a push on it failed, or the link
    closes), in flight or not, on NCCL and gloo alike (`abort_weight_group`)."""
    if link.group is not None:
        group, in_flight = link.group, [w for w, _ in link.abandoned]
        link.group, link.abandoned = None, []
        abort_weight_group(group, in_flight)


def disconnect(link: EngineLink) -> None:
    """Drop the weight-update group on both sides before a new one is formed (after an engine
    restart or a failed push): rank 0's side is aborted (`abort_link`), then every engine of
    the link is told to destroy its side (/destroy_weights_update_group), so an engine holds
    one group per sender however often the groups are re-formed. An engine that does not
    answer (dead: it is restarted; hung: it is killed) keeps nothing that matters."""
    abort_link(link)
    futures = [(c, link.pool.submit(c.destroy_weights_update_group, link.group_name, DESTROY_TIMEOUT_S))
               for c in link.clients]
    for c, f in futures:
        try:
            f.result()
        except EngineError as exc:
            log.info("engine %s did not destroy weight group %s: %s", c.base_url, link.group_name, exc)
    link.pool.shutdown(wait=False)


def _failed(client: SGLangClient, what: str, exc: BaseException) -> str:
    """Why `client`'s engine did not take `what`, named for what happened: no reply in time is
    a timeout (the engine may still be receiving), an HTTP error reply a refusal, no
    connection an engine that could not be reached."""
    if isinstance(exc, EngineError) and exc.timed_out:
        return f"engine {client.base_url} timed out on {what}: {exc}"
    if isinstance(exc, EngineError) and exc.status is not None:
        return f"engine {client.base_url} refused {what}: {exc}"
    return f"engine {client.base_url} could not be reached for {what}: {exc}"


def _each_client(link: EngineLink, call, what: str) -> tuple[list[SGLangClient], PushOutcome]:
    """`call(client)` on every engine at once; returns the clients that accepted and what the
    others did (the first refusal or timeout, naming the engine and its message; the hung ones)."""
    futures = [(c, link.pool.submit(call, c)) for c in link.clients]
    accepted, outcome = [], PushOutcome()
    for c, f in futures:
        reply = _reply(link, c, f, what)
        outcome = outcome.merged(reply)
        if reply.ok:
            accepted.append(c)
    return accepted, outcome


def _open_sessions(link: EngineLink) -> tuple[list[SGLangClient], PushOutcome]:
    """Open a weight-update session on every engine; on any refusal close the ones opened
    (so no engine is left in a session) and return none, with the refusal."""
    opened, outcome = _each_client(link, SGLangClient.begin_weight_update,
                                   "a weight-update session (/begin_weight_update)")
    if not outcome.ok:
        return [], outcome.merged(_close_sessions(link, opened, outcome))
    return opened, outcome


def _reply(link: EngineLink, client: SGLangClient, future, what: str) -> PushOutcome:
    """Wait for one engine's reply within the link's deadline; a refusal or a timeout comes
    back naming the engine (`_failed`), a hung engine (no /health answer) is found at once
    and listed as hung."""
    try:
        wait_watching([(client, future)], link.watch, link.watch.floor_s, what)
    except EngineHung as exc:
        return PushOutcome(f"engine {client.base_url} did not take {what}: {exc}", {client.base_url: exc.stuck_s})
    except EngineError as exc:
        return PushOutcome(_failed(client, what, exc))
    return PushOutcome()


def _close_sessions(link: EngineLink, opened: list[SGLangClient], so_far: PushOutcome,
                    timeout_s: float | None = None) -> PushOutcome:
    """End the sessions of `opened` (an engine `so_far` found hung is left to be killed); a
    refusal comes back naming the engine and why."""
    outcome = PushOutcome()
    for c in opened:
        if c.base_url in so_far.hung:
            continue
        try:
            c.end_weight_update(timeout_s)
        except EngineError as exc:
            log.warning("weight-update session left open: %s", _failed(c, "the end of the weight update", exc))
            outcome = outcome.merged(PushOutcome(_failed(c, "the end of the weight update", exc)))
    return outcome


def _send_bucket(link: EngineLink, bucket: list[tuple[str, torch.Tensor]], version: int,
                 times: SyncTimes, flush: bool) -> PushOutcome:
    """Broadcast one bucket while the engines receive it; a dead engine (gloo raises at once)
    or a refused request comes back as the outcome instead of raising, so the trainer ranks
    still finish the push's collectives and the loop can restart the engine and push again."""
    names = [n for n, _ in bucket]
    dtypes = [_DTYPE_NAMES[t.dtype] for _, t in bucket]
    shapes = [list(t.shape) for _, t in bucket]
    futures = [
        link.pool.submit(c.update_weights_from_distributed, names, dtypes, shapes,
                         link.group_name, flush, str(version))
        for c in link.clients
    ]
    start = time.perf_counter()
    outcome = _broadcast_watching(link, [t.contiguous() for _, t in bucket], futures)
    sent = time.perf_counter()
    # After a failed broadcast the live engines wait for tensors that will not come; they are
    # released when the push aborts this group (`abort_link`), so do not wait for them.
    for c, f in zip(link.clients, futures if outcome.ok else []):
        outcome = outcome.merged(_reply(link, c, f, "the weight update"))
    if not outcome.ok:
        log.warning("weight sync incomplete: %s", outcome.failed)
    times.transfer_s += sent - start
    times.engine_load_s += time.perf_counter() - sent
    times.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
    return outcome


def _broadcast_watching(link: EngineLink, tensors: list[torch.Tensor], futures: list) -> PushOutcome:
    """Broadcast `tensors` from rank 0 while watching the engines' HTTP replies: SGLang
    answers a refused update (400) without joining the broadcast, so a reply that arrives
    before the broadcast completes is a refusal and ends the wait (never a hang). Broadcasts
    left in flight go to `link.abandoned`, for `abort_link`."""
    watch = HealthWatch(link.clients, link.watch)
    try:
        works = [dist.broadcast(t, src=0, group=link.group, async_op=True) for t in tensors]
        while not all(w.is_completed() for w in works):
            for c, f in zip(link.clients, futures):
                if f.done() and f.exception() is not None:
                    link.abandoned += [(w, tensors) for w in works]
                    return PushOutcome(_failed(c, "the weight update", f.exception()))
            # A stopped engine never drains its socket: a broadcast beyond the socket
            # buffers would wait for it forever.
            found = watch.hung([c for c, f in zip(link.clients, futures) if not f.done()])
            if found is not None:
                link.abandoned += [(w, tensors) for w in works]
                return PushOutcome(str(EngineHung(found[0], found[1], "a weight broadcast")), {found[0]: found[1]})
            time.sleep(0.001)
        for w in works:
            w.wait()  # raises what a completed-with-error broadcast hit (a dead engine)
    except RuntimeError as exc:
        return PushOutcome(f"broadcast to the engines failed: {exc}")
    return PushOutcome()


def is_stage_sender(policy: Policy) -> bool:
    """Whether this rank sends its pipeline stage's weights to the engines: TP rank 0 of DP
    replica 0, one per stage."""
    return policy.groups.dp_rank == 0 and policy.groups.tp_rank == 0


def push_weights(policy: Policy, link: EngineLink | None, version: int, bucket_bytes: int,
                 dtype: torch.dtype | None = None) -> tuple[SyncTimes, PushOutcome]:
    """Send every weight to the engines as HF Qwen2 tensors; collective over DP replica 0.
    Returns the times and whether every engine got this stage's weights (and which hung).

    Each pipeline stage's sender (`is_stage_sender`) sends its own stage over its own link
    (`link` is needed there only): SGLang receives every update by broadcast from rank 0 of
    the named group, so each stage's sender is rank 0 of a group of its own with the engines.
    The first stage's sender opens one weight-update session per engine before any stage
    sends and closes it after every stage has sent. The stages take turns, one bucket each
    (`_send_in_turns`), so every engine receives the updates in one order. `dtype` casts on
    the way out (bf16 engines from an fp32 trainer); None keeps the trainer's dtype.
    """
    times, groups = SyncTimes(), policy.groups
    is_sender = is_stage_sender(policy)
    owner = is_sender and groups.pp_rank == 0
    opened, outcome = _open_sessions(link) if owner else ([], PushOutcome())
    if is_sender and groups.dims.pp > 1:  # the senders' PP group: no stage sends into no session
        refusal = [outcome.failed]
        dist.broadcast_object_list(refusal, src=dist.get_global_rank(groups.pp, 0), group=groups.pp)
        outcome = outcome.merged(PushOutcome(refusal[0]))
    buckets = hf_buckets(policy, bucket_bytes, times, dtype, map_here=is_sender)
    if is_sender and groups.dims.pp > 1:
        outcome = _send_in_turns(policy, link, buckets, version, times, outcome)
    else:
        for bucket, last in buckets:  # off the senders: the stage's gathers, nothing yielded
            if outcome.ok:  # the gathers go on (collective), the sends stop at the first failure
                outcome = outcome.merged(_send_bucket(link, bucket, version, times, flush=last))
    if is_sender and groups.dims.pp > 1:  # every stage has sent before the session ends
        stages: list = [None] * groups.dims.pp
        dist.all_gather_object(stages, (outcome.failed, times), group=groups.pp)
        outcome = outcome.merged(PushOutcome(next((f for f, _ in stages if f), None)))
        times = _combined([t for _, t in stages])
    if is_sender and not outcome.ok:
        # Now, not when the link is re-formed: the manager may take minutes to restart an
        # engine, and (NCCL) a broadcast left in flight must not time out meanwhile. Aborted
        # before the sessions close, so an engine still receiving in it is released first.
        abort_link(link)
    if owner and outcome.ok:
        outcome = outcome.merged(_close_sessions(link, opened, outcome))
    elif opened:
        # Best effort, so the next push can open a session: an engine that refused closes
        # its session now; one still waiting in the failed broadcast may not answer in time
        # (it is then restarted if it stays broken).
        outcome = outcome.merged(_close_sessions(link, opened, outcome, timeout_s=10.0))
    return times, outcome


def _send_in_turns(policy: Policy, link: EngineLink, buckets, version: int, times: SyncTimes,
                   outcome: PushOutcome) -> PushOutcome:
    """The stages' senders send one bucket each in stage order, round after round, each
    bucket only once the one before it reached every engine: one global order of updates.

    Why: an engine applies one update at a time in arrival order (SGLang 0.5.23 holds its
    model-update writer lock for each, tokenizer_control_mixin.py:522-524, aio_rwlock.py:43-49),
    and each update's broadcast needs every engine of its group. Posted side by side, engine
    A could take stage 0's bucket while engine B takes stage 1's: each waits for the other in
    a broadcast (a circular wait). Each turn ends with a broadcast of (failed, more) from the
    stage whose turn it was; a stage gathers its next bucket while the others send. The sends
    stop everywhere at the first failure; the gathers go on (collective in each stage)."""
    groups = policy.groups
    pp, me = groups.dims.pp, groups.pp_rank
    device = next(policy.chunks[0].parameters()).device
    mine = next(buckets, None)
    assert mine is not None, "a pipeline stage with no weights to send"
    more, stopped = [True] * pp, False  # more[s]: stage s has buckets left
    while any(more):
        for stage in range(pp):
            if not more[stage]:
                continue
            word = [0, 0]  # (this turn's sender failed, it has buckets left)
            if stage == me:
                bucket, last = mine
                if outcome.ok and not stopped:
                    outcome = outcome.merged(_send_bucket(link, bucket, version, times, flush=last))
                word = [int(not outcome.ok), int(not last)]
            turn = torch.tensor(word, dtype=torch.int64, device=device)
            dist.broadcast(turn, src=dist.get_global_rank(groups.pp, stage), group=groups.pp)
            failed, more[stage] = turn.tolist()
            stopped = stopped or bool(failed)
            if stage == me and more[stage]:
                mine = next(buckets)
    assert next(buckets, None) is None, "a stage yielded a bucket after its last"  # ends the gathers
    return outcome


def _combined(stages: list[SyncTimes]) -> SyncTimes:
    """One sync's times from its stages' senders: they gather side by side (the slowest
    stage's gather) and send in turns (the stages' transfer and load seconds add up)."""
    return SyncTimes(max(t.gather_s for t in stages), sum(t.transfer_s for t in stages),
                     sum(t.engine_load_s for t in stages), sum(t.bytes for t in stages))
