"""Streaming generation of a step's groups: one request per group, each scored as it completes,
DAPO's keep/drop decided in submission order, the rest aborted once the batch is full.

What it does: `stream_groups` submits every group of a generation batch at once (the engines
batch them), scores each group as soon as its request returns (scoring overlaps the
generation of the others), and decides groups strictly in the order they were drawn, so the
kept groups are exactly those the batch-at-a-time loop keeps (its `kept[:target]`). It draws
the next generation batch as soon as it is certainly needed -- kept + undecided < target, so
whatever the undecided groups turn out to be -- which is exactly the batch the batch-at-a-time
loop would draw next (same cursor order, same group ids). Once `target` groups are kept it
aborts every group still in flight (SGLang's /abort_request, repeated until every request
has answered, since a request may reach its engine after an abort was sent) and waits for the
answers, so no request of this step outlives it. `busy_fraction` measures how much of the
generation time the engines had a request in flight. What it does not: talk HTTP, retry on
another engine, score, or draw prompts (the rollout manager supplies those as callables).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Callable

from rollout_sglang.sglang.client import GenerateOutput
from rollout_sglang.types import Group, Prompt

log = logging.getLogger(__name__)
ABORT_RESEND_S = 1.0
"""Seconds between aborts while aborted requests have not answered (one may have reached its
engine after the previous abort)."""


@dataclass
class StreamResult:
    """What one streamed generation produced."""

    decided: list[Group]
    """Every group whose keep/drop was decided, in submission order (kept and dropped)."""
    kept: list[Group]
    """The kept groups, in submission order, at most `target`."""
    batches: int
    """Generation batches drawn."""
    time_to_full_s: float
    """Seconds from the start until the last decision (the batch full, or nothing left)."""
    aborted_groups: int = 0
    """Groups still generating when the batch was full, stopped by /abort_request (or not sent)."""
    discarded_groups: int = 0
    """Groups that finished generating after the batch was full (their work is thrown away)."""
    returned_tokens: int = 0
    """Tokens the engines returned, of aborted and discarded groups too."""
    spans: list[tuple[str, float, float]] = field(default_factory=list)
    """(engine url, start, end) of every request attempt, perf_counter seconds."""


def stream_groups(draw: Callable[[], list[tuple[int, Prompt]] | None],
                  submit: Callable[[list[tuple[int, Prompt]]], list[Future]],
                  score: Callable[[list[tuple[int, Prompt, list[GenerateOutput]]]], list[Group]],
                  keep: Callable[[Group], bool], abort: Callable[[list[int]], None], target: int) -> StreamResult:
    """Generate, score and decide groups until `target` are kept or `draw` has no batch left.

    `draw()` gives the next batch as (group id, prompt) pairs, None when no batch may be drawn;
    `submit(batch)` starts the requests of a batch's groups and gives one future per group (of
    its outputs, [] for a request that was never sent); `score([(group id, prompt, outputs)])`
    gives their scored groups; `abort(group_ids)` aborts those groups'
    requests (and sends no new ones)."""
    t0 = time.perf_counter()
    flying: dict[Future, tuple[int, Prompt]] = {}
    order: deque[int] = deque()
    done: dict[int, Group] = {}
    res = StreamResult([], [], 0, 0.0)
    exhausted = False
    try:
        while len(res.kept) < target:
            while order and order[0] in done:
                group = done.pop(order.popleft())
                res.decided.append(group)
                if keep(group):
                    res.kept.append(group)
                    if len(res.kept) == target:
                        break
            if len(res.kept) == target:
                break
            if not exhausted and len(res.kept) + len(order) < target:
                batch = draw()
                exhausted = batch is None
                for (gid, prompt), future in zip(batch or [], submit(batch or [])):
                    flying[future] = (gid, prompt)
                    order.append(gid)
                res.batches += batch is not None
                continue
            if not flying:
                break  # nothing in flight, nothing left to draw: underfilled
            finished, _ = wait(list(flying), return_when=FIRST_COMPLETED)
            answered = [(*flying.pop(f), f.result()) for f in finished]
            res.returned_tokens += sum(len(o.output_ids) for _, _, outs in answered for o in outs)
            # Groups that answered together are scored in one call (one trip to the scorer).
            done.update((g.group_id, g) for g in score(answered))
    except BaseException:
        if flying:
            abort([gid for gid, _ in flying.values()])
        raise
    res.time_to_full_s = time.perf_counter() - t0
    if flying:
        _abort_the_rest(flying, abort, res)
    return res


def _abort_the_rest(flying: dict[Future, tuple[int, Prompt]], abort: Callable[[list[int]], None],
                    res: StreamResult) -> None:
    """Abort what is still generating and wait for every answer (an engine must not be left
    decoding this step's requests when its weights change)."""
    abort([gid for gid, _ in flying.values()])
    pending = set(flying)
    while pending:
        finished, pending = wait(pending, timeout=ABORT_RESEND_S)
        for f in finished:
            try:
                outputs = f.result()
            except Exception as exc:  # noqa: BLE001 - the group is not needed any more
                log.info("an aborted group's request failed: %s", exc)
                res.aborted_groups += 1
                continue
            res.returned_tokens += sum(len(o.output_ids) for o in outputs)
            if not outputs or any(o.finish_reason == "abort" for o in outputs):
                res.aborted_groups += 1
            else:
                res.discarded_groups += 1
        if pending:
            abort([flying[f][0] for f in pending])


def busy_fraction(spans: list[tuple[str, float, float]], urls: list[str], t0: float, t1: float) -> float:
    """Mean over `urls` of the fraction of [t0, t1] the engine had at least one request in
    flight (overlapping requests count once)."""
    if t1 <= t0 or not urls:
        return 0.0
    fractions = []
    for url in urls:
        busy, end = 0.0, t0
        for _, s, e in sorted(x for x in spans if x[0] == url):
            s, e = max(s, end), min(e, t1)
            if e > s:
                busy += e - s
                end = e
        fractions.append(busy / (t1 - t0))
    return sum(fractions) / len(fractions)
