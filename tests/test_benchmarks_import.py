"""Every benchmark script imports: the scripts are not run by the suite (they measure, on an
idle machine), so a module they import that moved would otherwise go unnoticed until the next
measurement (bench_packing imported LossConfig from where it no longer lives)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(getattr(module, "main", None)), f"benchmarks/{name}.py has no main()"
