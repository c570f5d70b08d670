"""Supervision of a run's rollout engines: start, health, hang kill, restart, control calls.

What it does: `EnginePool` starts one engine actor per `engine.num_engines` (its own GPUs, or
pinned to its trainer ranks' node when colocated), knows which engines are live and hold the
current weights, kills a hung engine (SIGKILL through its actor, so its in-flight requests fail
at once and go elsewhere), restarts dead ones on request (they get no work until the trainer
has pushed the current weights), runs control calls (pause / resume, memory release / resume)
on every live engine at once, and remembers which memory tags each engine released (SGLang's
scheduler dies on a resume of a tag it did not release). Warnings (hangs, restarts) are kept
for the driver, since this actor's log goes to Ray's files. What it does not: generate, score
or sample (manager.py, streaming.py), or push weights (the trainer owns the weight group).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import ray

from rollout_sglang.config import EngineConfig
from rollout_sglang.sglang.client import EngineError, SGLangClient
from rollout_sglang.engines.engine import RolloutEngine
from rollout_sglang.types import EnginePlacement
from rollout_sglang.engines.watchdog import EngineHung, Probers, WatchPolicy, run_in_thread, wait_watching

log = logging.getLogger(__name__)


@dataclass
class _Engine:
    actor: object
    url: str
    tp: int
    synced_version: int | None = None
    dead: bool = False
    restarts: int = 0
    released: set[str] = field(default_factory=set)
    """Memory tags released and not resumed since (a restarted engine holds everything)."""
    hung_s: float | None = None
    """Seconds it was stuck when it was found hung and killed (None: not hung)."""


def engine_watch_policy(e: EngineConfig) -> WatchPolicy:
    """The request deadlines and /health probing of the engine section."""
    return WatchPolicy(e.request_s_per_token, e.request_floor_s, e.health_interval_s,
                       e.health_timeout_s, e.health_failures)


def _engine_actor(e: EngineConfig, place: EnginePlacement | None):
    """The Ray actor class of one engine, its own GPUs or pinned to its trainer ranks' node,
    and what it asks Ray for (for the error when Ray cannot place it)."""
    actor = ray.remote(RolloutEngine)
    if place is None:
        on_gpu = e.backend == "sglang" and e.sglang_args.get("device", "cuda") != "cpu"
        gpus = e.engine_tp if on_gpu else 0
        return actor.options(num_cpus=0, num_gpus=gpus), f"{{'GPU': {gpus}}} on any node"
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = {n["NodeManagerHostname"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
    if place.hostname not in nodes:
        raise EngineError(f"colocated engine: trainer node {place.hostname!r} is not in the Ray cluster "
                          f"({sorted(nodes)}); start a Ray node on every trainer node")
    # The trainer (torchrun) already holds these GPUs outside Ray's accounting: ask Ray for none.
    return actor.options(num_cpus=0, num_gpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        nodes[place.hostname], soft=False)), f"no GPU, on node {place.hostname!r}"


def unplaced_reason(actor, index: int, count: int, asks: str, waited_s: float) -> str:
    """Why Ray has not placed engine `index`'s actor, as Ray sees it: the actor's state in
    Ray's actor table, what it asks for, and the GPUs of the cluster's live nodes (Ray's own
    "cannot be scheduled" warning goes to the driver's log, which this run does not show)."""
    try:
        from ray._private.state import actors  # the GCS actor table; needs no dashboard

        state = actors(actor._actor_id.hex()).get("State", "unknown")
    except Exception as exc:  # noqa: BLE001 - the reason is best effort; the error is not
        state = f"unknown ({exc})"
    nodes = [n for n in ray.nodes() if n["Alive"]]
    per_node = ", ".join(f"{n['NodeManagerHostname']}: {n['Resources'].get('GPU', 0):g}" for n in nodes)
    total, free = ray.cluster_resources().get("GPU", 0), ray.available_resources().get("GPU", 0)
    return (f"engine {index} of {count} was not placed by Ray within engine.schedule_timeout_s={waited_s:g} s: "
            f"Ray has its actor {state}, asking for {asks}; the cluster has {total:g} GPUs in all, "
            f"{free:g} free ({len(nodes)} live nodes, GPUs per node: {per_node}). Give Ray the engines' "
            "GPUs (`ray start --num-gpus N` on the nodes that host engines; "
            "examples/run_qwen2.5_32b_qae.sh gives Ray the GPUs torchrun does not use), lower "
            "engine.num_engines x engine.engine_tp, or raise engine.schedule_timeout_s")


class EnginePool:
    """The engines of one run; the rollout manager is one (it subclasses this)."""

    def _launch_engines(self, engine: EngineConfig, run_seed: int, model_path: str, log_dir: str,
                        placements: list[EnginePlacement] | None, api_key: str | None,
                        trainer_address: str | None) -> list:
        """Create the engine actors and return at once: each starts its server (seconds on CPU,
        minutes for SGLang at scale) while the caller does its own start-up; `_await_engines`
        waits for them. Engine i's server seed is (`run_seed` + i) mod 2**32: SGLang seeds numpy
        with it (set_random_seed), which takes 32 bits."""
        self.engine_cfg, self.api_key = engine, api_key
        e = engine
        multi_node = sum(1 for n in ray.nodes() if n["Alive"]) > 1
        handles, self._asks, self._starts = [], [], []
        for i in range(e.num_engines):
            place = placements[i] if placements is not None else None
            actor, asks = _engine_actor(e, place)
            handles.append(actor.remote(
                model_path, e.backend, e.host, e.port_base + 100 * i, e.engine_tp,
                e.mem_fraction_static, dict(e.sglang_args), e.startup_timeout_s, e.request_timeout_s,
                log_dir, (run_seed + i) % 2**32, place.devices if place else (), place is not None,
                python=e.sglang_python, api_key=api_key, bind_node_ip=multi_node,
                weight_sync_hosts=(trainer_address,) if trainer_address else (), start_now=False))
            self._asks.append(asks)
            self._starts.append(handles[-1].start.remote())  # runs once Ray has placed it
        return handles

    def _await_engines(self, handles: list) -> None:
        """Wait until Ray has placed every engine actor (engine.schedule_timeout_s; past it an
        EngineError says why, in Ray's terms), then until every server serves (each start
        has its own engine.startup_timeout_s; raises what an engine's start raised)."""
        e = self.engine_cfg
        placed = [h.__ray_ready__.remote() for h in handles]
        _, pending = ray.wait(placed, num_returns=len(placed), timeout=e.schedule_timeout_s)
        if pending:
            i = placed.index(pending[0])
            raise EngineError(unplaced_reason(handles[i], i, len(handles), self._asks[i], e.schedule_timeout_s))
        self._supervise([_Engine(h, url, e.engine_tp) for h, url in zip(handles, ray.get(self._starts))])

    def _supervise(self, engines: list[_Engine]) -> None:
        """Take charge of `engines` (serving, not yet holding weights)."""
        e = self.engine_cfg
        self.engines = engines
        self._clients: dict[str, SGLangClient] = {}
        self.requests_retried = 0
        self.watch = engine_watch_policy(e)
        self.probers = Probers(self.watch)
        """One /health prober per engine, shared by all its in-flight requests."""
        self._dead_lock = threading.Lock()
        self.warnings: list[str] = []
        """Engine warnings not yet taken by the driver (this actor's log goes to Ray's files)."""

    # ---- engines -------------------------------------------------------------------------
    def engine_endpoints(self) -> list[tuple[str, int]]:
        return [(en.url, en.tp) for en in self.engines if not en.dead]

    def probes_sent(self) -> dict[str, int]:
        """/health probes sent to each engine (by URL) since the pool started."""
        return self.probers.probes_sent()

    def engine_pids(self) -> list[int]:
        return [ray.get(en.actor.pid.remote()) for en in self.engines]

    def engines_needing_sync(self) -> list[str]:
        return [en.url for en in self.engines if not en.dead and en.synced_version is None]

    def mark_synced(self, urls: list[str], version: int) -> None:
        for en in self.engines:
            if en.url in urls:
                en.synced_version = version

    def take_warnings(self) -> list[str]:
        """The engine warnings (hangs, restarts) since the last call, for the driver to show."""
        with self._dead_lock:
            taken, self.warnings = self.warnings, []
        return taken

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        with self._dead_lock:
            self.warnings.append(message)

    def restarts_total(self) -> float:
        """Engine restarts since the run started (a restart during a weight sync included)."""
        return float(sum(en.restarts for en in self.engines))

    def sync_target(self, hung: dict[str, float]) -> tuple[list[str], list[tuple[str, int]], list[str]]:
        """Before a weight sync, in one call: restart what is dead or `hung`, then the live
        engines' endpoints and the warnings since the last call."""
        restarted = self.restart_dead_engines(hung)
        return restarted, self.engine_endpoints(), self.take_warnings()

    def synced(self, urls: list[str], version: int) -> tuple[list[int], float]:
        """After a weight sync, in one call: mark `urls` as holding `version`; the version each
        of them reports in /model_info (-1 for SGLang's "default": no update yet) and the
        engine restarts since the run started."""
        self.mark_synced(urls, version)
        versions = [self._client(en).weight_version() for en in self.engines if en.url in urls]
        return [int(v) if v.lstrip("-").isdigit() else -1 for v in versions], self.restarts_total()

    def restart_dead_engines(self, hung: dict[str, float] | None = None) -> list[str]:
        """Restart engines whose process died, that failed a request, that the trainer found
        `hung` ({url: seconds stuck}, during a weight sync) or that do not answer /health now;
        they wait for weights before serving."""
        restarted = []
        for en in self.engines:
            if not en.dead and en.url in (hung or {}):
                self._kill_hung(en, hung[en.url], "a weight sync")
            elif not en.dead:
                if ray.get(en.actor.is_alive.remote()):
                    self._probe(en)
                else:
                    en.dead = True
            if en.dead:
                if en.restarts >= self.engine_cfg.max_restarts:
                    raise EngineError(f"engine {en.url} died again after {en.restarts} restarts "
                                      "(engine.max_restarts); see its log under engine_logs/")
                old = en.url
                self._clients.pop(old, None)
                en.restarts += 1
                en.url = ray.get(en.actor.restart.remote())
                why = f"hung for {en.hung_s:.1f} s" if en.hung_s is not None else "dead"
                en.dead, en.synced_version, en.released, en.hung_s = False, None, set(), None
                restarted.append(en.url)
                self._warn(f"restarted engine {old} ({why}), now at {en.url}; it gets the current "
                           "weights before it serves")
        return restarted

    def _probe(self, en: _Engine) -> None:
        """Kill `en` when it gives no answer to engine.health_failures /health probes in a row
        (an answer of any status is alive: SGLang answers 503 while it warms up)."""
        client, t0 = self._client(en), time.monotonic()
        for _ in range(self.watch.probe_failures):
            if client.answers(timeout_s=self.watch.probe_timeout_s):
                return
        self._kill_hung(en, time.monotonic() - t0, "a health probe")

    def _kill_hung(self, en: _Engine, stuck_s: float, what: str) -> None:
        """A hung engine is a dead one: SIGKILL its process group now (it would not act on
        SIGTERM), so its in-flight requests fail at once and go elsewhere."""
        with self._dead_lock:
            if en.dead:
                return
            en.dead, en.hung_s = True, stuck_s
        self._warn(f"engine {en.url} hung: no answer to /health for {stuck_s:.1f} s during {what}; "
                   "killed it; its requests go to other engines and it is restarted with the "
                   "current weights at the next weight sync")
        ray.get(en.actor.kill.remote())

    def _serving(self) -> list[_Engine]:
        ready = [en for en in self.engines if not en.dead and en.synced_version is not None]
        if not ready:
            raise EngineError("no live engine holds the current weights; the trainer must sync "
                              "weights (restart_dead_engines + push) before generating")
        return ready

    def _client(self, en: _Engine) -> SGLangClient:
        """A client of `en` kept per URL: its session keeps the connection open (a new one
        per call cost a TCP handshake a request, several a step)."""
        client = self._clients.get(en.url)
        if client is None:
            client = SGLangClient(en.url, timeout_s=self.engine_cfg.request_timeout_s, api_key=self.api_key)
            self._clients[en.url] = client
        return client

    def pause(self) -> None:
        self._each_live(lambda en, c: c.pause_generation())

    def resume(self) -> None:
        self._each_live(lambda en, c: c.continue_generation())

    def release_memory(self, tags: list[str]) -> None:
        """Colocated: engines free `tags` ("weights", "kv_cache") of GPU memory for training;
        tags an engine already released are not sent again."""
        def release(en: _Engine, client: SGLangClient) -> None:
            todo = [t for t in tags if t not in en.released]
            if todo:
                client.release_memory_occupation(todo)
                en.released |= set(todo)

        self._each_live(release)

    def resume_memory(self, tags: list[str]) -> None:
        """Bring back those of `tags` each engine released (none for an engine that released
        nothing, e.g. before the first step or after a restart)."""
        def resume(en: _Engine, client: SGLangClient) -> None:
            todo = [t for t in tags if t in en.released]
            if todo:
                client.resume_memory_occupation(todo)
                en.released -= set(todo)

        self._each_live(resume)

    def released_tags(self) -> dict[str, list[str]]:
        return {en.url: sorted(en.released) for en in self.engines}

    def _each_live(self, call) -> None:
        """`call(engine, client)` on every live engine at once; a failure marks that engine
        dead (it is restarted, with current weights, at the next weight sync)."""
        live = [en for en in self.engines if not en.dead]
        clients = [self._client(en) for en in live]
        futures = [run_in_thread(lambda en=en, c=c: call(en, c)) for en, c in zip(live, clients)]
        for en, c, f in zip(live, clients, futures):
            try:
                wait_watching([(c, f)], self.watch, self.engine_cfg.request_timeout_s, "a control request",
                              self.probers)
            except EngineHung as exc:
                self._kill_hung(en, exc.stuck_s, "a control request")
            except EngineError as exc:
                self._warn(f"engine {en.url} failed ({exc}); it will be restarted")
                en.dead = True

    def stop_engines(self) -> None:
        """Stop every engine's server (each actor terminates the process group it started)."""
        ray.get([en.actor.stop.remote() for en in self.engines])
