"""A rollout engine: a Ray actor that launches, watches and restarts one server process.

What it does: starts `python -m sglang.launch_server` (with `engine.sglang_python`, so SGLang
may live in its own venv) or `python -m rollout_sglang.cpu_server.server` (the same HTTP API) on a
free port (the CPU server inherits the socket bound here, so its port is held from the moment
it is chosen), with the run's API key, waits until it serves our model (/model_info; an SGLang
server, which binds its port itself, that lost its port to another process is relaunched on
the next) and has finished its own warmup (/ready), checks its SGLang version once
per start, reports its URL and process id, tells whether the process is alive, restarts it
after a crash, kills a hung one (SIGKILL of its process group), and stops it by terminating
the process group it started (never by name).
Extra SGLang arguments are SGLang's own server-argument names (`engine.sglang_args`), checked
once per run against SGLang's parser in the engines' python before any engine starts
(sglang/server_args.py, from the trainer's `Rollout.start`). `sglang_args.device=cpu`
serves real SGLang on CPU: SGLANG_USE_CPU_ENGINE=1 and the `sgl_kernel` stand-in of
tools/sglang_cpu on the server's PYTHONPATH (the kernel wheels are CUDA-only). On a cluster
of more than one node the server binds the node's IP (from Ray), so trainer rank 0 reaches it.
A colocated engine is given its trainer ranks' GPUs (by UUID) and SGLang's memory saver.
Server output goes to a log file. What it does not: generate or push weights (the client does,
over HTTP).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rollout_sglang.sglang.client import EngineError, SGLangClient

CPU_STAND_IN_DIR = Path(__file__).resolve().parents[2] / "tools" / "sglang_cpu"
"""Holds the `sgl_kernel` stand-in put on the server's path for `sglang_args.device=cpu`."""
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _bind_free_port(host: str, start: int) -> socket.socket:
    """A listening socket on the first port from `start` that is free on `host`."""
    for port in range(start, start + 2000):
        s = socket.socket()
        try:
            s.bind((host, port))
        except OSError:
            s.close()
            continue
        # Listening, not just bound: two bound sockets with SO_REUSEADDR (which uvicorn and
        # torch's TCPStore set) may share a port; nothing can bind a listening one.
        s.listen(128)
        return s
    raise RuntimeError(f"no free port in [{start}, {start + 2000}) on {host}; change engine.port_base")


def _free_port(host: str, start: int) -> int:
    """A port free now (probed, then released): only for SGLang, which binds --port itself."""
    with _bind_free_port(host, start) as s:
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent_pid: int):
    """A `preexec_fn` for the server: the kernel sends it SIGKILL when the process that launched
    it dies, however it dies (Ray kills an actor with SIGKILL, which runs no cleanup). SGLang's
    scheduler and detokenizer arm the same signal against the launcher, so the whole server
    goes with the actor. Linux only (prctl); the launcher thread must outlive the server, which
    holds for an actor's methods (they run on the worker's main thread)."""
    def arm() -> None:
        if sys.platform == "linux":
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the launcher died between fork and prctl
            os._exit(1)
    return arm


def engine_host(configured: str, node_ip: str, num_nodes: int) -> str:
    """The address a server binds: the configured one, except a loopback address on a
    cluster of more than one node, where trainer rank 0 may run elsewhere: then the IP Ray
    reports for the engine's node."""
    if num_nodes > 1 and configured in _LOOPBACK:
        return node_ip
    return configured


def server_command(backend: str, model_path: str, host: str, port: int, tp_size: int,
                   mem_fraction_static: float, extra_args: dict[str, Any], seed: int,
                   colocated: bool = False, python: str | None = None,
                   api_key: str | None = None, weight_sync_hosts: tuple[str, ...] = (),
                   listen_fd: int | None = None) -> list[str]:
    """The command line of one server process (colocated SGLang can release its memory).
    `python` runs SGLang (default: this interpreter); the CPU server always runs here, serves
    on the inherited listening socket `listen_fd` (bound to `port`) when given, and dials for
    weight sync only `weight_sync_hosts` (the trainer's address; default loopback)."""
    if backend == "cpu":
        cmd = [sys.executable, "-m", "rollout_sglang.cpu_server.server", "--model-path", model_path,
               "--host", host, "--port", str(port), "--tp-size", str(tp_size), "--random-seed", str(seed)]
        if listen_fd is not None:
            cmd += ["--fd", str(listen_fd)]
        if weight_sync_hosts:
            cmd += ["--weight-sync-hosts", ",".join(weight_sync_hosts)]
    elif backend == "sglang":
        if extra_args.get("device") == "cpu" and "max_total_tokens" not in extra_args:
            raise ValueError("engine.sglang_args.device=cpu needs engine.sglang_args.max_total_tokens "
                             "(e.g. 4096): without it SGLang sizes the KV pool at 0.8 x the machine's RAM")
        cmd = [python or sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
               "--host", host, "--port", str(port), "--tp-size", str(tp_size),
               "--mem-fraction-static", str(mem_fraction_static), "--random-seed", str(seed),
               "--skip-tokenizer-init"]
        if colocated:
            cmd.append("--enable-memory-saver")
    else:
        raise ValueError(f"engine.backend={backend!r}: use 'cpu' or 'sglang'")
    if api_key:
        # One argument: a key starting with "-" (token_urlsafe draws one about 1 run in 64)
        # would otherwise be read by argparse as an option, and the server would not start.
        cmd.append(f"--api-key={api_key}")
    for key, value in extra_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value not in (False, None):
            cmd += [flag, str(value)]
    return cmd


TRAINER_ONLY_ENV = ("CUDA_DEVICE_MAX_CONNECTIONS",)
"""Trainer settings an engine must not inherit (through Ray, from whoever started it):
CUDA_DEVICE_MAX_CONNECTIONS=1 serializes every stream on one hardware queue, which Megatron's
TP overlap wants and SGLang's overlapped scheduling does not."""


def server_env(backend: str, extra_args: dict[str, Any], devices: tuple[str, ...]) -> dict[str, str]:
    """The server's environment: one OpenMP thread unless set, the trainer-only settings
    removed, the GPUs of a colocated engine; for SGLang a /health that does not generate
    (SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0: otherwise every probe is a one-token generation
    through the scheduler that waits at least 1 s, and stalls behind a weight update,
    sglang/srt/environ.py:344, entrypoints/http_server.py:745-786), and for SGLang on CPU its
    CPU engine switch and the `sgl_kernel` stand-in."""
    env = {k: v for k, v in os.environ.items() if k not in TRAINER_ONLY_ENV}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    if devices:  # colocated: exactly the GPUs of the trainer ranks it shares
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    if backend == "sglang":
        env["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] = "0"
    if backend == "sglang" and extra_args.get("device") == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CPU_STAND_IN_DIR), env.get("PYTHONPATH")) if p)
    return env


class RolloutEngine:
    """One server process, supervised. Use as a Ray actor: ray.remote(RolloutEngine)."""

    def __init__(self, model_path: str, backend: str = "cpu", host: str = "127.0.0.1",
                 port: int = 30000, tp_size: int = 1, mem_fraction_static: float = 0.8,
                 extra_args: dict[str, Any] | None = None, startup_timeout_s: float = 300.0,
                 request_timeout_s: float = 600.0, log_dir: str = ".", seed: int = 0,
                 devices: tuple[str, ...] = (), colocated: bool = False, python: str | None = None,
                 api_key: str | None = None, bind_node_ip: bool = False,
                 weight_sync_hosts: tuple[str, ...] = (), start_now: bool = True) -> None:
        """`start_now=False`: `start()` launches the server (the pool first waits for Ray to
        place the actor, so a start that cannot be placed is told from one that is slow)."""
        if bind_node_ip:  # inside a Ray actor on a multi-node cluster
            import ray

            host = engine_host(host, ray.util.get_node_ip_address(), 2)
        self.model_path, self.backend, self.host = model_path, backend, host
        self.python, self.api_key = python, api_key
        self.weight_sync_hosts = tuple(weight_sync_hosts)
        self.port_base, self.tp_size = port, tp_size
        self.mem_fraction_static = mem_fraction_static
        self.extra_args = dict(extra_args or {})
        if backend == "sglang":
            if python is not None and not os.access(python, os.X_OK):
                raise ValueError(f"engine.sglang_python={python!r} is not an executable; give the "
                                 "absolute path of the python that has sglang (`make test` builds "
                                 ".venv-sglang/bin/python), or leave it unset to use this one")
        self.startup_timeout_s, self.request_timeout_s = startup_timeout_s, request_timeout_s
        self.log_dir, self.seed = Path(log_dir), seed
        self.devices, self.colocated = tuple(devices), colocated
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        if start_now:
            self._start()

    def start(self) -> str:
        """Launch the server of an engine made with `start_now=False`; returns its URL."""
        self._start()
        return self.url()

    def _start(self) -> None:
        """Launch on a free port. The CPU server inherits a socket bound and listening here
        (`--fd`), so its port is held from the moment it is chosen. SGLang binds --port itself
        after its imports and model load (~100 s) and derives its other ports from it, so its
        port can only be probed; one that lost the port to another process meanwhile is
        launched again on the next free one (three tries)."""
        first = self.port_base
        for _ in range(3):
            held = _bind_free_port(self.host, first) if self.backend == "cpu" else None
            self.port = held.getsockname()[1] if held is not None else _free_port(self.host, first)
            cmd = server_command(self.backend, self.model_path, self.host, self.port, self.tp_size,
                                 self.mem_fraction_static, self.extra_args, self.seed, self.colocated,
                                 self.python, self.api_key, self.weight_sync_hosts,
                                 listen_fd=held.fileno() if held is not None else None)
            self._launch(cmd, held)
            if self._wait_ready(cmd):
                break
            first = self.port + 1
        else:
            raise RuntimeError(f"engine lost its port to another process three times (last {self.port}); "
                               "set engine.port_base to a range nothing else uses")
        try:
            SGLangClient(self.url(), timeout_s=30.0, api_key=self.api_key).check_version()
        except Exception:
            self.stop()
            raise

    def _launch(self, cmd: list[str], held: socket.socket | None) -> None:
        """Start the server process (its own process group, killed with this actor), handing
        it `held`; this process' copy of the socket is closed once the server has it."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.log_path(), "ab") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                             preexec_fn=_die_with(os.getpid()),
                                             pass_fds=(held.fileno(),) if held is not None else (),
                                             env=server_env(self.backend, self.extra_args, self.devices))
        finally:
            if held is not None:
                held.close()

    def log_path(self) -> Path:
        return self.log_dir / f"engine_{self.port}.log"

    def _wait_ready(self, cmd: list[str]) -> bool:
        """Wait until our server answers /model_info for our model with our key (not some
        other process that took the port meanwhile) and then /ready: SGLang answers
        /model_info as soon as uvicorn serves, but counts as started only after its own warmup
        request (/health and /ready answer 503 until then, http_server.py:714-718, 735-736);
        an engine handed work or probed before that looks unhealthy. False if it lost the port."""
        client = SGLangClient(self.url(), timeout_s=5.0, api_key=self.api_key)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path().read_text(errors="replace")[-2000:]
                if "address already in use" in tail.lower():
                    return False
                shown = ["--api-key=***" if a.startswith("--api-key=") else a for a in cmd]
                raise RuntimeError(f"engine exited with code {self.proc.returncode} during start-up: "
                                   f"{' '.join(shown)}; end of {self.log_path()}:\n{tail}")
            if self._serves_our_model(client) and client.ready():
                return True
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"engine at {self.url()} not ready after {self.startup_timeout_s} s; "
                           f"raise engine.startup_timeout_s or see {self.log_path()}")

    def _serves_our_model(self, client: SGLangClient) -> bool:
        try:
            return client.model_info().get("model_path") == self.model_path
        except (EngineError, AttributeError):
            return False

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

    def kill(self) -> None:
        """SIGKILL the server's whole process group at once: a hung server (stopped, or
        wedged in a lock) would not act on SIGTERM. `restart` starts it again."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def stop(self) -> None:
        """Terminate the server's whole process group, also after its leader died (a killed
        SGLang launcher leaves its scheduler and detokenizer processes behind)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            # A stopped process keeps SIGTERM pending until it runs again.
            os.killpg(self.proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of the group is still there
        except ProcessLookupError:
            pass
        self.proc.wait()
