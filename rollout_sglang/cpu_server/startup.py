"""The CPU server's start-up, as SGLang's: the routes serve at once, the server counts as
started only after one warmup request through its own HTTP API.

What it does: `warm_up` waits until /model_info answers, sends one short /generate, then sets
the server's started event (SGLang's ServerStatus.Up: /health and /ready answer 503 until then,
sglang/srt/entrypoints/http_server.py:714-736, 2360-2440); a warmup that fails stops the server,
as SGLang's does. What it does not: serve routes (server.py) or bind the socket.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from rollout_sglang.sglang.client import SGLangClient

log = logging.getLogger("cpu_server")


def warm_up(url: str, api_key: str | None, started: threading.Event, timeout_s: float = 600.0) -> None:
    """SGLang's start-up warmup (http_server.py:2360-2440): wait until /model_info answers,
    send one short /generate through the server's own HTTP API (with its `api_key`), then set
    `started`. A warmup that fails stops the server (as SGLang's does), naming why."""
    client = SGLangClient(url, timeout_s=60.0, api_key=api_key)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.model_info()
                break
            except Exception:  # noqa: BLE001 - not serving yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.generate([[0, 1, 2]], {"max_new_tokens": 8, "temperature": 0.0}, return_logprob=False)
    except Exception as exc:  # noqa: BLE001 - the server cannot serve: stop it
        log.error("warmup failed, stopping: %s", exc)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    started.set()
    log.info("warmup done: serving")
