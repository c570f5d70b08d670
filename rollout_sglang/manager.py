"""The rollout manager (a Ray actor): engines, generation, scoring, DAPO dynamic sampling.

What it does: starts the engines, spreads generation requests over the engines that hold the
current weights, decodes and scores responses (reward fn + overlong penalty), drops groups
whose accuracy is all-equal and refills from new generation batches until the step's batch is
full, and returns typed groups. A failed request is retried on another engine; a group is
accepted exactly once. Dead engines are restarted on request and get no work until the
trainer has pushed the current weights to them. Every engine request has a deadline sized for
it (tokens it may generate) and a /health watch: a hung engine (a stopped or wedged server that
stops answering /health) is treated as a dead one -- killed at once, its requests retried
elsewhere, restarted with the current weights at the next sync -- with a warning naming it and
how long it was stuck. Remembers which memory tags each engine
released and resumes only those (SGLang's scheduler dies on a resume of a tag it did not
release). Every sample gets its own `sampling_seed` from (run seed, group id, sample index):
the n samples of a group never share a seed. Reproducibility: the CPU server always samples
from the seed, so a resumed run repeats itself; SGLang honours `sampling_seed` only with
`--enable-deterministic-inference` (then per (seed, position)) and otherwise samples
non-reproducibly. What it does not: push weights (the trainer owns the weight-update group)
or compute advantages.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import ray

from rollout_sglang.client import EngineError, SGLangClient
from rollout_sglang.data import PromptCursor, load_prompts
from rollout_sglang.engine import RolloutEngine
from rollout_sglang.eval_metrics import default_ks, eval_summary
from rollout_sglang.reward_scoring import RewardScorer
from rollout_sglang.rewards import apply_overlong_penalty
from rollout_sglang.types import EnginePlacement, Group, Prompt, RolloutBatch, Sample
from rollout_sglang.watchdog import EngineHung, WatchPolicy, call_watched, run_in_thread, tokens_requested, wait_watching

log = logging.getLogger(__name__)
_ROWS_PER_REQUEST = 64


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


def engine_watch_policy(e) -> WatchPolicy:
    """The request deadlines and /health probing of `cfg.engine`."""
    return WatchPolicy(e.request_s_per_token, e.request_floor_s, e.health_interval_s,
                       e.health_timeout_s, e.health_failures)


def sample_seed(run_seed: int, group_id: int, sample_index: int) -> int:
    """The `sampling_seed` of one sample: distinct for every (group, sample) of a run, and
    inside SGLang's int64 range."""
    return ((run_seed * 1_000_003 + group_id) * 4099 + sample_index) % (2**63 - 1)


def select_groups(groups: list[Group], dynamic: bool) -> tuple[list[Group], dict[str, int]]:
    """Groups DAPO keeps, and how many were dropped for being all-correct / all-wrong."""
    if not dynamic:
        return list(groups), {"all_correct": 0, "all_wrong": 0}
    kept = [g for g in groups if not g.accuracy_is_constant]
    dropped = [g for g in groups if g.accuracy_is_constant]
    correct = sum(1 for g in dropped if g.samples[0].accuracy > 0)
    return kept, {"all_correct": correct, "all_wrong": len(dropped) - correct}


def _engine_actor(e, place: EnginePlacement | None):
    """The Ray actor class of one engine: its own GPUs, or pinned to its trainer ranks' node."""
    actor = ray.remote(RolloutEngine)
    if place is None:
        on_gpu = e.backend == "sglang" and e.sglang_args.get("device", "cuda") != "cpu"
        return actor.options(num_cpus=0, num_gpus=e.engine_tp if on_gpu else 0)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = {n["NodeManagerHostname"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
    if place.hostname not in nodes:
        raise EngineError(f"colocated engine: trainer node {place.hostname!r} is not in the Ray cluster "
                          f"({sorted(nodes)}); start a Ray node on every trainer node")
    # The trainer (torchrun) already holds these GPUs outside Ray's accounting: ask Ray for none.
    return actor.options(num_cpus=0, num_gpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        nodes[place.hostname], soft=False))


class RolloutManager:
    """Owns the engines and the prompt stream of one run."""

    def __init__(self, cfg, model_path: str, log_dir: str,
                 placements: list[EnginePlacement] | None = None, api_key: str | None = None,
                 trainer_address: str | None = None) -> None:
        self.cfg, self.api_key = cfg, api_key
        e = cfg.engine
        if placements is not None and len(placements) != e.num_engines:
            raise ValueError(f"{len(placements)} colocated placements for engine.num_engines={e.num_engines}")
        # Engines first: their servers take seconds to start (SGLang: minutes), and everything
        # below happens meanwhile.
        multi_node = sum(1 for n in ray.nodes() if n["Alive"]) > 1
        handles, self.scorer = [], None
        for i in range(e.num_engines):
            place = placements[i] if placements is not None else None
            handles.append(_engine_actor(e, place).remote(
                model_path, e.backend, e.host, e.port_base + 100 * i, e.engine_tp,
                e.mem_fraction_static, dict(e.sglang_args), e.startup_timeout_s, e.request_timeout_s,
                log_dir, cfg.run.seed + i, place.devices if place else (), place is not None,
                python=e.sglang_python, api_key=api_key, bind_node_ip=multi_node,
                weight_sync_hosts=(trainer_address,) if trainer_address else ()))
        try:
            # Rewards run in processes: math-verify needs a main thread (actor methods run on
            # worker threads), and a hung reward can only be stopped by killing its process.
            rw = cfg.reward
            self.scorer = RewardScorer(rw.name, rw.num_workers, rw.timeout_s, rw.failure_score)
            self.reward_errors = 0
            self._load_data(model_path)
            self.engines = [_Engine(h, ray.get(h.url.remote()), e.engine_tp) for h in handles]
        except BaseException:
            # A reward module that does not import, bad data or an engine that fails to start:
            # no engine outlives the error (Ray would keep the started ones until the driver exits).
            for h in handles:
                ray.kill(h)
            if self.scorer is not None:
                self.scorer.close()
            raise
        self._clients: dict[str, SGLangClient] = {}
        self.requests_retried = 0
        self.watch = engine_watch_policy(e)
        self._dead_lock = threading.Lock()
        self.warnings: list[str] = []
        """Engine warnings not yet taken by the driver (this actor's log goes to Ray's files)."""
        self.threads = ThreadPoolExecutor(max(4, 2 * len(self.engines)))

    def _load_data(self, model_path: str) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        d, r = cfg.data, cfg.rollout
        kw = dict(prompt_key=d.prompt_key, answer_key=d.answer_key,
                  apply_chat_template=d.apply_chat_template, max_prompt_tokens=r.max_prompt_tokens)
        self.train_prompts = load_prompts(d.train_path, self.tokenizer, **kw)
        self.val_prompts = load_prompts(d.val_path, self.tokenizer, **kw) if d.val_path else []
        self.cursor = PromptCursor(len(self.train_prompts), d.seed, d.shuffle)
        self.next_group_id = 0

    def ready(self) -> bool:
        return True

    # ---- engines -------------------------------------------------------------------------
    def engine_endpoints(self) -> list[tuple[str, int]]:
        return [(en.url, en.tp) for en in self.engines if not en.dead]

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
                if en.restarts >= self.cfg.engine.max_restarts:
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
        """Kill `en` when it misses engine.health_failures /health probes in a row."""
        client, t0 = self._client(en), time.monotonic()
        for _ in range(self.watch.probe_failures):
            if client.health(timeout_s=self.watch.probe_timeout_s):
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

    # ---- generation ----------------------------------------------------------------------
    def _client(self, en: _Engine) -> SGLangClient:
        """A client of `en` kept per URL: its session keeps the connection open (a new one
        per call cost a TCP handshake a request, several a step)."""
        client = self._clients.get(en.url)
        if client is None:
            client = SGLangClient(en.url, timeout_s=self.cfg.engine.request_timeout_s, api_key=self.api_key)
            self._clients[en.url] = client
        return client

    def _request(self, rows: list[list[int]], params: list[dict], first: int) -> list:
        """Generate `rows` on a serving engine, with a deadline sized for the tokens they may
        generate; on failure mark the engine dead (kill it when hung) and try the next."""
        tried = 0
        deadline_s = self.watch.deadline_s(tokens_requested(len(rows), params))
        while True:
            serving = self._serving()
            en = serving[(first + tried) % len(serving)]
            client = SGLangClient(en.url, timeout_s=deadline_s, api_key=self.api_key)
            try:
                return call_watched(client, lambda: client.generate(rows, params, return_logprob=True),
                                    self.watch, deadline_s, f"a /generate of {len(rows)} rows")
            except EngineHung as exc:
                self._kill_hung(en, exc.stuck_s, "a /generate request")
                tried += 1
                self.requests_retried += 1
            except EngineError as exc:
                self._warn(f"engine {en.url} failed ({exc}); retrying the request elsewhere")
                en.dead = True
                tried += 1
                self.requests_retried += 1

    def _generate_groups(self, prompts: list[Prompt], n: int, params: dict, version: int) -> list[Group]:
        per = max(1, _ROWS_PER_REQUEST // n)
        chunks = [prompts[i: i + per] for i in range(0, len(prompts), per)]
        # A seed per sample (run seed, group id, sample index), whatever engine or thread
        # serves it: the group's n samples differ even where SGLang seeds by (seed, position).
        first_ids = [self.next_group_id + i * per for i in range(len(chunks))]
        futures = [self.threads.submit(
            self._request, [list(p.prompt_ids) for p in c for _ in range(n)],
            [{**params, "sampling_seed": sample_seed(self.cfg.run.seed, gid + k, j)}
             for k in range(len(c)) for j in range(n)], i)
            for i, (c, gid) in enumerate(zip(chunks, first_ids))]
        outputs = [o for f in futures for o in f.result()]
        texts = [self.tokenizer.decode(o.output_ids, skip_special_tokens=True) for o in outputs]
        answers = [p.answer for p in prompts for _ in range(n)]
        labels = [f"prompt {p.index} (group {self.next_group_id + gi}, sample {k})"
                  for gi, p in enumerate(prompts) for k in range(n)]
        scored = self.scorer.score(texts, answers, labels)
        results = scored.results
        self.reward_errors += len(scored.failures)
        groups = []
        for gi, prompt in enumerate(prompts):
            samples = []
            for o, res in zip(outputs[gi * n:(gi + 1) * n], results[gi * n:(gi + 1) * n]):
                score = res.score
                if self.cfg.reward.overlong_buffer_enable:
                    score = apply_overlong_penalty(score, len(o.output_ids), self.cfg.rollout.max_response_tokens,
                                                   self.cfg.reward.overlong_buffer_tokens,
                                                   self.cfg.reward.overlong_penalty_factor)
                samples.append(Sample(self.next_group_id, prompt.prompt_ids, tuple(o.output_ids),
                                      tuple(o.output_logprobs), o.finish_reason, score, res.accuracy, version,
                                      res.pred))
            groups.append(Group(self.next_group_id, prompt, tuple(samples)))
            self.next_group_id += 1
        return groups

    def _params(self, temperature: float, top_p: float) -> dict:
        r = self.cfg.rollout
        return {"temperature": temperature, "top_p": top_p, "top_k": r.top_k,
                "max_new_tokens": r.max_response_tokens}

    def generate(self, policy_version: int) -> RolloutBatch:
        """The step's groups: DAPO dynamic sampling over generation batches."""
        r = self.cfg.rollout
        t0 = time.perf_counter()
        params = self._params(r.temperature, r.top_p)
        kept, generated, dropped = [], [], {"all_correct": 0, "all_wrong": 0}
        errors_before = self.reward_errors
        batches = 0
        while len(kept) < r.prompts_per_step:
            if batches == (r.max_gen_batches if r.dynamic_sampling else 1):
                self._underfilled(len(kept), batches)
                break
            size = r.gen_batch_prompts if r.dynamic_sampling else r.prompts_per_step
            prompts = [self.train_prompts[i] for i in self.cursor.next_indices(size)]
            new = self._generate_groups(prompts, r.n_samples_per_prompt, params, policy_version)
            batches += 1
            generated += new
            take, counts = select_groups(new, r.dynamic_sampling)
            kept += take
            dropped = {k: dropped[k] + counts[k] for k in dropped}
        gen_s = time.perf_counter() - t0
        # As verl's DAPO: kept groups beyond the batch are discarded, not carried over, so
        # every trained sample comes from the weights of this rollout step.
        groups = kept[: r.prompts_per_step]
        metrics = self._metrics(groups, generated, dropped, batches, gen_s)
        metrics["rollout/groups_discarded_extra"] = float(len(kept) - len(groups))
        metrics["rollout/groups"] = float(len(groups))
        metrics["rollout/underfilled"] = float(len(groups) < r.prompts_per_step)
        metrics["rollout/samples"] = float(sum(len(g.samples) for g in groups))
        metrics["rollout/requests_retried_total"] = float(self.requests_retried)
        metrics["rollout/engine_restarts_total"] = self.restarts_total()
        metrics["reward/errors"] = float(self.reward_errors - errors_before)
        return RolloutBatch(groups, policy_version, metrics)

    def _underfilled(self, kept: int, batches: int) -> None:
        """The generation batches are spent and the batch is not full: stop when asked to;
        otherwise the step trains on what was kept (rank 0's loop warns on the terminal; the
        loss is a token-mean over it; nothing kept = no update this step)."""
        r = self.cfg.rollout
        if r.on_underfilled == "fail":
            raise RuntimeError(
                f"dynamic sampling kept {kept} of rollout.prompts_per_step={r.prompts_per_step} groups "
                f"after {batches} generation batches of {r.gen_batch_prompts} prompts (the rest were "
                "all-correct or all-wrong); rollout.on_underfilled=fail. Raise rollout.max_gen_batches "
                "or rollout.gen_batch_prompts, or use easier/harder data")

    def _metrics(self, groups, generated, dropped, batches, gen_s) -> dict[str, float]:
        every = [s for g in generated for s in g.samples]
        kept = [s for g in groups for s in g.samples]
        tokens = sum(len(s.response_ids) for s in every)
        n = max(len(every), 1)
        return {
            "rollout/gen_batches": float(batches),
            "rollout/groups_generated": float(len(generated)),
            "rollout/groups_dropped_all_correct": float(dropped["all_correct"]),
            "rollout/groups_dropped_all_wrong": float(dropped["all_wrong"]),
            "rollout/response_tokens": float(tokens),
            "rollout/tokens_per_s": tokens / gen_s if gen_s > 0 else 0.0,
            "rollout/generate_s": gen_s,
            "rollout/accuracy_all": sum(s.accuracy for s in every) / n,
            "rollout/reward_all": sum(s.reward for s in every) / n,
            "rollout/accuracy_mean": sum(s.accuracy for s in kept) / max(len(kept), 1),
            "rollout/reward_mean": sum(s.reward for s in kept) / max(len(kept), 1),
            "rollout/response_len_mean": tokens / n,
            "rollout/truncated_frac": sum(s.finish_reason == "length" for s in every) / n,
        }

    def num_val_prompts(self) -> int:
        return len(self.val_prompts)

    def eval_groups(self, start: int, stop: int, n_samples: int) -> tuple[list[Group], int]:
        """Scored groups of validation prompts [start, stop) at the validation sampling
        parameters, and how many of their rewards failed. Not training groups: the group ids
        are handed back, so evaluating changes nothing a resumed run repeats."""
        r = self.cfg.rollout
        errors_before = self.reward_errors
        groups = self._generate_groups(self.val_prompts[start:stop], n_samples,
                                       self._params(r.val_temperature, r.val_top_p), -1)
        self.next_group_id -= len(groups)
        return groups, self.reward_errors - errors_before

    def evaluate(self, n_samples: int) -> dict[str, float]:
        """avg@n, pass@k and maj@k (k = 1, 2, 4, ... n) over the validation prompts, overall
        and per data source: the same estimators as `python -m megatron_qae.eval`."""
        if not self.val_prompts:
            return {}
        groups, errors = self.eval_groups(0, len(self.val_prompts), n_samples)
        return eval_summary(groups, default_ks(n_samples), errors)

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"cursor": self.cursor.state_dict(), "next_group_id": self.next_group_id}

    def load_state_dict(self, state: dict) -> None:
        self.cursor.load_state_dict(state["cursor"])
        self.next_group_id = int(state["next_group_id"])

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
                wait_watching([(c, f)], self.watch, self.cfg.engine.request_timeout_s, "a control request")
            except EngineHung as exc:
                self._kill_hung(en, exc.stuck_s, "a control request")
            except EngineError as exc:
                self._warn(f"engine {en.url} failed ({exc}); it will be restarted")
                en.dead = True

    def shutdown(self) -> None:
        ray.get([en.actor.stop.remote() for en in self.engines])
        self.scorer.close()
        self.threads.shutdown(wait=False)
