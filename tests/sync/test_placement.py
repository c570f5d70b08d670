"""The colocated lifecycle's order, from a real world-of-one run with the CPU server: the
engines start after the first offload (SGLang sizes its KV pool from the memory free at its
start), and a checkpoint is saved while the engines hold nothing: release -> restore -> save ->
offload -> resume."""

from __future__ import annotations

import json
import os
import sys

from rollout_sglang import demo_task
from testsupport import tiny


def test_colocated_save_runs_release_restore_save_offload_resume(tmp_path):
    model = demo_task.write_demo_model_dir(tmp_path / "model", seed=0)
    train, val = demo_task.write_demo_data(tmp_path / "data", seed=0, task="single_digit")
    out = tmp_path / "calls.json"
    cmd = [sys.executable, "tests/dist_workers/lifecycle_worker.py", str(out), "--config", "configs/test_tiny.yaml",
           f"run.run_dir={tmp_path / 'run'}", f"model.path={model}", f"data.train_path={train}",
           f"data.val_path={val}", "engine.colocate=true", "run.num_rollout_steps=1",
           "run.save_interval_steps=1", "run.log_tensorboard=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(tiny.ROOT)}
    env.pop("RANK", None)  # a world of one
    proc = tiny.run_logged(cmd, env, timeout_s=420)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    calls = json.loads(out.read_text())
    order = " ".join(calls)
    save = calls.index("save")
    release = max(i for i in range(save) if calls[i] == "release")
    assert calls[release:save + 1] == ["release", "restore", "save"], order
    after = calls[save + 1:]
    assert after[0] == "offload" and after.index("offload") < min(
        i for i, c in enumerate(after) if c.startswith("resume")), order
    # The trainer holds at the engines' start exactly what it holds while they generate.
    assert calls.index("offload") < calls.index("start_engines"), order
    assert calls.count("restore") == calls.count("offload") - 1 == 1, order
