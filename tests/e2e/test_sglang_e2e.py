"""The loop end to end with `engine.backend=sglang`: torchrun with 2 trainer ranks, a local
Ray, two real SGLang 0.5.23 engines on CPU (from .venv-sglang, random "dummy" start weights:
the trainer pushes its own before the first rollout), 3 rollout steps. One engine is
SIGKILLed after step 1 (its requests go to the other) and must come back with the current
weights: every engine reports the trainer's version after every step, and the samples carry
exactly the trainer's log-probs."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from megatron_qae.persistence.metrics import read_metrics
from testsupport import tiny
from testsupport.sglang_server import CPU_ARGS, sglang_python

# A real SGLang server starts in ~100 s (longer on a busy machine), inside the first test.
# One xdist worker runs the whole real-SGLang tier: never two ~3 GB servers at once.
pytestmark = [pytest.mark.timeout(2400), pytest.mark.xdist_group("real_sglang")]


def _sglang_pids(model_dir: str) -> list[int]:
    """The SGLang launcher processes serving `model_dir`."""
    return sorted(p.pid for p in psutil.process_iter(["cmdline"])
                  if "sglang.launch_server" in (p.info["cmdline"] or [])
                  and model_dir in (p.info["cmdline"] or []))


def test_three_steps_with_real_sglang_and_an_engine_killed_mid_run(tmp_path):
    run_dir = tmp_path / "run"
    model_dir = str(tmp_path / "model")
    killed: list[int] = []

    def kill_after_first_step() -> None:
        deadline = time.monotonic() + 1500
        while time.monotonic() < deadline and not killed:
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().strip():
                pids = _sglang_pids(model_dir)
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_first_step, daemon=True)
    watcher.start()
    args = {**CPU_ARGS, "load_format": "dummy"}
    try:
        tiny.train_run(run_dir, 2, ["engine.backend=sglang", "engine.num_engines=2",
                            f"engine.sglang_python={sglang_python()}",
                            "engine.startup_timeout_s=900", "engine.request_timeout_s=300",
                            "run.num_rollout_steps=3", "run.log_tensorboard=false",
                            *[f"engine.sglang_args.{k}={v}" for k, v in args.items()]], timeout_s=1800)
    finally:
        killed.append(-1)  # stops the watcher
        leftover = _sglang_pids(model_dir)
        for pid in leftover:  # a run killed by the timeout leaves its engines: 3 GB each
            os.killpg(os.getpgid(pid), signal.SIGKILL)
    assert leftover == []  # the run stopped its engines
    watcher.join(timeout=5)
    assert killed[0] > 0, "the engine was never killed"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["rollout/engine_restarts_total"] == 1
    for r in rows:
        # Both engines (the restarted one included) report, over their own HTTP API
        # (/model_info), the version the trainer pushed, and sampled with the trainer's exact
        # weights (fp32 on both sides).
        assert r["sync/engine_version_min"] == r["sync/engine_version_max"] == r["step"]
        assert r["train/logprob_gap_rollout"] < 1e-4
        assert r["rollout/groups"] == 4
