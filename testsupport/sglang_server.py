"""The real SGLang server for the test suite: `sglang.launch_server --device cpu` from the
project's second venv (.venv-sglang, built by `make test`), started by our own launcher
(rollout_sglang.engines.engine.RolloutEngine) with the tiny model in fp32.

What it does: gives a module one real server (start-up is ~100 s and ~3 GB, so a module
starts it once and its tests share it) and always stops it. What it does not: skip: the tier
is part of the suite, and a missing .venv-sglang is an error that says how to build it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from rollout_sglang.engines.engine import RolloutEngine
from testsupport.tiny import ROOT

SGLANG_PYTHON = ROOT / ".venv-sglang" / "bin" / "python"
CPU_ARGS = {"device": "cpu", "max_total_tokens": 2048, "dtype": "float32", "skip_server_warmup": True,
            "disable_radix_cache": True}
"""Server args of the tier: SGLang on CPU, a small KV pool (SGLang sizes it at 0.8 x RAM
otherwise), fp32 so log-probs match the trainer to 1e-4; no radix cache, so every request
computes its prompt afresh."""


def sglang_python() -> str:
    if not SGLANG_PYTHON.is_file():
        raise RuntimeError(f"{SGLANG_PYTHON} is missing: the real-SGLang tier needs the second venv "
                           "that `make test` builds (make .venv-sglang/.installed)")
    return str(SGLANG_PYTHON)


@contextlib.contextmanager
def real_sglang(model_dir: Path, log_dir: Path, api_key: str | None = None,
                extra: dict | None = None, port: int = 31000) -> Iterator[RolloutEngine]:
    """One running real SGLang server (first free port from `port`); yields the engine."""
    engine = RolloutEngine(str(model_dir), backend="sglang", host="127.0.0.1", port=port,
                           extra_args={**CPU_ARGS, **(extra or {})}, startup_timeout_s=600,
                           request_timeout_s=120, log_dir=str(log_dir), python=sglang_python(),
                           api_key=api_key)
    try:
        yield engine
    finally:
        engine.stop()
