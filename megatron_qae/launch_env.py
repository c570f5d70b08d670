"""The environment a process is launched with: torchrun's rank variables.

What it does: gives a plain `python -m ...` entry point (trainer, planner, converter,
benchmarks), which torchrun did not start, the variables of a world of one. Imports nothing
heavy, so an entry point can call it first and start slow work (Ray) before torch loads. What
it does not: initialize torch.distributed (model/parallel.py does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    """What the entry point read from the environment, once."""

    master_address: str
    """Address of global rank 0, reachable by the engines (weight-update rendezvous)."""


def single_process_env() -> None:
    """Set torchrun's variables for a world of one when a plain `python -m ...` entry point
    (trainer, planner, converter, benchmarks) was not started by torchrun."""
    if "RANK" in os.environ:
        return
    # Port 0: rank 0's store binds a port the OS picks and holds it (a world of one tells
    # nobody the port), where a probed-then-released one could be taken by another run first.
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
