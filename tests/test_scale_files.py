"""Scale artefacts: the launch script parses (and passes shellcheck when present), the
Dockerfile's pins satisfy pyproject's ranges, docs/config.md is current. The dry-run planner is
tested in test_plan.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from tests import tiny

SCRIPT = tiny.ROOT / "examples" / "run_qwen2.5_32b_qae.sh"


def test_launch_script_parses_and_is_shellcheck_clean():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    r = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_dockerfile_pins_agree_with_pyproject():
    project = tomllib.loads((tiny.ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]
    ranges = {r.name.lower(): r.specifier for r in reqs}
    pins = re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][^"]*)"', (tiny.ROOT / "Dockerfile").read_text())
    assert len(pins) >= 5
    for name, version in pins:
        assert name.lower() in ranges, f"{name} is pinned in the Dockerfile but not in pyproject"
        assert version in ranges[name.lower()], f"{name}=={version} outside pyproject's {ranges[name.lower()]}"


def test_config_docs_are_current():
    r = subprocess.run([sys.executable, "-m", "tools.gen_config_docs", "--check"], cwd=tiny.ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
