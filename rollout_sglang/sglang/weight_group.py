"""The process group that joins the trainer (rank 0) and the rollout engines for weight sync.

What it does: rank 0 (the trainer) hosts the rendezvous store on a port the OS picks and holds
it from before any engine is told the port (`host_rendezvous`), then builds the group over that
store (`host_weight_group`); an engine joins as a client through a `tcp://` rendezvous, exactly
the way SGLang's `init_weights_update_group` does (`init_weight_group`: rendezvous store,
prefixed by the group name, a backend group over it), so the trainer can join a real SGLang
engine (NCCL) or our CPU server (gloo) with the same code. Engines only ever connect (their
rank is rank_offset + tp_rank >= 1, and torch's tcp:// rendezvous hosts the store on rank 0
only), so the port rank 0 holds is the only one the group needs. What it does not: send
tensors (callers broadcast from rank 0) or touch the default torch.distributed group.
`abort_weight_group` releases rank 0's side, on NCCL and gloo alike, even with work in flight.
"""

from __future__ import annotations

import datetime
import inspect
import threading
import time

import torch.distributed as dist
from torch.distributed.distributed_c10d import (
    Backend,
    PrefixStore,
    _new_process_group_helper,
    _world,
    rendezvous,
)


def host_rendezvous(master_address: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening from now on a port the OS picks (`.port`, to be
    sent to the engines). Held, not probed: a port found free and released could be taken by
    another process before rank 0 binds it ("address already in use"), or the engines could
    dial another run's store and wait there until their timeout. `timeout_s` bounds each
    wait on the store (the engines joining)."""
    # wait_for_workers=False: the group's own set-up waits for every rank (bounded by the
    # store's timeout), so the store must not block here, before the engines are told the port.
    return dist.TCPStore(master_address, 0, world_size, is_master=True,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def host_weight_group(store: dist.Store, world_size: int, group_name: str, backend: str = "gloo",
                      timeout_s: float = 600.0) -> dist.ProcessGroup:
    """Rank 0's side of the weight-update group, over the store of `host_rendezvous`; blocks
    until all `world_size` ranks join (at most the store's timeout); `timeout_s` bounds each
    collective."""
    return _group_over(store, 0, world_size, group_name, backend, timeout_s)


def init_weight_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "gloo",
    timeout_s: float = 600.0,
    rendezvous_timeout_s: float | None = None,
) -> dist.ProcessGroup:
    """Join the weight-update group hosted at `master_address:master_port` as an engine does
    (a `tcp://` rendezvous); blocks until all `world_size` ranks join (at most
    `rendezvous_timeout_s`, default `timeout_s`); `timeout_s` bounds each collective."""
    joining = datetime.timedelta(seconds=rendezvous_timeout_s or timeout_s)
    store, rank, world_size = next(
        rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=joining)
    )
    store.set_timeout(joining)
    return _group_over(store, rank, world_size, group_name, backend, timeout_s)


def _group_over(store: dist.Store, rank: int, world_size: int, group_name: str, backend: str,
                timeout_s: float) -> dist.ProcessGroup:
    """A backend group over `store` (prefixed by the group name, as SGLang does).

    Uses torch's group helper directly because `dist.new_group` needs every member in one
    default group, and the engines are separate jobs.
    """
    params = inspect.signature(_new_process_group_helper).parameters
    options = {"backend_options" if "backend_options" in params else "pg_options": None}
    group, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), PrefixStore(group_name, store), group_name=group_name,
        timeout=datetime.timedelta(seconds=timeout_s), **options,
    )
    # Register the ranks so dist.broadcast(..., group=group) maps group ranks correctly.
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def abort_weight_group(group: dist.ProcessGroup, in_flight: list[dist.Work]) -> None:
    """Release rank 0's side of a weight-update group now, whatever it still has in flight
    (`in_flight`: the work a failed push left), by one path for both backends.

    torch's abort-and-unregister (`_abort_process_group`, torch 2.14.1 distributed_c10d.py:
    3085-3183) aborts the backend: NCCL aborts its communicators, which ends the work in
    flight at once, so the watchdog never times a broadcast to a dead engine out (with the
    default TORCH_NCCL_ASYNC_ERROR_HANDLING=3 a timed-out work tears the process down,
    ProcessGroupNCCL.hpp:66-73,163-177); gloo has no abort (Backend::abort is a no-op,
    Backend.hpp:724-726). Then the last references are dropped, on a thread of its own once
    the work in flight has ended: gloo's destructor waits for its queued work and joins its
    worker threads (ProcessGroupGloo.cpp `~ProcessGroupGloo`), and its in-flight work ends
    when the engine it waits for is killed or at the group's timeout. Only then are gloo's
    connections closed, which ends any engine receive still waiting in the group (until
    then that engine cannot take an update of a new group: it applies one at a time)."""
    from torch.distributed.distributed_c10d import _abort_process_group

    _abort_process_group(group)
    held: list = [group, list(in_flight)]
    del group
    threading.Thread(target=_drop_when_done, args=(held,), daemon=True, name="weight-group-drop").start()


def _drop_when_done(held: list) -> None:
    """Drop `held` ([group, its in-flight work]) once that work has ended: the group's
    destructor then returns at once, on whichever thread drops the last reference."""
    while not all(w.is_completed() for w in held[1]):
        time.sleep(0.05)
    held.clear()
