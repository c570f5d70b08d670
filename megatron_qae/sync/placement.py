"""Where the rollout engines run: two placements, each owning its lifecycle behind one interface.

What it does: `Separate` (engines on devices of their own, weights over each pipeline stage's
weight link) and `Colocated` (engines on the trainer's devices, weights by memory handle, the
trainer's gradient buffers and optimizer state off the GPU while the engines hold it) each
start their engines, ready the devices before and after training, push weights with
restart-and-retry (engine.max_restarts) returning a `PushResult`, and tear down.
`placement_for` picks one from engine.colocate, so the loop calls the same methods whichever
runs. What it does not: generate, train or checkpoint
(the loop does), form weight groups or send tensors (weight_sync.py, colocated_sync.py), or
restart engines (the rollout manager does when `Rollout.prepare_sync` / `prepare_colocated`
asks it to).

Lifecycle, on every trainer rank (global rank 0 also holds the `Rollout` handle):
construct -> [build, restore] attach(policy) -> push(start) -> per rollout step: [generate]
before_training() [train, checkpoint] after_training() push(step) -> close(). A checkpoint is
written between training and after_training, while the train state is on the device and
colocated engines hold nothing: release -> restore -> save -> offload -> resume, so the save's
peak is the trainer's alone (`plan.py` prints it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from megatron_qae.config.loading import Config
from megatron_qae.model.offload import HostArena, OffloadedState, offload_train_state, restore_train_state
from megatron_qae.model.parallel import broadcast_from_driver
from megatron_qae.model.policy import Policy
from megatron_qae.run.rollout import Rollout
from megatron_qae.sync.colocated_sync import ColocatedSync, engine_placements
from megatron_qae.sync.hf_buckets import SyncTimes
from megatron_qae.sync.weight_sync import PushOutcome, StageLink, push_weights
from rollout_sglang.sglang.client import EngineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushResult:
    """One weight push that reached every engine (it raises otherwise)."""

    version: int
    """The policy_version pushed."""
    attempts: int
    """Pushes it took: 1, plus one per restart-and-retry."""
    times: SyncTimes
    """This rank's seconds per phase and bytes, of the attempt that reached every engine."""
    engine_versions: tuple[int, ...] | None = None
    """Weight version each engine reports after the push (/model_info); None off global rank 0."""
    engine_restarts_total: float = 0.0
    """Engine restarts since the run started (global rank 0 only)."""

    def metrics(self) -> dict[str, float]:
        """The sync/* metrics global rank 0 logs; {} on the other ranks."""
        if self.engine_versions is None:
            return {}
        # Overrides the rollout's count: an engine restarted during this push counts at this step.
        return {**self.times.metrics(), "sync/attempts": float(self.attempts),
                "rollout/engine_restarts_total": self.engine_restarts_total,
                "sync/engine_version_min": float(min(self.engine_versions)),
                "sync/engine_version_max": float(max(self.engine_versions))}


class Placement(Protocol):
    """What the loop calls, whichever placement runs (every rank, in the same order)."""

    def attach(self, policy: Policy) -> Rollout | None:
        """After the policy is built and restored: form what the pushes need and ready the
        devices for the first push; global rank 0's rollout handle."""

    def before_training(self) -> dict[str, float]:
        """Ready the devices for training (after generation); returns the colocated/* metrics."""

    def after_training(self) -> None:
        """Free what only training needs, before weights go out and generation runs (after a
        checkpoint, if one is due)."""

    def push(self, version: int) -> PushResult:
        """Weights at `version` to every engine, restarting failed engines and pushing again."""

    def close(self) -> None:
        """Drop the weight links and shut the engines down (after a failure too)."""


def placement_for(cfg: Config, master_address: str, is_driver: bool) -> Placement:
    """The placement engine.colocate asks for; separate engines begin starting now."""
    if cfg.engine.colocate:
        return Colocated(cfg, master_address, is_driver)
    return Separate(cfg, master_address, is_driver)


class Separate:
    """Engines on devices of their own; weights over each pipeline stage's weight link."""

    def __init__(self, cfg: Config, master_address: str, is_driver: bool) -> None:
        self.cfg, self.master_address = cfg, master_address
        # They start (SGLang: minutes at scale) while the policy is built and restored.
        self.rollout = Rollout.start(cfg, master_address, None, wait=False) if is_driver else None
        self.policy: Policy | None = None
        self.link: StageLink | None = None

    def attach(self, policy: Policy) -> Rollout | None:
        self.policy, self.link = policy, StageLink(policy, self.master_address)
        return self.rollout

    def before_training(self) -> dict[str, float]:
        return {}

    def after_training(self) -> None:
        return None

    def push(self, version: int) -> PushResult:
        policy, link, rollout = self.policy, self.link, self.rollout
        assert policy is not None and link is not None, "push before attach"

        def once(retry: bool, last: PushOutcome) -> tuple[SyncTimes, PushOutcome]:
            target = rollout.prepare_sync(retry, dict(last.hung)) if rollout is not None else None
            target = broadcast_from_driver(target, policy.groups)
            return push_weights(policy, link.prepare(target), version, self.cfg.engine.weight_sync_bucket_bytes)

        times, attempts = _push_retrying(once, version, self.cfg.engine.max_restarts)
        return _pushed(rollout, version, times, attempts)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        if self.rollout is not None:
            self.rollout.shutdown()


class Colocated:
    """Engines on the trainer's devices (one engine TP rank per trainer rank); weights by memory
    handle. With engine.offload_train_state the gradient buffers and optimizer state are off the
    GPU from after training until the engines have released it again."""

    def __init__(self, cfg: Config, master_address: str, is_driver: bool) -> None:
        self.cfg, self.master_address, self.is_driver = cfg, master_address, is_driver
        self.rollout: Rollout | None = None
        self.policy: Policy | None = None
        self.sync: ColocatedSync | None = None
        self.offloaded: tuple[OffloadedState, float] | None = None
        """What the last offload released and the seconds it took, until restored."""
        self.arena = HostArena()
        """The host buffer every offload of this run reuses (model/offload.py)."""

    def attach(self, policy: Policy) -> Rollout | None:
        """Offload the train state (engine.offload_train_state), then start the engines: SGLang
        sizes its KV pool from the memory free when it starts (0.5.23
        mem_cache/kv_cache_configurator.py:2990-3057: free memory after its weights minus
        (1 - mem_fraction_static) of the memory free before them), so the trainer must hold
        then exactly what it holds while the engines generate."""
        e = self.cfg.engine
        placements = engine_placements(e.num_engines, e.engine_tp)
        self.policy = policy
        self.after_training()
        self.sync = ColocatedSync(e.num_engines, e.engine_tp, e.request_timeout_s)
        self.rollout = Rollout.start(self.cfg, self.master_address, placements) if self.is_driver else None
        return self.rollout

    def before_training(self) -> dict[str, float]:
        """The engines free their GPU memory (weights, KV cache), then the train state comes back."""
        if self.rollout is not None:
            self.rollout.release_memory()
        dist.barrier()  # no rank allocates activations before its engine has let go
        return self._restore()

    def after_training(self) -> None:
        """engine.offload_train_state: free the gradient buffers and move the optimizer state to
        host memory while the engines hold the GPU (weight sync, generation)."""
        assert self.policy is not None, "after_training before attach"
        if not self.cfg.engine.offload_train_state:
            return
        t0 = time.perf_counter()
        state = offload_train_state(self.policy, self.arena)
        self.offloaded = (state, time.perf_counter() - t0)

    def push(self, version: int) -> PushResult:
        policy, sync, rollout, e = self.policy, self.sync, self.rollout, self.cfg.engine
        assert policy is not None and sync is not None, "push before attach"

        def once(retry: bool, last: PushOutcome) -> tuple[SyncTimes, PushOutcome]:
            # The broadcast is the barrier: no rank sends before rank 0 has the engines ready.
            urls, api_key = broadcast_from_driver(rollout.prepare_colocated() if rollout is not None else None,
                                                  policy.groups)
            return sync.push(policy, urls, version, e.weight_sync_bucket_bytes, api_key=api_key)

        times, attempts = _push_retrying(once, version, e.max_restarts)
        if rollout is not None:
            rollout.resume_memory(["kv_cache"])
        return _pushed(rollout, version, times, attempts)

    def close(self) -> None:
        if self.rollout is not None:
            self.rollout.shutdown()

    def _restore(self) -> dict[str, float]:
        """Bring back what `after_training` released, before the trainer touches it again."""
        if self.offloaded is None:
            return {}
        assert self.policy is not None
        (state, offload_s), self.offloaded = self.offloaded, None
        t0 = time.perf_counter()
        restore_train_state(self.policy, state)
        return {"colocated/offloaded_bytes": float(state.freed_bytes), "colocated/offload_s": offload_s,
                "colocated/restore_s": time.perf_counter() - t0}


def _push_retrying(once: Callable[[bool, PushOutcome], tuple[SyncTimes, PushOutcome]], version: int,
                   max_restarts: int) -> tuple[SyncTimes, int]:
    """`once(retry, last outcome)` until every rank's push reached its engines; (times, attempts).
    Engines restarted since the last sync get the weights too; when an engine fails during the
    push, rank 0's next `once` has the manager restart it and the push is repeated."""
    last = PushOutcome()
    for attempt in range(1, max_restarts + 2):
        times, last = once(attempt > 1, last)
        failed = torch.tensor([0.0 if last.ok else 1.0])
        dist.all_reduce(failed)
        if failed.item() == 0:
            return times, attempt
        log.warning("weight sync %d did not reach every engine (attempt %d); restarting and retrying",
                    version, attempt)
    raise EngineError(f"weight sync of version {version} failed {max_restarts + 1} times; "
                      "see the engine logs under <run_dir>/engine_logs/ (engine.max_restarts)")


def _pushed(rollout: Rollout | None, version: int, times: SyncTimes, attempts: int) -> PushResult:
    """The push's result; on global rank 0 with the engines' versions, recorded by the manager."""
    if rollout is None:
        return PushResult(version, attempts, times)
    versions, restarts = rollout.synced(version)
    return PushResult(version, attempts, times, tuple(versions), restarts)
