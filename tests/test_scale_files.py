"""Scale artefacts: the launch script parses (and passes shellcheck when present), the
Dockerfile's pins satisfy pyproject's ranges, the big configs pass the dry run (32.76B params for
Qwen2.5-32B) and a layout that cannot fit fails naming the shortfall, docs/config.md is current."""

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


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_qae.plan", *args], cwd=tiny.ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("config,nodes,trainer_gpus,params", [
    ("qwen2.5_32b_qae", 8, 32, "32.76B"), ("qwen2.5_7b_qae", 1, 4, "7.62B"), ("qwen2.5_1.5b_qae", 1, 4, "1.54B")])
def test_big_configs_pass_the_dry_run(config, nodes, trainer_gpus, params):
    r = _plan("--config", f"configs/{config}.yaml", "--nodes", str(nodes), "--trainer-gpus", str(trainer_gpus))
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert f"parameters: {params}" in r.stdout and "fits" in r.stdout


def test_qwen25_32b_parameter_count_matches_the_published_size():
    from megatron_qae.model import load_hf_config
    from megatron_qae.plan import count_parameters

    n = count_parameters(load_hf_config(tiny.ROOT / "configs" / "hf" / "qwen2.5-32b"))
    assert abs(n / 32.76e9 - 1) < 1e-3


def test_tp1_pp1_32b_does_not_fit_and_says_by_how_much():
    r = _plan("--config", "configs/qwen2.5_32b_qae.yaml", "--nodes", "8", "--trainer-gpus", "32",
              "parallel.tp=1", "parallel.pp=1", "parallel.sequence_parallel=false")
    assert r.returncode == 1
    short = re.search(r"short by ([0-9.]+) GiB", r.stdout)
    assert short and float(short.group(1)) > 100


def test_config_docs_are_current():
    r = subprocess.run([sys.executable, "-m", "tools.gen_config_docs", "--check"], cwd=tiny.ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
