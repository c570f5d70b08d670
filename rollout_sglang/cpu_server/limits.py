"""The CPU rollout server's operational limits: what one request may ask, how long anything
may wait, whom the weight-group rendezvous may dial, and a stop that always stops.

What it does: the limits (`Limits`, from the server's command line), the `Busy` refusal (503)
for a wait past --lock-timeout-s, the check of a rendezvous address against
--weight-sync-hosts, and a uvicorn server whose SIGTERM / SIGINT abort in-flight generation and
end the process within seconds. What it does not: check /generate bodies (request_bounds.py)
or serve routes (cpu_server.py).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

import uvicorn


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (its command-line bounds)."""

    max_sequences: int = 1024
    """Sequences (rows x n) one /generate may ask for."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Bytes of one request body."""
    lock_timeout_s: float = 300.0
    """Seconds a request may wait for the model lock, or while generation is paused."""
    weight_sync_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
    """The only addresses /init_weights_update_group dials (the trainer's)."""
    weight_sync_timeout_s: float = 60.0
    """Seconds the weight-group rendezvous may take."""


class Busy(RuntimeError):
    """The model lock (or the end of a pause) did not come within --lock-timeout-s."""


def refused_peer(address: str, allowed: tuple[str, ...]) -> str | None:
    """Why the weight-group rendezvous must not dial `address`, or None: only the trainer
    addresses this server was started with (by name or by the address they resolve to)."""
    def resolved(host: str) -> set[str]:
        try:
            return {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            return set()

    if address in allowed or resolved(address) & set().union(*(resolved(h) for h in allowed)):
        return None
    return (f"init_weights_update_group: master_address={address!r} is not a trainer address this "
            f"server may dial ({list(allowed)}); start it with --weight-sync-hosts {address}")


class StoppableServer(uvicorn.Server):
    """uvicorn, but SIGTERM / SIGINT also abort in-flight generation (uvicorn alone waits for
    running requests), and the process exits within seconds whatever a request is doing (a
    weight broadcast, a rendezvous)."""

    def __init__(self, config: uvicorn.Config, abort: threading.Event, running: threading.Event) -> None:
        super().__init__(config)
        self.abort, self.running = abort, running

    def handle_exit(self, sig: int, frame) -> None:
        self.abort.set()
        self.running.set()  # a request waiting out a pause ends too
        deadline = threading.Timer(10.0, os._exit, args=(1,))
        deadline.daemon = True
        deadline.start()
        super().handle_exit(sig, frame)
