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
"""

from __future__ import annotations

import datetime
import inspect

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


def destroy_weight_group(group: dist.ProcessGroup) -> None:
    """Release a weight-update group (before re-forming it, e.g. after an engine restart)."""
    dist.destroy_process_group(group)
