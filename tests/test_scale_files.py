"""Scale artefacts: the launch script parses (and passes shellcheck when present), the
Dockerfile's pins satisfy pyproject's ranges, docs/config.md is current. The dry-run planner is
tested in test_plan.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from testsupport import tiny

SCRIPT = tiny.ROOT / "examples" / "run_qwen2.5_32b_qae.sh"
SBATCH = tiny.ROOT / "examples" / "run_qwen2.5_32b_qae.sbatch"


def test_launch_script_parses_and_is_shellcheck_clean():
    for script in (SCRIPT, SBATCH):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    for script in (SCRIPT, SBATCH):
        r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def _pip_resolve(requirements: list[str], report, constraints=None) -> dict[str, dict]:
    """pip's own resolver, dry run (no install, no GPU): name -> metadata of what it would install."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
           "--report", str(report), *requirements]
    if constraints is not None:
        cmd += ["-c", str(constraints)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"pip cannot resolve {requirements}:\n{r.stderr[-3000:]}"
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in json.loads(report.read_text())["install"]}


@pytest.mark.slow
def test_docker_image_pins_resolve_with_sglang_and_megatron_metadata(tmp_path):
    """The image is SGLang's own, and its pins resolve with sglang's and megatron-core's metadata:
    torch and transformers stay what the pinned sglang requires."""
    text = (tiny.ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM lmsysorg/sglang:v(\S+)\s*$", text, re.M)
    assert base, "the image must be based on SGLang's own image (lmsysorg/sglang:vX.Y.Z)"
    sglang_version = base.group(1)
    project = tomllib.loads((tiny.ROOT / "pyproject.toml").read_text())["project"]
    gpu = {Requirement(r).name.lower(): Requirement(r) for r in project["optional-dependencies"]["gpu"]}
    assert sglang_version in gpu["sglang"].specifier
    pins = re.findall(r'"([A-Za-z0-9_.-]+(?:\[[^\]]*\])?)==([0-9][^"]*)"', text)
    plain = [f"{n}=={v}" for n, v in pins if not n.startswith("transformer-engine")]
    te_version = {v for n, v in pins if n.startswith("transformer-engine")}
    assert len(te_version) == 1, pins
    first = _pip_resolve([f"sglang=={sglang_version}", *plain, *project["dependencies"]], tmp_path / "a.json")
    sglang_pins = {canonicalize_name(Requirement(d).name): Requirement(d) for d in first["sglang"]["requires_dist"]}
    for name in ("torch", "transformers"):
        assert first[name]["version"] in sglang_pins[name].specifier, (name, first[name]["version"])
    cuda = [re.match(r"nvidia-cudnn-cu(\d+)", d) for d in first["torch"].get("requires_dist", [])]
    major = next(m.group(1) for m in cuda if m)
    constraints = tmp_path / "resolved.txt"
    constraints.write_text("".join(f"{n}=={m['version']}\n" for n, m in first.items()))
    second = _pip_resolve([f"transformer-engine[core-cu{major}]=={te_version.pop()}"], tmp_path / "b.json",
                          constraints)
    assert f"transformer-engine-cu{major}" in second


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


def _run_launch(tmp_path, node_rank: int, env_extra: dict[str, str], health_ok_after: int = 0,
                script=SCRIPT):
    """Run the launch script (or `script`) with `ray`, `python` and `torchrun` replaced by
    logging stand-ins, and Slurm's `scontrol` / `srun` by ones that act for node `node_rank`
    (the script is the unit under test; the commands it drives are not run)."""
    bindir, log = tmp_path / "bin", tmp_path / "calls.log"
    bindir.mkdir(exist_ok=True)
    counter = tmp_path / "health_calls"
    stub = ('#!/usr/bin/env bash\necho "$(basename "$0") $* | RAY_AUTH_MODE=${RAY_AUTH_MODE:-}'
            ' CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-}'
            ' CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}" >> ' + str(log) + '\n')
    ray_stub = stub + (f'if [ "$1" = health-check ]; then n=$(cat {counter} 2>/dev/null || echo 0); '
                       f'echo $((n + 1)) > {counter}; [ "$n" -ge {health_ok_after} ]; fi\n')
    scontrol = "#!/usr/bin/env bash\nprintf 'gpu-a\\ngpu-b\\n'\n"  # scontrol show hostnames
    srun = stub + 'while [ "$1" != bash ]; do shift; done\n' + f'SLURM_NODEID={node_rank} exec "$@"\n'
    for name, text in {"ray": ray_stub, "python": stub, "torchrun": stub, "scontrol": scontrol,
                       "srun": srun}.items():
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "NNODES": "4", "NODE_RANK": str(node_rank),
           "MASTER_ADDR": "node0", "MODEL_DIR": "/models/q", "TRAINER_NODES": "2", **env_extra}
    env = {k: v for k, v in env.items() if v is not None}  # None: unset
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60,
                       cwd=tiny.ROOT)
    calls = log.read_text().splitlines() if log.exists() else []
    return r, calls


def test_launch_script_refuses_without_ray_token(tmp_path):
    r, calls = _run_launch(tmp_path, 0, {})
    assert r.returncode == 2 and "RAY_AUTH_TOKEN" in r.stderr
    assert calls == []


def test_launch_script_head_starts_before_planner_and_workers_wait(tmp_path):
    r, calls = _run_launch(tmp_path, 0, {"RAY_AUTH_TOKEN": "t"})
    assert r.returncode == 0, r.stderr
    kinds = [c.split(" |")[0].split()[:3] for c in calls]
    assert kinds[0][:3] == ["ray", "start", "--head"]
    assert kinds[1][:3] == ["python", "-m", "megatron_qae.plan"]
    assert kinds[2][0] == "torchrun" and kinds[-1][:2] == ["ray", "stop"]
    torchrun = calls[2]
    assert "RAY_AUTH_MODE=token" in torchrun and "CUDA_DEVICE_MAX_CONNECTIONS=1" in torchrun
    # Ray (and so every engine it starts) does not inherit the trainer's CUDA_DEVICE_MAX_CONNECTIONS.
    assert calls[0].endswith("CUDA_DEVICE_MAX_CONNECTIONS= CUDA_VISIBLE_DEVICES=")
    assert "--num-gpus 0" in calls[0] and "--nnodes 2 --node-rank 0 --nproc-per-node 8" in torchrun

    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    r, calls = _run_launch(worker_dir, 1, {"RAY_AUTH_TOKEN": "t", "RAY_WAIT_S": "60"}, health_ok_after=1)
    assert r.returncode == 0, r.stderr
    kinds = [c.split(" |")[0].split()[:2] for c in calls]
    # The head did not answer at the first probe: the worker waits, then joins, then trains.
    assert kinds[:3] == [["ray", "health-check"], ["ray", "health-check"], ["ray", "start"]]
    assert not any(k[0] == "python" for k in kinds), "only node 0 runs the planner"
    assert kinds[3][0] == "torchrun"


def test_launch_script_one_node_splits_the_gpus_between_torchrun_and_ray(tmp_path):
    """NNODES=1 (not colocated): torchrun gets GPUs 0-3 and one node, the Ray head the other four
    visible and counted, so the engines are placed on GPUs 4-7 (it was --nnodes 0 and a head
    with --num-gpus 0: nothing could place an engine)."""
    r, calls = _run_launch(tmp_path, 0, {"RAY_AUTH_TOKEN": "t", "NNODES": "1", "TRAINER_NODES": None})
    assert r.returncode == 0, r.stderr
    head, plan, torchrun = calls[0], calls[1], calls[2]
    assert head.startswith("ray start --head") and "--num-gpus 4" in head
    assert head.endswith("CUDA_DEVICE_MAX_CONNECTIONS= CUDA_VISIBLE_DEVICES=4,5,6,7")
    assert "--nodes 1 --gpus-per-node 8 --trainer-gpus 4" in plan
    assert torchrun.startswith("torchrun --nnodes 1 --node-rank 0 --nproc-per-node 4 ")
    assert torchrun.endswith("CUDA_DEVICE_MAX_CONNECTIONS=1 CUDA_VISIBLE_DEVICES=0,1,2,3")
    assert calls[-1].startswith("ray stop")

    colocated = tmp_path / "colocated"
    colocated.mkdir()
    r, calls = _run_launch(colocated, 0, {"RAY_AUTH_TOKEN": "t", "NNODES": "1", "TRAINER_NODES": None,
                                          "TRAINER_GPUS_PER_NODE": "8"})
    assert r.returncode == 0, r.stderr
    assert "--num-gpus 0" in calls[0] and "--nproc-per-node 8" in calls[2]

    bad = tmp_path / "bad"
    bad.mkdir()
    r, calls = _run_launch(bad, 0, {"RAY_AUTH_TOKEN": "t", "NNODES": "1", "TRAINER_NODES": None,
                                    "TRAINER_GPUS_PER_NODE": "9"})
    assert r.returncode == 2 and "TRAINER_GPUS_PER_NODE=9 must be in 1..GPUS_PER_NODE=8" in r.stderr
    assert calls == []


def _fake_site(root, sglang_version: str):
    """A site dir as SGLang's image has it: torch / transformers / triton installed normally,
    sglang installed editable (its dist-info says so in direct_url.json, as pip writes it)."""
    for name, version in {"torch": "2.14.1", "transformers": "5.19.0", "triton": "3.7.0",
                          "sglang": sglang_version}.items():
        info = root / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (root / f"sglang-{sglang_version}.dist-info" / "direct_url.json").write_text(
        json.dumps({"url": "file:///sgl-workspace/sglang/python", "dir_info": {"editable": True}}))


def _run_pin_step(tmp_path, sglang_version: str):
    """The Dockerfile's pin step, run as written (its pins file and script copy redirected here),
    on an image whose sglang is an editable install: `pip freeze` prints it as `-e git+...`."""
    text = (tiny.ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    step = next(line[len("RUN "):] for line in text.splitlines()
                if line.startswith("RUN ") and "/etc/megatron-qae-base-pins.txt" in line)
    pins = tmp_path / "pins.txt"
    step = step.replace("/etc/megatron-qae-base-pins.txt", str(pins))
    step = step.replace("/tmp/base_pins.py", str(tiny.ROOT / "tools" / "base_pins.py"))
    site, bindir = tmp_path / "site", tmp_path / "bin"
    _fake_site(site, sglang_version)
    bindir.mkdir()
    (bindir / "pip").write_text("#!/usr/bin/env bash\n"  # pip freeze on SGLang's image
                                "printf 'torch==2.14.1\\ntransformers==5.19.0\\ntriton==3.7.0\\n"
                                "-e git+https://github.com/sgl-project/sglang@0123abc#egg=sglang"
                                "&subdirectory=python\\n'\n")
    (bindir / "pip").chmod(0o755)
    (bindir / "python").symlink_to(sys.executable)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "PYTHONPATH": str(site)}
    r = subprocess.run(["bash", "-c", step], env=env, capture_output=True, text=True, timeout=60)
    return r, pins.read_text().splitlines() if pins.exists() else []


def test_docker_pin_step_reads_an_editable_sglang(tmp_path):
    """`pip freeze | grep '^sglang=='` finds nothing when sglang is installed editable (the
    build stopped at this step); the versions come from the installed metadata, sglang kept."""
    r, pins = _run_pin_step(tmp_path, "0.5.23")
    assert r.returncode == 0, r.stderr
    assert pins == ["torch==2.14.1", "transformers==5.19.0", "sglang==0.5.23", "triton==3.7.0"]

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    r, _ = _run_pin_step(wrong, "0.5.22")
    assert r.returncode != 0 and "base image has sglang 0.5.22, this project pins sglang==0.5.23" in r.stderr


def test_slurm_example_runs_the_launch_script_on_every_node(tmp_path):
    """The sbatch example: one srun task per node, each running the same launch script with
    Slurm's node count, first node and node id (the srun stand-in acts for one node)."""
    slurm = {"RAY_AUTH_TOKEN": "t", "NNODES": None, "MASTER_ADDR": None, "TRAINER_NODES": None,
             "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_GPUS_ON_NODE": "8",
             "SLURM_SUBMIT_DIR": str(tiny.ROOT)}
    r, calls = _run_launch(tmp_path, 0, slurm, script=SBATCH)
    assert r.returncode == 0, r.stderr
    assert calls[0].startswith("srun --nodes 2 --ntasks-per-node 1 --kill-on-bad-exit=1 --wait=120 bash -c")
    assert calls[1].startswith("ray start --head") and "--num-gpus 0" in calls[1]
    assert "--nodes 2 --gpus-per-node 8 --trainer-gpus 8" in calls[2]
    assert calls[3].startswith("torchrun --nnodes 1 --node-rank 0 --nproc-per-node 8 --master-addr gpu-a ")

    engine_node = tmp_path / "engine_node"
    engine_node.mkdir()
    r, calls = _run_launch(engine_node, 1, slurm, script=SBATCH)
    assert r.returncode == 0, r.stderr
    assert calls[-1].startswith("ray start --address gpu-a:6379 --num-gpus 8") and "--block" in calls[-1]
