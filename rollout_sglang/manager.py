"""The rollout manager (a Ray actor): generation, scoring, DAPO dynamic sampling, over the
engines of its EnginePool (engine_pool.py: start, hang kill, restart, control calls).

What it does: draws generation batches from the prompt stream and streams them
(streaming.py): one request per group, spread over the engines that hold the current weights,
each group decoded and scored (reward fn + overlong penalty) as soon as it returns, DAPO's
keep/drop decided in the order the groups were drawn, the next batch drawn as soon as it is
certainly needed, and every request still in flight aborted once the step's batch is full;
returns typed groups and the step's rollout metrics (tokens/s, engine busy fraction,
time-to-full-batch, groups aborted). A failed request is retried on another engine; a group
is accepted exactly once. Every engine request has a deadline sized for it (tokens it may
generate: per group, not per step) and a /health watch, one prober per engine shared by all
its requests (watchdog.py): a hung engine is killed and its requests go elsewhere (pool.py). Every sample gets its own `sampling_seed` from (run
seed, group id, sample index) and its own request id: the n samples of a group never share a
seed. Reproducibility: the CPU server always samples from the seed, so a resumed run repeats
itself; SGLang honours `sampling_seed` only with `--enable-deterministic-inference` (then per
(seed, position)) and otherwise samples non-reproducibly. What it does not: push weights (the
trainer owns the weight-update group) or compute advantages.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import ray

from rollout_sglang.config import DataConfig, EngineConfig, RewardConfig, RolloutConfig
from rollout_sglang.sglang.client import EngineError, GenerateOutput, SGLangClient
from rollout_sglang.data import PromptCursor, load_prompts
from rollout_sglang.engines.pool import EnginePool
from rollout_sglang.eval_metrics import default_ks, eval_summary
from rollout_sglang.rewards.scoring import RewardScorer
from rollout_sglang.rewards.registry import apply_overlong_penalty
from rollout_sglang.streaming import StreamResult, busy_fraction, stream_groups
from rollout_sglang.types import EnginePlacement, Group, Prompt, RolloutBatch, Sample
from rollout_sglang.engines.watchdog import EngineHung, call_watched, run_in_thread, tokens_requested

log = logging.getLogger(__name__)
MAX_GROUPS_IN_FLIGHT = 256
"""Group requests one manager has in flight at most (each holds a thread while it waits)."""


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


GROUP_ACCURACY_BINS = ("0", "0-25", "25-50", "50-75", "75-100", "100")
"""Bins of a group's mean accuracy in percent: exactly 0 (all wrong), (0, 25], (25, 50],
(50, 75], (75, 100), exactly 100 (all right)."""


def group_accuracy_histogram(groups: list[Group]) -> dict[str, float]:
    """Share of `groups` in each GROUP_ACCURACY_BINS bin of mean accuracy, as flat metrics
    `rollout/group_acc_hist/<bin>` (jsonl and TensorBoard scalars): where the prompts sit
    against K's two regimes, before dynamic sampling drops the all-equal ones."""
    counts = dict.fromkeys(GROUP_ACCURACY_BINS, 0)
    for g in groups:
        acc = sum(s.accuracy for s in g.samples) / max(len(g.samples), 1)
        inner = next(i for i, hi in enumerate((0.25, 0.5, 0.75, 1.0), start=1) if acc <= hi)
        counts[GROUP_ACCURACY_BINS[0 if acc <= 0 else 5 if acc >= 1 else inner]] += 1
    return {f"rollout/group_acc_hist/{b}": n / max(len(groups), 1) for b, n in counts.items()}


def _slice(request: Future, start: int, count: int) -> Future:
    """A future of outputs [start, start + count) of `request`'s (one group of a request that
    carries several)."""
    part: Future = Future()

    def settle(done: Future) -> None:
        if done.cancelled():
            part.cancel()
        elif done.exception() is not None:
            part.set_exception(done.exception())
        else:
            outputs = done.result()
            part.set_result(outputs[start: start + count] if outputs else [])

    request.add_done_callback(settle)
    return part


class RolloutManager(EnginePool):
    """Owns the engines (EnginePool) and the prompt stream of one run."""

    def __init__(self, rollout: RolloutConfig, engine: EngineConfig, reward: RewardConfig, data: DataConfig,
                 run_seed: int, model_path: str, log_dir: str, placements: list[EnginePlacement] | None = None,
                 api_key: str | None = None, trainer_address: str | None = None) -> None:
        """The run's sections it reads and `run_seed` (run.seed: engine and sampling seeds)."""
        self.rollout_cfg, self.reward_cfg, self.data_cfg, self.run_seed = rollout, reward, data, run_seed
        e = engine
        if placements is not None and len(placements) != e.num_engines:
            raise ValueError(f"{len(placements)} colocated placements for engine.num_engines={e.num_engines}")
        # Engines first: their servers take seconds to start (SGLang: minutes), and the reward
        # workers, tokenizer and prompts load meanwhile.
        handles = self._launch_engines(engine, run_seed, model_path, log_dir, placements, api_key, trainer_address)
        self.scorer = None
        try:
            # Rewards run in processes: math-verify needs a main thread (actor methods run on
            # worker threads), and a hung reward can only be stopped by killing its process.
            rw = reward
            self.scorer = RewardScorer(rw.name, rw.num_workers, rw.timeout_s, rw.failure_score)
            self.reward_errors = 0
            self._load_prompts(model_path)
            self._await_engines(handles)
        except BaseException:
            # A reward module that does not import, bad data or an engine that fails to start:
            # no engine outlives the error (Ray would keep the started ones until the driver exits).
            for h in handles:
                ray.kill(h)
            if self.scorer is not None:
                self.scorer.close()
            raise
        r = rollout
        # A thread per group request in flight (two generation batches at most are).
        self.group_threads = ThreadPoolExecutor(
            max(16, min(MAX_GROUPS_IN_FLIGHT, 2 * max(r.gen_batch_prompts, r.prompts_per_step))))
        # Request ids: this manager's tag, one number per stream, then group and sample.
        self._rid_tag, self._stream_ids = uuid.uuid4().hex[:12], itertools.count(1)

    def _load_prompts(self, model_path: str) -> None:
        from transformers import AutoTokenizer

        d, r = self.data_cfg, self.rollout_cfg
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        kw = dict(prompt_key=d.prompt_key, answer_key=d.answer_key,
                  apply_chat_template=d.apply_chat_template, max_prompt_tokens=r.max_prompt_tokens)
        self.train_prompts = load_prompts(d.train_path, self.tokenizer, **kw)
        self.val_prompts = load_prompts(d.val_path, self.tokenizer, **kw) if d.val_path else []
        self.cursor = PromptCursor(len(self.train_prompts), d.seed, d.shuffle)
        self.next_group_id = 0

    def ready(self) -> bool:
        return True

    # ---- generation ----------------------------------------------------------------------
    def _request(self, rows: list[list[int]], params: list[dict], first: int, rids: list[str],
                 spans: list, placed: dict[str, str], cancelled: threading.Event) -> list[GenerateOutput]:
        """Generate `rows` on a serving engine, with a deadline sized for the tokens they may
        generate; on failure mark the engine dead (kill it when hung) and try the next. Each
        attempt's (engine, start, end) goes to `spans`, its engine to `placed[rid]` of each id; once
        `cancelled`, nothing is sent."""
        tried = 0
        deadline_s = self.watch.deadline_s(tokens_requested(len(rows), params))
        while not cancelled.is_set():
            serving = self._serving()
            en = serving[(first + tried) % len(serving)]
            client = SGLangClient(en.url, timeout_s=deadline_s, api_key=self.api_key)
            start = time.perf_counter()
            placed.update(dict.fromkeys(rids, en.url))
            try:
                return call_watched(client, lambda: client.generate(rows, params, True, rids),
                                    self.watch, deadline_s, f"a /generate of {len(rows)} rows", self.probers)
            except EngineHung as exc:
                self._kill_hung(en, exc.stuck_s, "a /generate request")
            except EngineError as exc:
                self._warn(f"engine {en.url} failed ({exc}); retrying the request elsewhere")
                en.dead = True
            finally:
                spans.append((en.url, start, time.perf_counter()))
            tried += 1
            self.requests_retried += 1
        return []

    def _stream(self, draw, n: int, params: dict, version: int, target: int, keep) -> StreamResult:
        """Stream groups (streaming.py): one request per group, its n samples each with its
        own request id and `sampling_seed` (run seed, group id, sample index), whatever engine
        or thread serves it."""
        prefix, spans, placed = f"{self._rid_tag}.{next(self._stream_ids)}.", [], {}
        cancelled = threading.Event()

        def submit(batch: list[tuple[int, Prompt]]) -> list[Future]:
            """A request per rollout.groups_per_request groups; a future per group."""
            k, futures = self.rollout_cfg.groups_per_request, []
            for i in range(0, len(batch), k):
                part = batch[i: i + k]
                rows = [list(p.prompt_ids) for _, p in part for _ in range(n)]
                per = [{**params, "sampling_seed": sample_seed(self.run_seed, gid, j)}
                       for gid, _ in part for j in range(n)]
                rids = [f"{prefix}{gid}.{j}" for gid, _ in part for j in range(n)]
                request = self.group_threads.submit(self._request, rows, per, i // k, rids, spans, placed, cancelled)
                futures += [_slice(request, g * n, n) for g in range(len(part))]
            return futures

        def abort(gids: list[int]) -> None:
            cancelled.set()
            by_url: dict[str, list[str]] = {}
            for gid in gids:
                if f"{prefix}{gid}.0" in placed:
                    by_url.setdefault(placed[f"{prefix}{gid}.0"], []).extend(f"{prefix}{gid}.{j}" for j in range(n))
            self._abort_on(by_url)

        res = stream_groups(draw, submit, lambda answered: self._groups(answered, version), keep, abort, target)
        res.spans = spans
        return res

    def _abort_on(self, by_url: dict[str, list[str]]) -> None:
        """/abort_request of each id on its engine, the engines at once. SGLang looks the id up
        exactly (with one tokenizer worker), so every sample's id is sent; a failed abort is
        left alone (the request fails, or answers, by itself)."""
        def send(url: str, rids: list[str]) -> None:
            client = SGLangClient(url, timeout_s=self.watch.probe_timeout_s, api_key=self.api_key)
            for rid in rids:
                client.abort_request(rid)

        for url, f in [(url, run_in_thread(lambda u=url, r=rids: send(u, r))) for url, rids in by_url.items()]:
            try:
                f.result(timeout=self.watch.probe_timeout_s * 4)
            except Exception as exc:  # noqa: BLE001 - see above
                log.info("abort on %s failed: %s", url, exc)

    def _draw(self, prompts: list[Prompt]) -> list[tuple[int, Prompt]]:
        """`prompts` with the next group ids."""
        first, self.next_group_id = self.next_group_id, self.next_group_id + len(prompts)
        return [(first + i, p) for i, p in enumerate(prompts)]

    def _groups(self, answered: list[tuple[int, Prompt, list[GenerateOutput]]], version: int) -> list[Group]:
        """The scored groups of requests' outputs (reward, then the overlong penalty), all
        scored in one call."""
        texts, answers, labels = [], [], []
        for gid, prompt, outputs in answered:
            texts += [self.tokenizer.decode(o.output_ids, skip_special_tokens=True) for o in outputs]
            answers += [prompt.answer] * len(outputs)
            labels += [f"prompt {prompt.index} (group {gid}, sample {k})" for k in range(len(outputs))]
        scored = self.scorer.score(texts, answers, labels)
        self.reward_errors += len(scored.failures)
        r, rw, results, groups = self.rollout_cfg, self.reward_cfg, iter(scored.results), []
        for gid, prompt, outputs in answered:
            samples = []
            for o, res in zip(outputs, results):
                score = res.score
                if rw.overlong_buffer_enable:
                    score = apply_overlong_penalty(score, len(o.output_ids), r.max_response_tokens,
                                                   rw.overlong_buffer_tokens, rw.overlong_penalty_factor)
                samples.append(Sample(gid, prompt.prompt_ids, tuple(o.output_ids), tuple(o.output_logprobs),
                                      o.finish_reason, score, res.accuracy, version, res.pred))
            groups.append(Group(gid, prompt, tuple(samples)))
        return groups

    def _params(self, temperature: float, top_p: float) -> dict:
        r = self.rollout_cfg
        return {"temperature": temperature, "top_p": top_p, "top_k": r.top_k,
                "max_new_tokens": r.max_response_tokens}

    def generate(self, policy_version: int) -> RolloutBatch:
        """The step's groups: DAPO dynamic sampling over generation batches, streamed."""
        r = self.rollout_cfg
        t0 = time.perf_counter()
        errors_before = self.reward_errors
        size = r.gen_batch_prompts if r.dynamic_sampling else r.prompts_per_step
        limit, drawn = (r.max_gen_batches if r.dynamic_sampling else 1), []

        def draw() -> list[tuple[int, Prompt]] | None:
            if len(drawn) == limit:
                return None
            drawn.append(size)
            return self._draw([self.train_prompts[i] for i in self.cursor.next_indices(size)])

        urls = [en.url for en in self._serving()]
        res = self._stream(draw, r.n_samples_per_prompt, self._params(r.temperature, r.top_p), policy_version,
                           r.prompts_per_step, lambda g: bool(select_groups([g], r.dynamic_sampling)[0]))
        gen_s = time.perf_counter() - t0
        if len(res.kept) < r.prompts_per_step:
            self._underfilled(len(res.kept), res.batches)
        # As verl's DAPO, nothing carries over to the next step: every trained sample comes
        # from the weights of this rollout step (groups past the full batch are aborted).
        groups = res.kept
        dropped = select_groups(res.decided, r.dynamic_sampling)[1]
        metrics = {**self._metrics(groups, res.decided, dropped, res.batches, gen_s),
                   **group_accuracy_histogram(res.decided)}
        metrics.update({
            "rollout/groups_discarded_extra": float(res.discarded_groups),
            "rollout/groups_aborted": float(res.aborted_groups),
            "rollout/gen_tokens_per_s": res.returned_tokens / gen_s if gen_s > 0 else 0.0,
            "rollout/engine_busy_frac": busy_fraction(res.spans, urls, t0, t0 + gen_s),
            "rollout/time_to_full_batch_s": res.time_to_full_s,
            "rollout/groups": float(len(groups)),
            "rollout/underfilled": float(len(groups) < r.prompts_per_step),
            "rollout/samples": float(sum(len(g.samples) for g in groups)),
            "rollout/requests_retried_total": float(self.requests_retried),
            "rollout/engine_restarts_total": self.restarts_total(),
            "reward/errors": float(self.reward_errors - errors_before)})
        return RolloutBatch(groups, policy_version, metrics)

    def _underfilled(self, kept: int, batches: int) -> None:
        """The generation batches are spent and the batch is not full: stop when asked to;
        otherwise the step trains on what was kept (rank 0's loop warns on the terminal; the
        loss is a token-mean over it; nothing kept = no update this step)."""
        r = self.rollout_cfg
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
        r = self.rollout_cfg
        errors_before = self.reward_errors
        first_id, prompts = self.next_group_id, self.val_prompts[start:stop]
        batches = [self._draw(prompts)]
        self.next_group_id = first_id
        res = self._stream(lambda: batches.pop() if batches else None, n_samples,
                           self._params(r.val_temperature, r.val_top_p), -1, len(prompts), lambda g: True)
        groups = res.decided
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

    def shutdown(self) -> None:
        self.stop_engines()
        self.scorer.close()
        self.group_threads.shutdown(wait=False)
