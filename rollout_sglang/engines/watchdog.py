"""Deadlines and hang detection for engine requests.

What it does: sizes a request's deadline from what it asks for (tokens to generate: rows x n x
max_new_tokens, at `s_per_token`, plus a floor), and waits for in-flight engine requests while
the engines' /health is probed: an engine that answers is slow and gets until the deadline;
one that gives no answer at all to `probe_failures` probes in a row (each `probe_timeout_s`) is
hung (a SIGSTOPped or wedged server process answers nothing) and the wait ends with
`EngineHung`, naming the engine and for how long it was stuck. Probes are shared: one `Prober`
per engine serves every request in flight to it (`Probers`), so an engine gets at most one
probe per `probe_interval_s` however many requests wait on it (the manager has up to 256 groups
in flight). What it does not: kill or restart engines (the rollout manager does, through the
engine actor) or retry requests elsewhere (the manager does).

The hung rule asks the engine's HTTP process only. An answer of any status is alive: SGLang
answers /health with 503 while it is still warming up (`ServerStatus.Starting`,
sglang/srt/entrypoints/http_server.py:735-736) and while it shuts down; neither is a hang. And
the probe must not wait on the scheduler: SGLang 0.5.23's /health runs a one-token generation
through the scheduler and polls for it at least 1 s (http_server.py:751-786) unless
SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0 (environ.py:344, http_server.py:745-749), which our
launcher sets (engine.py). During a weight sync, the first broadcast above all (NCCL creates its
communicator inside the first collective, tens of seconds at scale), the scheduler is inside
the receive (model_runner_components/weight_updater.py:286-297) and a queued health generation
would answer nothing for 20 s (HEALTH_CHECK_TIMEOUT): a healthy engine declared hung. So the
probe sees a stopped or wedged HTTP process, not a scheduler that is busy or stalls behind a
live HTTP process: that one meets the deadline.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from threading import Thread
from typing import Any, Callable, Iterator, TypeVar

from rollout_sglang.sglang.client import EngineError, SGLangClient

T = TypeVar("T")


class EngineHung(EngineError):
    """An engine gave no answer to /health while a request to it was in flight."""

    def __init__(self, url: str, stuck_s: float, what: str) -> None:
        super().__init__(f"engine {url} is hung: no answer to /health for {stuck_s:.1f} s while "
                         f"{what} was in flight (a stopped or wedged server process)")
        self.url = url
        self.stuck_s = stuck_s
        """Seconds since the engine last answered /health (or since the request was sent)."""


@dataclass(frozen=True)
class WatchPolicy:
    """How long an engine request may take and how a hang is told from slowness."""

    s_per_token: float
    """Seconds allowed per token the request may generate (engine.request_s_per_token)."""
    floor_s: float
    """Seconds every request gets on top (engine.request_floor_s); all a control request gets."""
    probe_interval_s: float = 2.0
    """Seconds between /health probes of an engine with a request in flight."""
    probe_timeout_s: float = 5.0
    """Seconds one /health probe may take."""
    probe_failures: int = 2
    """Probes in a row without any answer that make an engine hung."""

    def deadline_s(self, tokens: int = 0) -> float:
        """The deadline of a request that may generate `tokens` tokens in all."""
        return self.floor_s + self.s_per_token * tokens


def tokens_requested(rows: int, params: dict[str, Any] | list[dict[str, Any]]) -> int:
    """Tokens a /generate request may produce: per row n x max_new_tokens (SGLang's default
    max_new_tokens is 128)."""
    per_row = params if isinstance(params, list) else [params] * rows
    return sum(int(p.get("n", 1)) * int(p.get("max_new_tokens", 128)) for p in per_row)


def run_in_thread(call: Callable[[], T]) -> Future:
    """`call()` in a daemon thread: a request to a hung engine must not keep the process
    alive, and it ends by itself (connection reset) once the engine is killed."""
    future: Future = Future()

    def target() -> None:
        try:
            future.set_result(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            future.set_exception(exc)

    Thread(target=target, daemon=True).start()
    return future


class HealthWatch:
    """Probes a set of engines' /health at most every `probe_interval_s`, on the caller's
    thread (a weight broadcast's loop: one caller, so one probe per engine per interval)."""

    def __init__(self, clients: list[SGLangClient], policy: WatchPolicy) -> None:
        self.policy = policy
        now = time.monotonic()
        # Probes on their own sessions: a requests.Session is not shared between threads.
        self.probes = {c.base_url: SGLangClient(c.base_url) for c in clients}
        self.alive_at = {c.base_url: now for c in clients}
        self.missed = {c.base_url: 0 for c in clients}
        self.last_probe = now

    def hung(self, pending: list[SGLangClient]) -> tuple[str, float] | None:
        """(url, stuck seconds) of the first of `pending` that gave no answer to
        `probe_failures` probes in a row, probing them if the interval has passed; None when
        none did."""
        now = time.monotonic()
        if now - self.last_probe < self.policy.probe_interval_s:
            return None
        self.last_probe = now
        for c in pending:
            if self.probes[c.base_url].answers(timeout_s=self.policy.probe_timeout_s):
                self.alive_at[c.base_url], self.missed[c.base_url] = time.monotonic(), 0
                continue
            self.missed[c.base_url] += 1
            if self.missed[c.base_url] >= self.policy.probe_failures:
                return c.base_url, time.monotonic() - self.alive_at[c.base_url]
        return None


class Prober:
    """The /health probes of one engine, shared by every request that waits on it.

    A daemon thread probes while at least one request watches (`watching`), at most once per
    `probe_interval_s`: each probe starts an interval after the one before, or after the
    watch began, so however many requests wait the engine gets at most 1 / probe_interval_s
    probes a second. Between watches nothing is probed, and a new watch starts from a clean
    slate (what an idle engine did before is no evidence)."""

    def __init__(self, url: str, policy: WatchPolicy) -> None:
        self.url, self.policy = url, policy
        self.client = SGLangClient(url)  # used by the probe thread only
        self.probes_sent = 0
        """Probes sent since this prober was made (how the tests count them)."""
        self._lock = threading.Condition()  # notified when the last watcher leaves
        self._watchers = 0
        self._thread: Thread | None = None
        self._answered_at = time.monotonic()
        self._misses = 0

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Probe the engine while the body runs (shared with every other watcher)."""
        with self._lock:
            self._watchers += 1
            if self._thread is None:
                self._answered_at, self._misses = time.monotonic(), 0
                self._thread = Thread(target=self._run, name=f"probe {self.url}", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._watchers -= 1
                if self._watchers == 0:
                    self._lock.notify_all()  # the thread ends now, not after its interval

    def hung_s(self) -> float | None:
        """Seconds since the engine last answered (or the watch began) once it gave no answer
        to `probe_failures` probes in a row; None while it is not hung."""
        with self._lock:
            if self._misses < self.policy.probe_failures:
                return None
            return time.monotonic() - self._answered_at

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            with self._lock:
                # Until the interval has passed, or at once when the last watcher leaves (a
                # watch begun later starts a new thread, which waits its own interval).
                self._lock.wait_for(lambda: self._watchers == 0,
                                    timeout=max(0.0, last + self.policy.probe_interval_s - time.monotonic()))
                if self._watchers == 0:
                    self._thread = None
                    return
                self.probes_sent += 1
            last = time.monotonic()
            answered = self.client.answers(timeout_s=self.policy.probe_timeout_s)
            with self._lock:
                if answered:
                    self._answered_at, self._misses = time.monotonic(), 0
                else:
                    self._misses += 1


class Probers:
    """One `Prober` per engine URL, made on first use: a pool's (or one wait's) probes."""

    def __init__(self, policy: WatchPolicy) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._by_url: dict[str, Prober] = {}

    def get(self, url: str) -> Prober:
        with self._lock:
            prober = self._by_url.get(url)
            if prober is None:
                prober = self._by_url[url] = Prober(url, self.policy)
            return prober

    def probes_sent(self) -> dict[str, int]:
        """Probes sent so far, per engine URL."""
        with self._lock:
            return {url: p.probes_sent for url, p in self._by_url.items()}


def wait_watching(pending: list[tuple[SGLangClient, Future]], policy: WatchPolicy, deadline_s: float,
                  what: str, probers: Probers | None = None) -> list[Any]:
    """The results of `pending` (one future per engine request), in order. Raises EngineHung
    for an engine that stops answering /health, EngineError naming the engine for one past
    `deadline_s`, and the request's own error for one that failed. `probers` are the engines'
    shared probes (the pool's); None: probes of this wait's own."""
    probers = probers if probers is not None else Probers(policy)
    start = time.monotonic()
    step = min(policy.probe_interval_s, 0.5)
    with contextlib.ExitStack() as watches:
        for url in dict.fromkeys(c.base_url for c, _ in pending):
            watches.enter_context(probers.get(url).watching())
        while True:
            waiting = [(c, f) for c, f in pending if not f.done()]
            for c, f in pending:
                if f.done() and f.exception() is not None:
                    raise f.exception()
            if not waiting:
                return [f.result() for _, f in pending]
            elapsed = time.monotonic() - start
            if elapsed > deadline_s:
                urls = ", ".join(c.base_url for c, _ in waiting)
                raise EngineError(f"engine {urls}: no reply to {what} within its deadline of {deadline_s:.0f} s "
                                  "(engine.request_floor_s + engine.request_s_per_token x tokens requested); "
                                  "the engine answers /health, so it is slow, not hung", timed_out=True)
            for c, _ in waiting:
                stuck_s = probers.get(c.base_url).hung_s()
                if stuck_s is not None:
                    raise EngineHung(c.base_url, stuck_s, what)
            try:
                waiting[0][1].result(timeout=step)
            except FutureTimeout:
                pass
            except BaseException:  # noqa: BLE001 - raised in order at the top of the loop
                pass


def call_watched(client: SGLangClient, call: Callable[[], T], policy: WatchPolicy, deadline_s: float,
                 what: str, probers: Probers | None = None) -> T:
    """`call()` (a request of `client`) with a deadline and a hang watch on its engine
    (`probers`: the engines' shared probes)."""
    return wait_watching([(client, run_in_thread(call))], policy, deadline_s, what, probers)[0]
