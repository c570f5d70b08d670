"""Entry point: `torchrun [...] -m megatron_qae.train --config configs/X.yaml key=value ...`.

What it does: reads the environment once (torchrun's rank variables, defaults for a plain
single-process `python -m megatron_qae.train`), sets up what the terminal shows (our messages;
third-party logs go to <run_dir>/logs, or to the terminal too with --verbose), loads and
validates the config and runs the loop. What it does not: any training logic (loop.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading

from megatron_qae.run import console
from megatron_qae.launch_env import single_process_env


def local_ray_auth_default(ray_address: str | None, environ: dict) -> None:
    """Token auth off only for the Ray this process starts for itself (one node, local
    sockets); a cluster (`ray.address` set) keeps whatever auth it was started with."""
    if ray_address is None:
        environ.setdefault("RAY_AUTH_MODE", "disabled")


def start_ray_while_importing(cfg, rank: int) -> None:
    """Rank 0 starts Ray (about 5 s, mostly its processes starting) while megatron-core and
    the loop import on a thread (about 5 s of Python), instead of one after the other. Ray
    stays on the main thread: its head processes die with the thread that started them."""
    if rank == 0:  # imported before the thread starts: both would import shared modules (numpy ...)
        from megatron_qae.run import ray_cluster
    failed: list[BaseException] = []

    def load() -> None:
        try:
            importlib.import_module("megatron_qae.run.loop")
        except BaseException as exc:  # re-raised on the main thread, with its traceback
            failed.append(exc)

    loader = threading.Thread(target=load, name="import-loop", daemon=True)
    loader.start()
    if rank == 0:
        ray_cluster.connect(cfg.ray.address, cfg.ray.num_cpus)
    loader.join()
    if failed:
        raise failed[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="YAML file under configs/ (defaults if omitted)")
    ap.add_argument("--verbose", action="store_true",
                    help="also show third-party logs and warnings (megatron-core, torch) on the terminal")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. algo.quantile_k=0.6")
    args = ap.parse_args(argv)
    single_process_env()  # a plain `python -m megatron_qae.train` is a world of one
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rank = int(os.environ["RANK"])
    console.setup(rank, args.verbose)  # before megatron-core is imported: it logs at import
    from megatron_qae.config.loading import load_config

    cfg = load_config(args.config, args.overrides)  # light: megatron-core is not imported yet
    console.attach_run_dir(cfg.run.run_dir, rank)
    local_ray_auth_default(cfg.ray.address, os.environ)
    start_ray_while_importing(cfg, rank)
    from megatron_qae.launch_env import LaunchEnv
    from megatron_qae.run.loop import run

    env = LaunchEnv(master_address=os.environ["MASTER_ADDR"])
    run(cfg, env)


if __name__ == "__main__":
    main(sys.argv[1:])
