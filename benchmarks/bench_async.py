"""Seconds per rollout step, synchronous vs one-step off-policy (rollout.async_steps=1).

Two real training runs (`python -m megatron_qae.train`, one trainer rank, one CPU engine, local
Ray) on the demo task with the same seeds; responses of `--response-tokens` tokens so that
generation and training both cost something. With async_steps=1 the engine generates step
k+1's batch while the trainer trains on step k, so a step costs about max(generate, train)
instead of their sum. The trainer and the engine use one thread each: on a 2-core machine
they run on separate cores. Prints the mean step time over steps 2..N of each run (step 1 has
nothing to overlap), the time the trainer waited for its batch, and the ratio sync / async.

    python -m benchmarks.bench_async [--steps 8 --response-tokens 24]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron_qae.persistence.metrics import read_metrics
from rollout_sglang import demo_task

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(run_dir: Path, model: Path, data: tuple[Path, Path], steps: int, tokens: int, async_steps: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           "-m", "megatron_qae.train", "--config", "configs/demo.yaml", f"run.run_dir={run_dir}",
           f"model.path={model}", f"data.train_path={data[0]}", f"data.val_path={data[1]}",
           f"run.num_rollout_steps={steps}", "run.eval_interval_steps=0", "run.progress_bar=false",
           "run.log_tensorboard=false", "rollout.dynamic_sampling=false", "algo.tis_cap=2.0",
           f"rollout.max_response_tokens={tokens}", f"rollout.async_steps={async_steps}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return read_metrics(run_dir)


def mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows[1:]]
    return sum(values) / len(values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--response-tokens", type=int, default=24)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = demo_task.write_demo_model_dir(tmp / "model", seed=0)
        data = demo_task.write_demo_data(tmp / "data", seed=0)
        results = {}
        for mode in (0, 1):
            rows = run(tmp / f"run{mode}", model, data, a.steps, a.response_tokens, mode)
            results[mode] = (mean(rows, "time/step_s"), mean(rows, "time/rollout_wait_s"),
                             mean(rows, "train/step_s"), max(r.get("rollout/staleness_max", 0.0) for r in rows))
    for mode, name in ((0, "sync  (async_steps=0)"), (1, "async (async_steps=1)")):
        step_s, wait_s, train_s, stale = results[mode]
        print(f"{name}: {step_s:.2f} s/step (waited {wait_s:.2f} s for the batch, trained {train_s:.2f} s; "
              f"max staleness {stale:.0f})")
    print(f"ratio sync / async step time: {results[0][0] / results[1][0]:.2f}")


if __name__ == "__main__":
    main()
