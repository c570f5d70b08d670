"""Quiet by default: the planner (a plain entry point) prints its plan and nothing of
megatron-core's or torch's notices, which --verbose brings back."""

from __future__ import annotations

import subprocess
import sys

from testsupport import tiny

ARGS = ["--config", "configs/qwen3_14b_base_qae.yaml", "--nodes", "2", "--trainer-gpus", "8"]


def _plan(*extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_qae.plan", *ARGS, *extra], cwd=tiny.ROOT,
                          capture_output=True, text=True, timeout=300)


def test_planner_output_is_ours_alone_unless_verbose():
    quiet = _plan()
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout.rstrip().endswith("fits")
    assert quiet.stderr == "", quiet.stderr[-2000:]
    loud = _plan("--verbose")
    assert loud.returncode == 0 and loud.stdout == quiet.stdout
    assert "GPTModel IS DEPRECATED" in loud.stderr and "Apex is not installed" in loud.stderr


def test_console_shows_our_records_and_severe_ones_only(capsys, tmp_path):
    import logging

    from megatron_qae.run import console

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        console.setup(rank=0)
        logging.getLogger("megatron.core.models").warning("third-party notice")
        logging.getLogger("megatron_qae.run.loop").info("our progress")
        logging.getLogger("some_library.worker").error("third-party failure")  # one no test configures
        path = console.attach_run_dir(tmp_path, rank=0)
        logging.getLogger("torch.distributed").warning("later third-party notice")
        shown = capsys.readouterr().err
        assert "our progress" in shown and "third-party failure" in shown
        assert "notice" not in shown
        written = path.read_text()
        assert all(m in written for m in ("third-party notice", "our progress", "later third-party notice"))
    finally:
        for h in root.handlers:
            if isinstance(h, logging.FileHandler):
                h.close()
        root.handlers, root.level = saved
        logging.captureWarnings(False)
