"""A rollout engine: a Ray actor that launches, watches and restarts one server process.

What it does: starts `python -m sglang.launch_server` (GPU) or `python -m
rollout_sglang.cpu_server` (CPU; the same HTTP API) on a free port, waits for /health, reports
its URL and process id, tells whether the process is alive, restarts it after a crash, and
stops it by terminating the process group it started (never by name). A colocated engine is
given its trainer ranks' GPUs (by UUID) and SGLang's memory saver. Server output goes to a
log file. What it does not: generate or push weights (the client does, over HTTP).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rollout_sglang.client import SGLangClient


def _free_port(host: str, start: int) -> int:
    for port in range(start, start + 2000):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{start}, {start + 2000}) on {host}; change engine.port_base")


def server_command(backend: str, model_path: str, host: str, port: int, tp_size: int,
                   mem_fraction_static: float, extra_args: dict[str, Any], seed: int,
                   colocated: bool = False) -> list[str]:
    """The command line of one server process (colocated SGLang can release its memory)."""
    if backend == "cpu":
        cmd = [sys.executable, "-m", "rollout_sglang.cpu_server", "--model-path", model_path,
               "--host", host, "--port", str(port), "--tp-size", str(tp_size), "--random-seed", str(seed)]
    elif backend == "sglang":
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
               "--host", host, "--port", str(port), "--tp-size", str(tp_size),
               "--mem-fraction-static", str(mem_fraction_static), "--random-seed", str(seed),
               "--skip-tokenizer-init"]
        if colocated:
            cmd.append("--enable-memory-saver")
    else:
        raise ValueError(f"engine.backend={backend!r}: use 'cpu' or 'sglang'")
    for key, value in extra_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value not in (False, None):
            cmd += [flag, str(value)]
    return cmd


class RolloutEngine:
    """One server process, supervised. Use as a Ray actor: ray.remote(RolloutEngine)."""

    def __init__(self, model_path: str, backend: str = "cpu", host: str = "127.0.0.1",
                 port: int = 30000, tp_size: int = 1, mem_fraction_static: float = 0.8,
                 extra_args: dict[str, Any] | None = None, startup_timeout_s: float = 300.0,
                 request_timeout_s: float = 600.0, log_dir: str = ".", seed: int = 0,
                 devices: tuple[str, ...] = (), colocated: bool = False) -> None:
        self.model_path, self.backend, self.host = model_path, backend, host
        self.port_base, self.tp_size = port, tp_size
        self.mem_fraction_static = mem_fraction_static
        self.extra_args = dict(extra_args or {})
        self.startup_timeout_s, self.request_timeout_s = startup_timeout_s, request_timeout_s
        self.log_dir, self.seed = Path(log_dir), seed
        self.devices, self.colocated = tuple(devices), colocated
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        self.port = _free_port(self.host, self.port_base)
        cmd = server_command(self.backend, self.model_path, self.host, self.port, self.tp_size,
                             self.mem_fraction_static, self.extra_args, self.seed, self.colocated)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"engine_{self.port}.log", "ab")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if self.devices:  # colocated: exactly the GPUs of the trainer ranks it shares
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self._wait_healthy(cmd)

    def _wait_healthy(self, cmd: list[str]) -> None:
        client = SGLangClient(self.url(), timeout_s=5.0)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with code {self.proc.returncode} during start-up: "
                                   f"{' '.join(cmd)}; see {self.log_dir}/engine_{self.port}.log")
            if client.health(timeout_s=2.0):
                return
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"engine at {self.url()} not healthy after {self.startup_timeout_s} s; "
                           f"raise engine.startup_timeout_s or see {self.log_dir}/engine_{self.port}.log")

    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def pid(self) -> int:
        return self.proc.pid

    def tp(self) -> int:
        return self.tp_size

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> str:
        """Stop (if needed) and start the server again; returns its (new) URL."""
        self.stop()
        self.restarts += 1
        self._start()
        return self.url()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
