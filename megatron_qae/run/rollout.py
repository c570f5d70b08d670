"""Global rank 0's handle on the rollout side: Ray, the rollout manager and where weights go.

What it does: connects to (or starts) Ray, draws the run's engine API key, creates the
RolloutManager actor, forwards generate / evaluate / state calls, and says where weights go
(`SyncTarget`): the live engines, and whether the weight-update groups must be re-formed (the
set of engines changed, an engine died and was restarted, or the last push failed). Engine
weight versions are read from /model_info. What it does not: form the groups or send weights
(each pipeline stage's sender does, in weight_sync).
"""

from __future__ import annotations

import logging
import secrets
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import ray

from megatron_qae.config.loading import Config
from megatron_qae.model import cpu_compat
from megatron_qae.run import ray_cluster
from megatron_qae.sync.weight_sync import SyncTarget
from rollout_sglang.config import EngineConfig
from rollout_sglang.engines.pool import engine_watch_policy
from rollout_sglang.manager import RolloutManager
from rollout_sglang.sglang.server_args import validate_server_args
from rollout_sglang.types import EnginePlacement, RolloutBatch

log = logging.getLogger(__name__)


class Rollout:
    """Driver-side facade over the RolloutManager actor."""

    def __init__(self, engine: EngineConfig, manager: ray.actor.ActorHandle, master_address: str,
                 api_key: str, args_check: Future | None = None) -> None:
        self.engine_cfg = engine
        self.manager = manager
        self.api_key = api_key
        """The run's engine API key: every engine requires it, every client sends it."""
        self.master_address = master_address
        self._formed = False
        self._endpoints: list[tuple[str, int]] = []
        self._args_check = args_check
        """`engine.sglang_args` being checked by SGLang's parser (sglang/server_args.py); None = no check."""
        self._ahead: ray.ObjectRef | None = None
        """The batch being generated ahead of training (rollout.async_steps=1), until taken."""
        self._state_before_ahead: dict | None = None
        """The manager's data state before that batch drew its prompts (what a checkpoint keeps)."""

    @classmethod
    def start(cls, cfg: Config, master_address: str, placements: list[EnginePlacement] | None = None,
              wait: bool = True) -> Rollout:
        """Join or start Ray and the rollout manager; `placements` pins colocated engines.
        `wait=False` returns while the engines start; `wait_ready` (or any later call) waits.
        SGLang's arguments are checked by SGLang's own parser in the engines' python while the
        engines start (10-40 s of sglang import, hidden behind SGLang's own start); `wait_ready`
        raises its refusal first."""
        e, check = cfg.engine, None
        if e.backend == "sglang" and e.sglang_args:
            pool = ThreadPoolExecutor(1, thread_name_prefix="sglang-args-check")
            check = pool.submit(validate_server_args, dict(e.sglang_args), e.sglang_python)
            pool.shutdown(wait=False)  # the thread ends with its one question
        ray_cluster.connect(cfg.ray.address, cfg.ray.num_cpus)
        actor = ray.remote(RolloutManager).options(num_cpus=0, max_concurrency=4)
        log_dir = str(Path(cfg.run.run_dir) / "engine_logs")
        api_key = secrets.token_urlsafe(24)
        manager = actor.remote(cfg.rollout, cfg.engine, cfg.reward, cfg.data, cfg.run.seed, cfg.model.path,
                               log_dir, placements, api_key, master_address)
        rollout = cls(cfg.engine, manager, master_address, api_key, check)
        if wait:
            rollout.wait_ready()
        return rollout

    def wait_ready(self) -> None:
        """Block until every engine serves (raises a refused SGLang argument, then what the
        manager's start-up raised)."""
        if self._args_check is not None:
            self._args_check.result()
        ray.get(self.manager.ready.remote())

    def generate(self, policy_version: int) -> RolloutBatch:
        """The batch generated ahead, if one is pending; else generate one now."""
        try:
            if self._ahead is not None:
                batch = ray.get(self._ahead)
                self._ahead = self._state_before_ahead = None
                return batch
            return ray.get(self.manager.generate.remote(policy_version))
        finally:
            self._relay_warnings()

    def generate_ahead(self, policy_version: int) -> None:
        """Start generating the next batch with the engines' current weights and return at once
        (one-step off-policy); `generate` takes it. A checkpoint taken meanwhile keeps the data
        state from before this batch, so a resumed run generates it again: no group is lost or
        trained twice."""
        self._state_before_ahead = self.state_dict()
        self._ahead = self.manager.generate.remote(policy_version)

    def wait_ahead(self) -> None:
        """Block until the batch generated ahead is done: new weights must not reach an engine
        that is still generating it (each sample keeps one policy_version)."""
        if self._ahead is not None:
            ray.wait([self._ahead], num_returns=1, timeout=None, fetch_local=False)

    def evaluate(self, n_samples: int) -> dict[str, float]:
        try:
            return ray.get(self.manager.evaluate.remote(n_samples))
        finally:
            self._relay_warnings()

    def _relay_warnings(self, taken: list[str] | None = None) -> None:
        """Show the manager's engine warnings (hung, restarted) here, those `taken` already or
        else fetched now: the actor's own log goes to Ray's files, not the terminal."""
        for message in taken if taken is not None else ray.get(self.manager.take_warnings.remote()):
            log.warning("%s", message)

    def prepare_sync(self, last_failed: bool, hung: dict[str, float] | None = None) -> SyncTarget:
        """Where every stage's sender sends the weights: every live engine, dead ones and those
        a push found `hung` ({url: seconds without a /health answer}) restarted first; the links
        are re-formed when engines were restarted, the set changed or the last push failed
        (`last_failed`)."""
        # One round trip to the manager per sync (it was three; each costs a few ms a step).
        restarted, endpoints, warnings = ray.get(self.manager.sync_target.remote(hung or {}))
        self._relay_warnings(warnings)
        reform = not self._formed or bool(restarted) or last_failed or endpoints != self._endpoints
        if restarted:
            log.warning("re-forming the weight groups after restarting %s", restarted)
        self._formed, self._endpoints = True, endpoints
        backend = "gloo" if not cpu_compat.cuda_available() else "nccl"
        e = self.engine_cfg
        # Control and weight-update replies: the configured timeout, a /health watch throughout.
        watch = replace(engine_watch_policy(e), s_per_token=0.0, floor_s=e.request_timeout_s)
        return SyncTarget(endpoints, backend, e.request_timeout_s, self.api_key, reform, watch)

    def prepare_colocated(self) -> tuple[list[str], str]:
        """Colocated: the URL of every engine in engine order and the API key, dead ones
        restarted first and every engine's released weight memory back, ready to load
        (before any rank sends to it)."""
        restarted = ray.get(self.manager.restart_dead_engines.remote())
        self._relay_warnings()
        if restarted:
            log.warning("restarted colocated engines %s; they get the weights now", restarted)
        self._endpoints = ray.get(self.manager.engine_endpoints.remote())
        self.resume_memory(["weights"])
        return [u for u, _ in self._endpoints], self.api_key

    def release_memory(self) -> None:
        """Colocated: engines free weights and KV cache while the trainer trains."""
        ray.get(self.manager.release_memory.remote(["weights", "kv_cache"]))

    def resume_memory(self, tags: list[str]) -> None:
        ray.get(self.manager.resume_memory.remote(tags))

    def synced(self, version: int) -> tuple[list[int], float]:
        """Record that the engines of the last `prepare_sync` hold `version`; returns the weight
        version each of them reports over its own HTTP API (/model_info; -1 before any update)
        and the engine restarts since the run started. One round trip to the manager."""
        return ray.get(self.manager.synced.remote([u for u, _ in self._endpoints], version))

    def state_dict(self) -> dict:
        if self._state_before_ahead is not None:
            return self._state_before_ahead
        return ray.get(self.manager.state_dict.remote())

    def load_state_dict(self, state: dict) -> None:
        ray.get(self.manager.load_state_dict.remote(state))

    def shutdown(self) -> None:
        try:
            ray.get(self.manager.shutdown.remote())
        except ray.exceptions.RayActorError:
            pass  # the manager failed to start or died: its engines went with it (fate-sharing)
