"""Damaged checkpoints: every file kind, corrupted or truncated, is named with the reason; a
resume falls back to the newest intact checkpoint and continues exactly, or refuses in the
strict mode. The checkpoints are real ones written by the trainer (torchrun worker)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_qae.persistence import checkpoint
from megatron_qae.persistence.checkpoint_verify import CheckpointDamaged
from testsupport import tiny

pytestmark = pytest.mark.faults

WORKER = tiny.ROOT / "tests" / "dist_workers" / "ckpt_worker.py"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    tiny.torchrun(WORKER, 1, ["--mode", "save", "--save-step2", "--run-dir", str(run)])
    return run


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _one(step_dir: Path, pattern: str) -> Path:
    found = sorted(step_dir.glob(pattern))
    assert found, f"no {pattern} in {sorted(p.name for p in step_dir.iterdir())}"
    return found[0]


def _flip(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "distcp-flipped": ("*.distcp", _flip, "sha256 mismatch"),
    "distcp-truncated": ("*.distcp", _truncate, "truncated"),
    "distcp-missing": ("*.distcp", Path.unlink, "missing"),
    "metadata-truncated": (".metadata", _truncate, "truncated"),
    "metadata-json-flipped": ("metadata.json", _flip, "sha256 mismatch"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_each_damaged_file_kind_is_named_with_the_reason(saved_run, tmp_path, world_of_one, kind):
    run = _copy(saved_run, tmp_path)
    step2 = run / "checkpoints" / "step_2"
    pattern, damage, reason = DAMAGE[kind]
    target = _one(step2, pattern)
    damage(target)
    with pytest.raises(CheckpointDamaged) as err:
        checkpoint._verify(step2, checkpoint._read_marker(step2))
    assert err.value.problems == [f"{target.name}: " + err.value.problems[0].split(": ", 1)[1]]
    assert reason in str(err.value) and str(step2) in str(err.value)
    checkpoint._verify(run / "checkpoints" / "step_1", checkpoint._read_marker(run / "checkpoints" / "step_1"))


def test_truncated_completion_marker_is_damage_not_a_crash(saved_run, tmp_path, world_of_one):
    run = _copy(saved_run, tmp_path)
    step2 = run / "checkpoints" / "step_2"
    _truncate(step2 / "complete.json")
    with pytest.raises(CheckpointDamaged, match="complete.json: unreadable"):
        checkpoint._read_marker(step2)


def test_marker_records_every_file_with_its_size(saved_run):
    import json

    step2 = saved_run / "checkpoints" / "step_2"
    files = json.loads((step2 / "complete.json").read_text())["files"]
    on_disk = {p.relative_to(step2).as_posix(): p.stat().st_size for p in step2.rglob("*")
               if p.is_file() and p.name != "complete.json"}
    assert {n: r["size_bytes"] for n, r in files.items()} == on_disk
    assert any(n.endswith(".distcp") for n in files) and ".metadata" in files


def test_resume_falls_back_to_the_newest_intact_checkpoint_exactly(saved_run, tmp_path):
    run = _copy(saved_run, tmp_path)
    _flip(_one(run / "checkpoints" / "step_2", "*.distcp"))
    proc = tiny.torchrun(WORKER, 1, ["--mode", "load", "--run-dir", str(run)])
    loaded = torch.load(run / "loaded.pp0.pt", weights_only=False)
    saved = torch.load(run / "saved.pp0.pt")
    assert loaded["path"].endswith("step_1") and loaded["state"]["step"] == 1
    assert all(torch.equal(saved["params"][k], loaded["params"][k]) for k in saved["params"])
    assert abs(saved["loss2"] - loaded["loss2"]) < 1e-6  # optimizer state of step 1 came back too
    assert "step_2 is damaged" in proc.stderr and "sha256 mismatch" in proc.stderr


def test_strict_mode_refuses_a_damaged_checkpoint_naming_file_and_fix(saved_run, tmp_path):
    run = _copy(saved_run, tmp_path)
    target = _one(run / "checkpoints" / "step_2", "*.distcp")
    _truncate(target)
    with pytest.raises(AssertionError) as err:
        tiny.torchrun(WORKER, 1, ["--mode", "load", "--on-damaged", "fail", "--run-dir", str(run)])
    text = str(err.value)
    assert target.name in text and "truncated" in text and "run.resume_from_damaged=fallback" in text
    assert not (run / "loaded.pp0.pt").exists()


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(saved_run, tmp_path, world_of_one):
    run = _copy(saved_run, tmp_path)
    for step_dir in (run / "checkpoints").glob("step_*"):
        _flip(_one(step_dir, "*.distcp"))
    with pytest.raises(RuntimeError, match="no intact checkpoint"):
        checkpoint.load_latest(run, policy=None, on_damaged="fallback")


def test_a_start_that_fails_on_a_damaged_checkpoint_leaves_no_engine_behind(tmp_path):
    """A real run saves step 1; its shard is truncated; a strict-mode restart stops with the
    file named, and the CPU engine it had launched is gone (it used to stay orphaned)."""

    run_dir = tmp_path / "run"
    tiny.train_run(run_dir, 1, ["run.num_rollout_steps=1", "run.save_interval_steps=1", "run.log_tensorboard=false"])
    target = _one(run_dir / "checkpoints" / "step_1", "*.distcp")
    _truncate(target)
    with pytest.raises(AssertionError) as err:
        tiny.train_run(run_dir, 1, ["run.num_rollout_steps=2", "run.resume_from_damaged=fail"])
    assert target.name in str(err.value) and "truncated" in str(err.value)
    assert tiny.cpu_server_pids(str(tmp_path / "model")) == []
