"""Deadlines and hang detection for engine requests.

What it does: sizes a request's deadline from what it asks for (tokens to generate: rows x n x
max_new_tokens, at `s_per_token`, plus a floor), and waits for in-flight engine requests while
probing the engines' /health: an engine that answers /health is slow and gets until the
deadline; one that misses `probe_failures` probes in a row (each `probe_timeout_s`) is hung
(a SIGSTOPped or wedged server answers nothing) and the wait ends with `EngineHung`, naming the
engine and for how long it was stuck. What it does not: kill or restart engines (the rollout
manager does, through the engine actor) or retry requests elsewhere (the manager does).

SGLang answers /health from its HTTP process without touching the scheduler (unless
SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION is set), so the probe sees a stopped or wedged HTTP
process, not a scheduler that stalls behind a live HTTP process: that one meets the deadline.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from threading import Thread
from typing import Any, Callable, TypeVar

from rollout_sglang.sglang.client import EngineError, SGLangClient

T = TypeVar("T")


class EngineHung(EngineError):
    """An engine stopped answering /health while a request to it was in flight."""

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
    """Missed probes in a row that make an engine hung."""

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
    """Probes a set of engines' /health at most every `probe_interval_s`."""

    def __init__(self, clients: list[SGLangClient], policy: WatchPolicy) -> None:
        self.policy = policy
        now = time.monotonic()
        # Probes on their own sessions: a requests.Session is not shared between threads.
        self.probes = {c.base_url: SGLangClient(c.base_url) for c in clients}
        self.alive_at = {c.base_url: now for c in clients}
        self.missed = {c.base_url: 0 for c in clients}
        self.last_probe = now

    def hung(self, pending: list[SGLangClient]) -> tuple[str, float] | None:
        """(url, stuck seconds) of the first of `pending` that missed `probe_failures`
        probes in a row, probing them if the interval has passed; None when none did."""
        now = time.monotonic()
        if now - self.last_probe < self.policy.probe_interval_s:
            return None
        self.last_probe = now
        for c in pending:
            if self.probes[c.base_url].health(timeout_s=self.policy.probe_timeout_s):
                self.alive_at[c.base_url], self.missed[c.base_url] = time.monotonic(), 0
                continue
            self.missed[c.base_url] += 1
            if self.missed[c.base_url] >= self.policy.probe_failures:
                return c.base_url, time.monotonic() - self.alive_at[c.base_url]
        return None


def wait_watching(pending: list[tuple[SGLangClient, Future]], policy: WatchPolicy, deadline_s: float,
                  what: str) -> list[Any]:
    """The results of `pending` (one future per engine request), in order. Raises EngineHung
    for an engine that stops answering /health, EngineError naming the engine for one past
    `deadline_s`, and the request's own error for one that failed."""
    watch = HealthWatch([c for c, _ in pending], policy)
    start = time.monotonic()
    step = min(policy.probe_interval_s, 0.5)
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
        found = watch.hung([c for c, _ in waiting])
        if found is not None:
            raise EngineHung(found[0], found[1], what)
        try:
            waiting[0][1].result(timeout=step)
        except FutureTimeout:
            pass
        except BaseException:  # noqa: BLE001 - raised in order at the top of the loop
            pass


def call_watched(client: SGLangClient, call: Callable[[], T], policy: WatchPolicy, deadline_s: float,
                 what: str) -> T:
    """`call()` (a request of `client`) with a deadline and a hang watch on its engine."""
    return wait_watching([(client, run_in_thread(call))], policy, deadline_s, what)[0]
