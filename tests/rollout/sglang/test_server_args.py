"""engine.sglang_args against SGLang's parser in the engines' python: the failures that need no
SGLang (a python without it, one that does not run, a question past its deadline). The check
against the real parser, from a trainer python without sglang, is in test_sglang_real.py."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from rollout_sglang.sglang import server_args


def test_a_python_without_sglang_is_a_config_error_naming_it():
    assert importlib.util.find_spec("sglang") is None  # the trainer's venv has no sglang
    with pytest.raises(ValueError, match=f"engine.backend=sglang: {sys.executable} cannot import "
                                         "sglang.srt.server_args .*set engine.sglang_python"):
        server_args.validate_server_args({"max_total_tokens": 64}, sys.executable)


def test_a_python_that_does_not_run_is_named(tmp_path):
    with pytest.raises(ValueError, match="engine.sglang_python='.*/nope' cannot run"):
        server_args.validate_server_args({"max_total_tokens": 64}, str(tmp_path / "nope"))


def test_a_question_past_its_deadline_is_a_timeout(monkeypatch, tmp_path):
    slow = tmp_path / "slow_python"
    slow.write_text("#!/bin/sh\nexec sleep 5\n")
    slow.chmod(0o755)
    monkeypatch.setattr(server_args, "ASK_TIMEOUT_S", 0.2)
    with pytest.raises(TimeoutError, match="timed out after 0.2 s"):
        server_args.validate_server_args({"max_total_tokens": 64}, str(slow))


def test_no_keys_asks_nothing(tmp_path):
    server_args.validate_server_args({}, str(tmp_path / "nope"))
