"""Start / stop one CPU rollout server for a benchmark or a test (a subprocess serving on a
listening socket bound here, so no other process can take its port before it starts)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from rollout_sglang.sglang.client import SGLangClient


def write_model_dir(path: Path, hf: dict, seed: int = 0) -> Path:
    """config.json + random safetensors weights of `hf` (a Qwen2 config dict)."""
    from testsupport.tiny import tiny_hf_model

    path.mkdir(parents=True, exist_ok=True)
    tiny_hf_model(hf, seed).save_pretrained(path)
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()),
                                                  "architectures": ["Qwen2ForCausalLM"]}))
    return path


class CpuServer:
    """`with CpuServer(model_dir) as url:` runs `python -m rollout_sglang.cpu_server.server`."""

    def __init__(self, model_dir: Path, threads: int = 1, extra_args: tuple[str, ...] = ()) -> None:
        self.model_dir, self.threads, self.extra_args = model_dir, threads, tuple(extra_args)
        self.held = socket.socket()
        self.held.bind(("127.0.0.1", 0))
        self.held.listen(128)
        self.port = self.held.getsockname()[1]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        cmd = [sys.executable, "-m", "rollout_sglang.cpu_server.server", "--model-path", str(self.model_dir),
               "--host", "127.0.0.1", "--port", str(self.port), "--fd", str(self.held.fileno()),
               "--num-threads", str(self.threads), *self.extra_args]
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         pass_fds=(self.held.fileno(),))
        finally:
            self.held.close()  # the server holds it now
        url = f"http://127.0.0.1:{self.port}"
        client = SGLangClient(url, timeout_s=5.0)
        deadline = time.monotonic() + 300  # a busy shared machine starts it slowly
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cpu_server exited with {self.proc.returncode}: {' '.join(cmd)}")
            try:
                if client.health():
                    return url
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
        self.proc.kill()  # never leave a server that did not come up behind
        self.proc.wait()
        raise TimeoutError(f"cpu_server at {url} not healthy within 300 s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
