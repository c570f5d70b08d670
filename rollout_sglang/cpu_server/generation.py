"""The CPU rollout server's generation routes: /generate batched across concurrent requests,
/abort_request by request id, pause / continue.

What it does: every /generate joins a queue; whichever request gets the model lock runs all
queued requests with the same sampling parameters (seeds and n aside) as one batch, and each
is answered as soon as its own rows have finished, so the
per-group requests a rollout manager sends at once are decoded together rather than one after
another (a poor man's continuous batching: a request that arrives while a batch runs waits for
the next one). /abort_request follows SGLang 0.5.23 (one tokenizer worker): `rid` must be the id of
a live request (anything else, a mere prefix included, is ignored), and then every request
whose id starts with it is aborted (SGLang's scheduler matches by prefix); `abort_all` aborts
everything; the reply is an empty 200; the
aborted request's /generate answers 200 with what it generated so far and finish_reason
{"type": "abort", "message": "Aborted"} ("Abort in waiting queue" when it had not started).
What it does not: continuous batching (requests do not join a batch that is decoding), or
anything of the weights (cpu_server.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse, Response

from rollout_sglang.cpu_server.request_bounds import BadRequest, check_generate, check_rids
from rollout_sglang.cpu_server.sampling import generate_batch
from rollout_sglang.cpu_server.limits import Busy


GATHER_QUIET_S = 0.002
"""A batch starts once no request has arrived for this long..."""
GATHER_MAX_S = 0.05
"""... or this long after the first one arrived."""


class WeightsReleased(RuntimeError):
    """/generate while the weights are released (SGLang answers 503 too)."""


@dataclass
class _Job:
    """One /generate request waiting for, or in, a batch."""

    rows: list[list[int]]
    params: dict[str, Any]
    """The sampling parameters its rows share (no sampling_seed, no n)."""
    seeds: list[int | None]
    rids: list[str]
    flags: list[threading.Event]
    """Set by /abort_request, one per row."""
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    outs: list[dict[str, Any]] | None = None
    error: BaseException | None = None


class Batcher:
    """Runs queued /generate requests together (on its own thread) and aborts them by id."""

    def __init__(self, state) -> None:
        self.state = state
        self._guard = threading.Lock()
        """Guards the queue and the registry of live request ids (never held while decoding)."""
        self._wake = threading.Condition(self._guard)
        self._queue: list[_Job] = []
        self._live: dict[str, list[threading.Event]] = {}
        self.aborted_rows = 0
        """Rows that ended by /abort_request since the server started (/server_info reports it)."""
        threading.Thread(target=self._loop, daemon=True, name="cpu-batcher").start()

    def run(self, rows: list[list[int]], params: dict[str, Any], seeds: list[int | None],
            rids: list[str]) -> list[dict[str, Any]]:
        """The outputs of one request, decoded in a batch with whatever else is queued; Busy
        when its batch has not started within --lock-timeout-s."""
        job = _Job(rows, params, seeds, rids, [threading.Event() for _ in rows])
        with self._wake:
            for rid, flag in zip(rids, job.flags):
                self._live.setdefault(rid, []).append(flag)
            self._queue.append(job)
            self._wake.notify()
        try:
            if not job.started.wait(timeout=self.state.limits.lock_timeout_s):
                with self._guard:
                    waiting = job in self._queue
                    if waiting:
                        self._queue.remove(job)
                if waiting:
                    raise Busy(f"the model was not free within {self.state.limits.lock_timeout_s} s "
                               "(--lock-timeout-s); long requests hold it")
            # Generation is bounded (max_new_tokens, abort, SIGTERM): no deadline once it runs.
            job.done.wait()
        finally:
            self._forget(job)
        if job.error is not None:
            raise job.error
        return job.outs

    def _loop(self) -> None:
        """Decode whatever is queued, one batch of equal sampling parameters at a time."""
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                # A rollout manager sends a step's group requests in one burst: let it arrive,
                # so the first group does not run alone.
                seen, until = -1, time.monotonic() + GATHER_MAX_S
                while len(self._queue) != seen and time.monotonic() < until:
                    seen = len(self._queue)
                    self._wake.wait(GATHER_QUIET_S)
            with self.state.lock:  # weight updates hold it too: no decode while weights change
                batch = self._take()
                for job in batch:
                    job.started.set()
                if batch:
                    self._decode(batch)

    def abort(self, rid: str, abort_all: bool) -> None:
        """As SGLang 0.5.23 with one tokenizer worker: an id that is not a live request is
        ignored (its tokenizer manager looks the id up exactly); a live one is passed on to
        the scheduler, which aborts every request whose id starts with it."""
        with self._guard:
            if not abort_all and rid not in self._live:
                return
            for live, flags in self._live.items():
                if abort_all or live.startswith(rid):
                    for flag in flags:
                        flag.set()

    def _take(self) -> list[_Job]:
        """The first queued job and every queued job with its sampling parameters."""
        with self._guard:
            if not self._queue:
                return []
            params = self._queue[0].params
            batch = [j for j in self._queue if j.params == params]
            self._queue = [j for j in self._queue if j.params != params]
        return batch

    def _forget(self, job: _Job) -> None:
        with self._guard:
            for rid, flag in zip(job.rids, job.flags):
                flags = self._live.get(rid, [])
                if flag in flags:
                    flags.remove(flag)
                if not flags:
                    self._live.pop(rid, None)

    def _decode(self, batch: list[_Job]) -> None:
        """Decode `batch` (called with the model lock held); each job is answered as soon as
        its own rows have finished, not when the whole batch has."""
        state = self.state
        where = [(job, k) for job in batch for k in range(len(job.rows))]
        for job in batch:
            job.outs = [None] * len(job.rows)

        def row_done(i: int, out: dict[str, Any]) -> None:
            job, k = where[i]
            out["meta_info"]["weight_version"] = state.weight_version
            self.aborted_rows += int(job.flags[k].is_set() and out["meta_info"]["finish_reason"]["type"] == "abort")
            job.outs[k] = out
            if all(o is not None for o in job.outs):
                job.done.set()

        try:
            if "weights" in state.released_tags:
                raise WeightsReleased("weights are released; call /resume_memory_occupation first")
            generate_batch(state.model, [r for j in batch for r in j.rows], batch[0].params, state.eos_ids,
                           state.abort, [s for j in batch for s in j.seeds], [f for j in batch for f in j.flags],
                           row_done)
        except BaseException as exc:  # noqa: BLE001 - every request not answered gets the error
            for job in batch:
                if not job.done.is_set():
                    job.error = exc
                    job.done.set()


def _error(message: str, status: int = 400) -> JSONResponse:
    """SGLang's error body for a request that raised: {"error": {"message"}}."""
    return JSONResponse({"error": {"message": message}}, status_code=status)


def generation_routes(app: FastAPI, state) -> None:
    """/generate, /abort_request, /pause_generation, /continue_generation, /flush_cache."""
    @app.post("/generate")
    def generate(req: Any = Body(...)) -> Any:
        try:
            rows, per_row = check_generate(req, state.bounds)
            rids = check_rids(req.get("rid"), len(rows))
        except BadRequest as exc:
            return _error(str(exc))
        single = not isinstance(req["input_ids"][0], list)
        shared = [{k: v for k, v in p.items() if k not in ("sampling_seed", "n")} for p in per_row]
        if any(s != shared[0] for s in shared):
            return _error("the CPU server samples a request's rows together: their sampling_params "
                          "may differ only in sampling_seed and n")
        counts = [p["n"] for p in per_row]
        seeds = [p.get("sampling_seed") for p, c in zip(per_row, counts) for _ in range(c)]
        rows = [r for r, c in zip(rows, counts) for _ in range(c)]
        rids = [r for r, c in zip(rids, counts) for _ in range(c)]
        if not state.running.wait(timeout=state.limits.lock_timeout_s):
            raise Busy(f"generation stayed paused for {state.limits.lock_timeout_s} s (--lock-timeout-s); "
                       "/continue_generation resumes it")
        try:
            outs = state.batcher.run(rows, shared[0], seeds, rids)
        except WeightsReleased as exc:
            return _error(str(exc), 503)
        return outs[0] if single and len(outs) == 1 else outs

    @app.post("/abort_request")
    async def abort_request(req: dict[str, Any] = Body(default={})) -> Response:
        # async: answered on the event loop, never behind /generate calls queued for threads.
        state.batcher.abort(str((req or {}).get("rid") or ""), bool((req or {}).get("abort_all", False)))
        return Response(status_code=200)

    @app.post("/pause_generation")
    def pause(req: dict[str, Any] = Body(default={})) -> dict:
        state.running.clear()
        if (req or {}).get("mode", "abort") == "abort":
            state.abort.set()
        return {"success": True}

    @app.post("/continue_generation")
    def resume(req: dict[str, Any] = Body(default={})) -> dict:
        state.abort.clear()
        state.running.set()
        return {"success": True}

    @app.post("/flush_cache")
    @app.get("/flush_cache")
    def flush() -> dict:
        return {"success": True}
