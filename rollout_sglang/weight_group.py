"""The process group that joins the trainer (rank 0) and the rollout engines for weight sync.

What it does: builds a standalone torch.distributed group from a `tcp://` rendezvous, exactly
the way SGLang's `init_weights_update_group` does on the engine side (rendezvous store,
prefixed by the group name, a backend group over it), so the trainer can join a real SGLang
engine (NCCL) or our CPU server (gloo) with the same code. What it does not: send tensors
(callers broadcast from rank 0) or touch the default torch.distributed group.
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
    """Join (rank 0: host) the weight-update group; blocks until all `world_size` ranks join
    (at most `rendezvous_timeout_s`, default `timeout_s`); `timeout_s` bounds each collective.

    Uses torch's group helper directly because `dist.new_group` needs every member in one
    default group, and the engines are separate jobs.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    joining = datetime.timedelta(seconds=rendezvous_timeout_s or timeout_s)
    store, rank, world_size = next(
        rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=joining)
    )
    store.set_timeout(joining)
    store = PrefixStore(group_name, store)
    params = inspect.signature(_new_process_group_helper).parameters
    options = {"backend_options" if "backend_options" in params else "pg_options": None}
    group, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, timeout=timeout,
        **options,
    )
    # Register the ranks so dist.broadcast(..., group=group) maps group ranks correctly.
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_weight_group(group: dist.ProcessGroup) -> None:
    """Release a weight-update group (before re-forming it, e.g. after an engine restart)."""
    dist.destroy_process_group(group)
