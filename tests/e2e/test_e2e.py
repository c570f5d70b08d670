"""End to end: torchrun with 2 trainer ranks, a local Ray, CPU rollout engines, 2 rollout steps
of DAPO + QAE on the demo task (engines on their own, and colocated); an engine killed in the
middle of a run comes back with the current weights; resume determinism against the
uninterrupted run."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from megatron_qae.persistence.metrics import read_metrics
from testsupport import tiny




@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    proc = tiny.train_run(run_dir, 2, ["run.num_rollout_steps=2", "run.eval_interval_steps=2"])
    (run_dir / "terminal.txt").write_text(proc.stdout + proc.stderr)
    return run_dir


def test_terminal_shows_our_messages_and_third_party_notices_go_to_the_log_file(e2e_run):
    terminal = (e2e_run / "terminal.txt").read_text()
    log = (e2e_run / "logs" / "rank0.log").read_text()
    for notice in ("GPTModel IS DEPRECATED", "Apex is not installed"):  # megatron-core's, at build / import
        assert notice not in terminal and notice in log
    assert "Started a local Ray instance" not in terminal


def test_two_ranks_two_steps_write_metrics_and_sync_engines(e2e_run):
    rows = read_metrics(e2e_run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        # The engines report, over their own HTTP API, the version the trainer pushed, and
        # sampled with exactly the trainer's weights (fp32 on both sides).
        assert r["sync/engine_version_min"] == r["sync/engine_version_max"] == r["step"]
        assert r["train/logprob_gap_rollout"] < 1e-4
        assert r["train/policy_version"] == r["step"]
        assert 0.0 <= r["adv/zero_frac"] <= 1.0
        assert r["train/optimizer_steps"] >= 1
        assert r["sync/bytes"] > 0
    assert "eval/avg@4" in rows[-1] or any(k.startswith("eval/avg@") for k in rows[-1])
    assert (e2e_run / "config.yaml").is_file()
    assert any((e2e_run / "tensorboard").iterdir())


def test_pipeline_stages_send_their_own_weights_each_step(tmp_path):
    """pp=2 through the loop: each stage's sender forms its own weight group with the engines
    (rank 0 says where and when to re-form) and the engines sample with the trainer's weights."""
    run_dir = tmp_path / "run"
    tiny.train_run(run_dir, 2, ["parallel.pp=2", "run.log_tensorboard=false"])
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["sync/engine_version_min"] == r["sync/engine_version_max"] == r["step"]
        assert r["train/logprob_gap_rollout"] < 1e-4
        assert r["sync/bytes"] > 0 and r["sync/attempts"] == 1


def test_colocated_engines_get_weights_by_handle_each_step(tmp_path):
    run_dir = tmp_path / "run"
    tiny.train_run(run_dir, 2, ["engine.colocate=true", "engine.num_engines=2", "run.log_tensorboard=false"])
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        # Both engines generated after releasing their weights for training and resuming:
        # they refuse to generate while released, so the loop's order is checked too.
        assert r["sync/engine_version_min"] == r["sync/engine_version_max"] == r["step"]
        assert r["train/logprob_gap_rollout"] < 1e-4
        assert r["sync/bytes"] > 0 and r["sync/attempts"] == 1
        # engine.offload_train_state (on by default when colocated): released during rollout.
        assert r["colocated/offloaded_bytes"] > 0


@pytest.mark.faults
def test_engine_killed_mid_run_comes_back_with_current_weights(tmp_path):
    run_dir = tmp_path / "run"
    n, prompts = 8, 8
    killed: list[int] = []

    def kill_after_first_step() -> None:
        # Step 1 is logged after its weight sync; the next thing the run does is step 2's rollout.
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not killed:
            if (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip():
                pids = tiny.cpu_server_pids(str(tmp_path / "model"))
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_after_first_step, daemon=True)
    watcher.start()
    tiny.train_run(run_dir, 2, ["engine.num_engines=2", "run.num_rollout_steps=3", "run.log_tensorboard=false",
                        f"rollout.n_samples_per_prompt={n}", f"rollout.prompts_per_step={prompts}",
                        "rollout.mini_batch_prompts=4", "rollout.gen_batch_prompts=16",
                        "rollout.max_gen_batches=20"])
    watcher.join(timeout=5)
    assert killed, "the engine was never killed"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["rollout/engine_restarts_total"] == 1
    for r in rows:
        # Every group of every batch is complete, once; both engines (the restarted one
        # included) hold the trainer's exact weights after every sync.
        assert r["rollout/groups"] == prompts and r["rollout/samples"] == prompts * n
        assert r["sync/engine_version_min"] == r["sync/engine_version_max"] == r["step"]
        assert r["train/logprob_gap_rollout"] < 1e-4
    assert len(tiny.cpu_server_pids(str(tmp_path / "model"))) == 0  # the run stopped its engines


def test_resume_after_step_k_repeats_the_uninterrupted_run(tmp_path):
    keys = ["rollout/accuracy_all", "rollout/reward_mean", "adv/zero_frac", "loss/loss",
            "loss/entropy", "train/grad_norm"]
    full, part = tmp_path / "a" / "run", tmp_path / "b" / "run"
    # The K controller on, with a band above the tiny model's entropy (about 4 nats/token on its
    # 64-token vocabulary): K rises one step per trained rollout step, and the resumed run must
    # continue from the saved K, not from algo.quantile_k.
    common = ["run.save_interval_steps=1", "run.log_tensorboard=false", "algo.k_control.enabled=true",
              "algo.k_control.low=50", "algo.k_control.high=60", "algo.k_control.window=1"]
    tiny.train_run(full, 1, [*common, "run.num_rollout_steps=3"])
    tiny.train_run(part, 1, [*common, "run.num_rollout_steps=2"])
    tiny.train_run(part, 1, [*common, "run.num_rollout_steps=3"])  # auto-resumes from step 2
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3]
    for k in keys:
        assert abs(a[2][k] - b[2][k]) < 1e-6, (k, a[2][k], b[2][k])
    for r in a:  # goodput: 1-token responses, zero-advantage ones skipped, so trained = gradient tokens
        assert r["perf/generated_tokens"] == r["rollout/response_tokens"]
        assert r["perf/gradient_tokens"] == r["train/trained_tokens"] == round((1 - r["adv/zero_frac"]) * r["rollout/samples"])
        assert abs(r["perf/goodput_tokens_per_s"] * r["time/step_s"] - r["perf/gradient_tokens"]) < 1e-6
        assert abs(sum(v for k, v in r.items() if k.startswith("rollout/group_acc_hist/")) - 1.0) < 1e-9
    ks = [r["algo/quantile_k"] for r in a]
    assert ks == [r["algo/quantile_k"] for r in b], (ks, [r["algo/quantile_k"] for r in b])
    # Each step's K is the last one's plus 0.05 when it trained (it logged an entropy), else the same.
    want = [0.4]
    for r in a[:-1]:
        want.append(round(want[-1] + 0.05, 10) if "algo/k_signal_entropy" in r else want[-1])
    assert ks == want and ks[-1] > 0.4, ks
    assert all(r["algo/k_band_low"] == 50.0 and r["algo/k_band_high"] == 60.0 for r in a)
    assert (part / "checkpoints" / "latest").read_text().strip() == "step_3"
