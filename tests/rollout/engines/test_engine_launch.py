"""The engine launcher: the address an engine binds comes from the node IP Ray reports on a
multi-node cluster, every engine requires the run's API key, SGLang-on-CPU gets its switch
and the loud `sgl_kernel` stand-in (and nothing else does), and the CPU KV pool must be
sized; the entry point leaves Ray auth alone on a cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import ray.util

from testsupport.cpu_server import write_model_dir
from rollout_sglang.sglang.client import EngineError, SGLangClient
from rollout_sglang.engines.engine import CPU_STAND_IN_DIR, RolloutEngine, engine_host, server_command, server_env
from testsupport import tiny
from testsupport.ray_local import local_ray


def test_engine_host_is_the_node_ip_only_on_a_multi_node_cluster():
    assert engine_host("127.0.0.1", "10.0.0.7", num_nodes=1) == "127.0.0.1"
    assert engine_host("127.0.0.1", "10.0.0.7", num_nodes=3) == "10.0.0.7"
    assert engine_host("localhost", "10.0.0.7", num_nodes=2) == "10.0.0.7"
    assert engine_host("0.0.0.0", "10.0.0.7", num_nodes=2) == "0.0.0.0"  # an explicit choice stays


def test_engine_binds_the_reported_node_ip_and_requires_the_api_key(tmp_path, monkeypatch):
    # The node IP Ray reports, here a loopback address other than 127.0.0.1 so the test
    # reaches nothing beyond this machine.
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.2")
    model = write_model_dir(tmp_path / "model", tiny.tiny_hf_config(), seed=0)
    engine = RolloutEngine(str(model), backend="cpu", port=33000, log_dir=str(tmp_path),
                           api_key="s3cret", bind_node_ip=True)
    try:
        assert engine.url().startswith("http://127.0.0.2:")
        with pytest.raises(EngineError) as refused:
            SGLangClient(engine.url(), timeout_s=30).model_info()
        assert refused.value.status == 401
        assert SGLangClient(engine.url(), timeout_s=30, api_key="s3cret").weight_version() == "default"
    finally:
        engine.stop()


def test_sglang_on_cpu_gets_the_stand_in_and_a_sized_kv_pool():
    args = {"device": "cpu", "max_total_tokens": 1024}
    cmd = server_command("sglang", "/m", "127.0.0.1", 1, 1, 0.8, args, 0, python="/venv/bin/python",
                         api_key="k")
    assert cmd[:3] == ["/venv/bin/python", "-m", "sglang.launch_server"]
    assert "--api-key=k" in cmd and cmd[cmd.index("--device") + 1] == "cpu"
    env = server_env("sglang", args, ())
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(CPU_STAND_IN_DIR)
    gpu = server_env("sglang", {}, ("GPU-1",))
    assert "SGLANG_USE_CPU_ENGINE" not in gpu and str(CPU_STAND_IN_DIR) not in gpu.get("PYTHONPATH", "")


def test_engines_get_a_health_route_that_does_not_generate_and_not_the_trainers_settings(monkeypatch):
    # Ray hands its workers the environment of whoever started it: the trainer's (or the
    # launch script's) CUDA_DEVICE_MAX_CONNECTIONS=1 must stop at the engine's server.
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    for backend, args in (("sglang", {}), ("sglang", {"device": "cpu"}), ("cpu", {})):
        env = server_env(backend, args, ())
        assert "CUDA_DEVICE_MAX_CONNECTIONS" not in env, backend
    assert server_env("sglang", {}, ())["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] == "0"
    with pytest.raises(ValueError, match="max_total_tokens"):
        server_command("sglang", "/m", "127.0.0.1", 1, 1, 0.8, {"device": "cpu"}, 0)


def test_stand_in_kernels_import_and_fail_loudly_when_called():
    code = ("import sgl_kernel\n"
            "from sgl_kernel import rmsnorm\n"
            "from sgl_kernel.kvcacheio import transfer_kv_per_layer\n"
            "try:\n    rmsnorm(1)\nexcept RuntimeError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(CPU_STAND_IN_DIR)})
    assert proc.returncode == 0, proc.stderr
    assert "sgl_kernel.rmsnorm was called" in proc.stdout and "stand-in" in proc.stdout


def test_ray_auth_is_turned_off_only_for_the_local_embedded_ray():
    from megatron_qae.train import local_ray_auth_default

    cluster: dict = {}
    local_ray_auth_default("head:6379", cluster)
    assert "RAY_AUTH_MODE" not in cluster
    local: dict = {}
    local_ray_auth_default(None, local)
    assert local == {"RAY_AUTH_MODE": "disabled"}
    chosen = {"RAY_AUTH_MODE": "token"}
    local_ray_auth_default(None, chosen)
    assert chosen == {"RAY_AUTH_MODE": "token"}  # an explicit choice is kept


def test_server_dies_with_its_engine_actor(tmp_path):
    # The actor's worker process killed outright (the OOM killer, a crash, a dead raylet): no
    # cleanup runs in it, Ray's own child reaping included. Before, the server (its own session)
    # kept running, orphaned, holding its port (and on GPU its memory).
    import psutil

    model = write_model_dir(tmp_path / "model", tiny.tiny_hf_config(), seed=0)
    with local_ray(num_cpus=1):
        actor = ray.remote(RolloutEngine).options(num_cpus=0).remote(
            str(model), backend="cpu", port=33100, log_dir=str(tmp_path), api_key="k")
        first = ray.get(actor.pid.remote())
        ray.get(actor.restart.remote())  # a server started by a later method call, too
        server = ray.get(actor.pid.remote())
        assert server != first and not psutil.pid_exists(first)
        assert ray.get(actor.is_alive.remote())  # outlives the method call that started it
        os.kill(psutil.Process(server).ppid(), signal.SIGKILL)
        psutil.Process(server).wait(timeout=30)  # raises TimeoutExpired if it stays up
    assert tiny.cpu_server_pids(str(model)) == []


def test_an_api_key_that_starts_with_a_dash_reaches_the_server_as_its_value(tmp_path):
    # secrets.token_urlsafe draws such a key about one run in 64; as two arguments argparse
    # took it for an option and the server exited at start ("--api-key: expected one argument").
    cmd = server_command("cpu", str(tmp_path / "no-model"), "127.0.0.1", 1, 1, 0.8, {}, 0, api_key="-k3y")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "expected one argument" not in proc.stderr, proc.stderr[-2000:]
    assert "no-model" in proc.stderr  # it got past its arguments, to loading the (missing) model
