"""Running a reward function over a batch of responses, so that no response can break the run.

What it does: `RewardScorer` keeps `num_workers` spawned worker processes, each of which loads
the reward by its `reward.name` at start and calls it on its main thread (math-verify times
itself out with signal.alarm, which works only there). Responses go out in chunks and come
back one by one, and the response a worker is on has a deadline; a response whose reward raises, passes the deadline (its worker is killed and
replaced), kills its worker, or returns something that is not a RewardResult with finite
numbers gets `failure_score` and accuracy 0, is listed in the returned failures, and the first
failure of the run is logged once with its traceback and the sample's label (prompt id). A
reward module that does not import fails the scorer's construction with a ValueError naming
the module and the import error. What it does not: decide what a failure means for training
(the manager counts them in `reward/errors`), or apply the overlong penalty.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from rollout_sglang.rewards.registry import RewardFn, RewardResult, check_result, load_reward_fn

log = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 300.0
"""How long a worker may take to start and import the reward module."""
CHUNK_RESPONSES = 16
"""Responses handed to a worker at once (one pipe round trip per response would cost ~7x)."""


@dataclass(frozen=True)
class RewardFailure:
    """A response whose reward could not be computed."""

    index: int
    """Position of the response in the scored batch."""
    reason: str
    """What went wrong, one line (raised / timed out / invalid result / worker died)."""
    detail: str
    """The traceback or the offending value."""


@dataclass(frozen=True)
class ScoredBatch:
    """Rewards of a batch, failures already replaced by the failure score."""

    results: list[RewardResult]
    """One result per response, in input order."""
    failures: list[RewardFailure]
    """The responses that got the failure score, in input order."""


def _die_with_parent() -> None:
    """On Linux, end this worker when the process that spawned it dies (a killed rollout
    manager must not leave scoring processes behind)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _plain(result: RewardResult) -> RewardResult:
    """Plain floats / str, so numpy scalars or bools a user returns cross the pipe as numbers."""
    pred = result.pred if result.pred is None else str(result.pred)
    return RewardResult(float(result.score), float(result.accuracy), pred)


def _call(fn: RewardFn, text: str, answer: str) -> tuple[str, RewardResult | str]:
    """("ok", result) or (what went wrong, traceback / offending value)."""
    try:
        result = fn(text, answer)
    except Exception:
        return "raised", traceback.format_exc()
    problem = check_result(result)
    return ("ok", _plain(result)) if problem is None else ("invalid result", problem)


def _worker_main(conn: Connection, reward_name: str) -> None:
    """A scoring process: load the reward, then score chunks of (text, answer) until None,
    sending each result as soon as it is known (the parent times responses one by one)."""
    _die_with_parent()
    try:
        fn = load_reward_fn(reward_name)
    except ValueError as exc:
        conn.send(("import_error", str(exc)))
        return
    conn.send(("ready", ""))
    while (chunk := conn.recv()) is not None:
        for text, answer in chunk:
            conn.send(_call(fn, text, answer))


_WORKER_LOST = ("timed out", "worker died")


@dataclass
class _Assignment:
    """The responses a worker holds."""

    pending: deque[int]
    """Indices sent to the worker and not answered yet, in the order it scores them."""
    deadline: float
    """time.monotonic() by which the first pending response must be answered."""


class _Worker:
    """One scoring process and its end of the pipe."""

    def __init__(self, reward_name: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, reward_name), daemon=True)
        self.process.start()
        child.close()

    def wait_ready(self, timeout_s: float) -> None:
        if not self.conn.poll(timeout_s):
            self.kill()
            raise ValueError(f"the reward worker did not load its reward within {timeout_s:.0f} s "
                             "(does the reward module hang at import?)")
        try:
            kind, detail = self.conn.recv()
        except EOFError:
            self.process.join(5)
            kind, detail = "import_error", f"the worker process died at start (exit code {self.process.exitcode})"
        if kind != "ready":
            self.kill()
            raise ValueError(detail)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()


class RewardScorer:
    """Scores batches in worker processes; a failing response never stops the batch."""

    def __init__(self, reward_name: str, num_workers: int, timeout_s: float, failure_score: float) -> None:
        if num_workers < 1:
            raise ValueError(f"reward.num_workers={num_workers}: rewards run in worker processes; set >= 1")
        self.reward_name, self.timeout_s, self.failure_score = reward_name, timeout_s, failure_score
        self.logged_failure = False
        self.lock = threading.Lock()
        self.workers: list[_Worker] = []
        try:
            for _ in range(num_workers):
                self.workers.append(_Worker(reward_name))
            for w in self.workers:
                w.wait_ready(STARTUP_TIMEOUT_S)
        except ValueError:
            self.close()
            raise

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker(self.reward_name)
        fresh.wait_ready(STARTUP_TIMEOUT_S)
        self.workers[self.workers.index(worker)] = fresh
        return fresh

    def _send(self, w: _Worker, chunk: list[tuple[str, str]]) -> _Worker:
        """Hand `chunk` to `w`, replacing it first if it died while idle; the worker that took it."""
        if not w.process.is_alive():
            w = self._replace(w)
        try:
            w.conn.send(chunk)
        except OSError:  # died between the check and the send
            w = self._replace(w)
            w.conn.send(chunk)
        return w

    def score(self, texts: list[str], answers: list[str], labels: list[str]) -> ScoredBatch:
        """Rewards of `texts` against `answers`; `labels` name each sample in the failure log."""
        if not len(texts) == len(answers) == len(labels):
            raise ValueError(f"{len(texts)} texts, {len(answers)} answers, {len(labels)} labels: "
                             "one of each per response")
        with self.lock:  # the workers' pipes carry one batch at a time (actor methods are threads)
            results, failures = self._score(texts, answers)
        self._log_first(failures, labels)
        return ScoredBatch(results, failures)

    def _score(self, texts: list[str], answers: list[str]) -> tuple[list[RewardResult], list[RewardFailure]]:
        results: list[RewardResult | None] = [None] * len(texts)
        failures: list[RewardFailure] = []
        todo = deque(range(len(texts)))
        busy: dict[_Worker, _Assignment] = {}
        while todo or busy:
            for w in list(self.workers):
                if w not in busy and todo:
                    size = min(CHUNK_RESPONSES, -(-len(todo) // len(self.workers)))  # balanced tail
                    chunk = [todo.popleft() for _ in range(size)]
                    w = self._send(w, [(texts[i], answers[i]) for i in chunk])
                    busy[w] = _Assignment(deque(chunk), time.monotonic() + self.timeout_s)
            next_deadline = min(a.deadline for a in busy.values())
            ready = wait([w.conn for w in busy], timeout=max(0.0, next_deadline - time.monotonic()))
            for w, a in list(busy.items()):
                if w.conn not in ready and a.deadline > time.monotonic():
                    continue
                i = a.pending.popleft()
                outcome = self._collect(w, w.conn in ready)
                if isinstance(outcome, RewardResult):
                    results[i] = outcome
                else:
                    failures.append(RewardFailure(i, *outcome))
                    results[i] = RewardResult(self.failure_score, 0.0, None)
                    if outcome[0] in _WORKER_LOST:  # the rest of its chunk goes to another worker
                        todo.extendleft(reversed(a.pending))
                        a.pending.clear()
                a.deadline = time.monotonic() + self.timeout_s  # the worker's next response starts now
                if not a.pending:
                    del busy[w]
        failures.sort(key=lambda f: f.index)
        assert all(r is not None for r in results), "every response gets a result or a failure"
        return results, failures

    def _collect(self, w: _Worker, answered: bool) -> RewardResult | tuple[str, str]:
        """The worker's next result, or (reason, detail); a timed-out or dead worker is replaced."""
        if not answered:
            self._replace(w)
            return "timed out", f"no result within reward.timeout_s={self.timeout_s} s; the worker was killed"
        try:
            kind, payload = w.conn.recv()
        except EOFError:
            w.process.join(5)
            code = w.process.exitcode
            self._replace(w)
            return "worker died", f"the scoring process exited (code {code}) while scoring this response"
        return payload if kind == "ok" else (kind, payload)

    def _log_first(self, failures: list[RewardFailure], labels: list[str]) -> None:
        if failures and not self.logged_failure:
            self.logged_failure = True
            f = failures[0]
            log.error("reward %r failed on %s (%s); it and every later failure get "
                      "reward.failure_score=%s and are counted in reward/errors (logged once):\n%s",
                      self.reward_name, labels[f.index], f.reason, self.failure_score, f.detail)

    def close(self) -> None:
        for w in self.workers:
            if w.process.is_alive():
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            w.process.join(2)
            w.kill()
        self.workers = []
