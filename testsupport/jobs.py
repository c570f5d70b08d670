"""Several runs of one torchrun worker in one launch: the per-launch cost paid once.

What it does: `torchrun_jobs(script, nproc, jobs)` writes the jobs (one argv list each) to a
file and starts `script` once under torchrun with `--jobs FILE`; in the worker, `run_jobs(main)`
calls `main(argv)` for each job in turn on the same ranks, tearing down megatron's model-parallel
groups between jobs (torch.distributed's default group stays), as megatron's own unit tests do
between tests. Each launch costs a torch + megatron-core import per rank (about 7 s of CPU on the
2-core test machine) and a gloo rendezvous; a test module's jobs share that. What it does not:
isolate jobs from each other's failures (the first job that raises fails the launch, and its
traceback names it), or mix world sizes (one launch per `nproc`).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

from testsupport import tiny


def torchrun_jobs(script: Path, nproc: int, jobs: list[list[str]], timeout_s: float = 600) -> CompletedProcess:
    """Run each argv list of `jobs` through `script`'s main, in order, in one torchrun launch
    with `nproc` gloo ranks; raise with the launch's output when any job fails."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(jobs, f)
    try:
        return tiny.torchrun(script, nproc, ["--jobs", f.name], timeout_s=timeout_s)
    finally:
        Path(f.name).unlink()


def run_jobs(main: Callable[[list[str]], None]) -> None:
    """A worker's entry point: `--jobs FILE` runs every job of FILE, else one job from argv."""
    from megatron.core import parallel_state as mpu

    from megatron_qae.model import parallel

    argv = sys.argv[1:]
    jobs = json.loads(Path(argv[1]).read_text()) if argv[:1] == ["--jobs"] else [argv]
    for job in jobs:
        main(job)
        if mpu.model_parallel_is_initialized():
            mpu.destroy_model_parallel()
    parallel.destroy()
