"""Fault injection, rollout engines: an engine stopped (SIGSTOP) in the middle of a rollout of a
2-rank e2e run is found hung within seconds, killed, restarted with the current weights, and
every step trains all its groups once; an engine stopped or killed in the middle of a weight
sync fails that push within seconds, naming it, and a push to the live engines then works; a
reward that hangs in an e2e run costs that response only. Each asserts no process is left."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from testsupport.cpu_server import CpuServer, write_model_dir
from megatron_qae.persistence.metrics import read_metrics
from testsupport import tiny

pytestmark = pytest.mark.faults
SYNC_WORKER = tiny.ROOT / "tests" / "dist_workers" / "sync_worker.py"


def _signal_after_first_step(run_dir: Path, model_dir: Path, sig: int, done: list[int]) -> None:
    """Send `sig` to one engine server once step 1 is logged (after its weight sync: the next
    thing the run does is step 2's rollout)."""
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not done:
        metrics = run_dir / "metrics.jsonl"
        pids = tiny.cpu_server_pids(str(model_dir))
        if pids and metrics.is_file() and metrics.read_text().strip():
            os.kill(pids[0], sig)
            done.append(pids[0])
        time.sleep(0.02)


@pytest.mark.timeout(1200)
def test_engine_stopped_mid_rollout_is_killed_restarted_and_no_group_is_lost(tmp_path):
    run_dir, model_dir = tmp_path / "run", tmp_path / "model"
    n, prompts = 8, 8
    stopped: list[int] = []
    watcher = threading.Thread(target=_signal_after_first_step, args=(run_dir, model_dir, signal.SIGSTOP, stopped),
                               daemon=True)
    watcher.start()
    t0 = time.monotonic()
    proc = tiny.train_run(run_dir, 2, [
        "engine.num_engines=2", "run.num_rollout_steps=3", "run.log_tensorboard=false",
        f"rollout.n_samples_per_prompt={n}", f"rollout.prompts_per_step={prompts}",
        "rollout.mini_batch_prompts=4", "rollout.gen_batch_prompts=16", "rollout.max_gen_batches=20"])
    elapsed = time.monotonic() - t0
    watcher.join(timeout=5)
    assert stopped, "no engine was stopped"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["rollout/engine_restarts_total"] == 1
    for r in rows:
        assert r["rollout/groups"] == prompts and r["rollout/samples"] == prompts * n
        assert r["sync/engine_version_min"] == r["sync/engine_version_max"] == r["step"]
        assert r["train/logprob_gap_rollout"] < 1e-4
    out = proc.stdout + proc.stderr
    hung = re.search(r"engine (http://\S+) hung: no answer to /health for ([\d.]+) s during a /generate request; "
                     r"killed it", out)
    assert hung, out[-3000:]
    url, stuck_s = hung.group(1), float(hung.group(2))
    assert 2.0 <= stuck_s < 30.0  # probes every 2 s, two misses of 5 s each: seconds, not the deadline
    assert re.search(rf"restarted engine {re.escape(url)} \(hung for [\d.]+ s\), now at http://", out)
    assert len(tiny.cpu_server_pids(str(model_dir))) == 0
    (tmp_path.parent / "stopped_mid_rollout.json").write_text(json.dumps(
        {"stuck_s": stuck_s, "run_s": elapsed, "generate_s": [r["rollout/generate_s"] for r in rows]}))


@pytest.mark.timeout(1200)  # two servers and a 2-rank torchrun: slow on a busy machine
@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["SIGSTOP", "SIGKILL"])
def test_engine_stopped_or_killed_mid_sync_fails_the_push_naming_it(tmp_path, sig):
    model_dir = write_model_dir(tmp_path / "model", tiny.tiny_hf_config(), seed=0)
    out = tmp_path / "out.json"
    with CpuServer(model_dir) as live, CpuServer(model_dir) as doomed:
        (pid,) = tiny.cpu_server_pids(doomed.rsplit(":", 1)[1])
        try:
            # A 30 s first link (the worker's default is 120 s): the broadcast abandoned to the
            # doomed server holds the ranks and the live server until it times out. Hang
            # detection (probes every 2 s, two misses of 5 s) ends the push well before that.
            tiny.torchrun(SYNC_WORKER, 2, ["--tp", "2", "--signal-pid", str(pid), "--send-signal", str(int(sig)),
                                           "--link-timeout-s", "30", "--urls", f"{live},{doomed}",
                                           "--out", str(out)], timeout_s=600)
        finally:
            if sig == signal.SIGSTOP:  # the rollout manager kills a hung engine; here the test does
                os.kill(pid, signal.SIGKILL)
    res = json.loads(out.read_text())
    report = res["report"]
    if sig == signal.SIGSTOP:
        # The stopped engine opened its session, then never answers: found by /health.
        assert report["hung"] == [doomed]
        assert f"engine {doomed} is hung: no answer to /health for" in report["failed"]
        assert report["failed_after_s"] < 30.0
    else:
        # Whichever sees the dead engine first: gloo's broadcast (its error names no engine;
        # the loop restarts whatever engine is dead) or the engine's HTTP update (no connection).
        assert report["hung"] == []
        assert (report["failed"].startswith("broadcast to the engines failed")
                or report["failed"].startswith(f"engine {doomed} could not be reached for the weight update")
                ), report["failed"]
        assert report["failed_after_s"] < 10.0
    assert report["live"] == [live] and report["second_failed"] is None
    gaps = [abs(a - b) for a, b in zip(res["engines"][live]["rollout"], res["engines"][live]["trainer"])]
    assert max(gaps) < 1e-4 and res["engines"][live]["engine_version"] == "3"
    assert tiny.cpu_server_pids(str(model_dir)) == []


def test_a_reward_that_hangs_costs_that_response_only_and_the_run_finishes(tmp_path):
    run_dir = tmp_path / "run"
    tiny.train_run(run_dir, 1, ["reward.name=tests.rewards_for_tests:hang_once", "reward.num_workers=1",
                                "reward.timeout_s=3", "run.num_rollout_steps=2", "run.eval_interval_steps=2",
                                "run.log_tensorboard=false"])
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    # The one worker hangs on the run's first response: killed after 3 s and replaced; that
    # response alone gets the failure score.
    assert [r["reward/errors"] for r in rows] == [1.0, 0.0]
    assert all(r["train/optimizer_steps"] >= 1 for r in rows)
    assert tiny.cpu_server_pids(str(tmp_path / "model")) == []
