"""Every benchmark script imports: the scripts are not run by the suite (they measure, on an
idle machine), so a module they import that moved would otherwise go unnoticed until the next
measurement (bench_packing imported LossConfig from where it no longer lives). They are
imported in a child process: the tests and the benchmarks do not import each other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))

CHECK = """
import importlib, sys
missing = [n for n in sys.argv[1:] if not callable(getattr(importlib.import_module(f"benchmarks.{n}"), "main", None))]
assert not missing, f"no main() in {missing}"
"""


def test_every_benchmark_script_imports_and_has_main():
    assert len(SCRIPTS) >= 9
    done = subprocess.run([sys.executable, "-c", CHECK, *SCRIPTS], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
