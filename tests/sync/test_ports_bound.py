"""Ports are bound, not probed then bound: the weight-group rendezvous port is held by the
trainer before any engine is told it, so another process (another run on the same machine)
cannot take it in between; a CPU engine serves on the socket its actor bound and listens on,
from before the server process starts."""

from __future__ import annotations

import socket
import subprocess
import threading

import pytest
import torch

from testsupport.cpu_server import CpuServer, write_model_dir
from megatron_qae.sync import weight_sync
from rollout_sglang.sglang.client import SGLangClient
from rollout_sglang.engines.engine import RolloutEngine
from testsupport import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("srv") / "model", tiny.tiny_hf_config(), seed=0)


def _take(port: int) -> socket.socket | None:
    """What another run does with a port it finds free: bind it and listen; None if it can't."""
    rival = socket.socket()
    try:
        rival.bind(("", port))
    except OSError:
        rival.close()
        return None
    rival.listen()
    return rival


def test_rendezvous_port_is_held_before_the_engines_are_told_it(model_dir, monkeypatch):
    """The worst interleaving, made deterministic: a rival takes the port the moment the engine
    is told it, and rank 0 joins the group only after that. A probed-then-released port is
    lost to the rival ("address already in use", or the engine dials the rival's socket and
    waits out its timeout); a held one cannot be taken, and the group then carries a weight."""
    rivals: list[socket.socket] = []
    told = threading.Event()
    tell = SGLangClient.init_weights_update_group

    def tell_and_compete(self, address, port, *args, **kwargs):
        rival = _take(port)
        if rival is not None:
            rivals.append(rival)
        told.set()
        return tell(self, address, port, *args, **kwargs)

    monkeypatch.setattr(SGLangClient, "init_weights_update_group", tell_and_compete)
    join = weight_sync.host_weight_group

    def join_after_the_engines_were_told(*args, **kwargs):
        assert told.wait(60)
        return join(*args, **kwargs)

    monkeypatch.setattr(weight_sync, "host_weight_group", join_after_the_engines_were_told)
    with CpuServer(model_dir) as url:
        try:
            link = weight_sync.connect_engines([(url, 1)], "127.0.0.1", "gloo", 60.0)
        finally:
            for rival in rivals:
                rival.close()
        assert rivals == [], "another process took the rendezvous port after the engine was told it"
        client = SGLangClient(url, timeout_s=60.0)
        client.begin_weight_update()
        norm = torch.full((tiny.tiny_hf_config()["hidden_size"],), 0.5)
        outcome = weight_sync._send_bucket(link, [("model.norm.weight", norm)], 1, weight_sync.SyncTimes(),
                                           flush=True)
        client.end_weight_update()
        weight_sync.disconnect(link)
        assert outcome.failed is None
        assert client.weight_version() == "1"


def test_cpu_engine_serves_on_the_port_it_chose_however_early_a_rival_tries(model_dir, tmp_path, monkeypatch):
    """A rival tries to take the engine's port the moment the server process is started (long
    before it has imported torch and could bind). The CPU server inherits the socket its actor
    bound and listens on, so the rival cannot, and the server comes up on the first port chosen,
    also after a restart. (A probed port was lost at every launch: three relaunches, then
    RuntimeError.)"""
    rivals: list[socket.socket] = []
    launched: list[int] = []
    popen = subprocess.Popen

    def launch_and_compete(cmd, *args, **kwargs):
        if "rollout_sglang.cpu_server.server" in cmd:
            launched.append(int(cmd[cmd.index("--port") + 1]))
            rival = _take(launched[-1])
            if rival is not None:
                rivals.append(rival)
        return popen(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", launch_and_compete)
    try:
        engine = RolloutEngine(str(model_dir), backend="cpu", port=tiny.free_port(), log_dir=str(tmp_path))
        try:
            first = engine.url()
            assert SGLangClient(first, timeout_s=30.0).model_info()["model_path"] == str(model_dir)
            engine.restart()
            assert SGLangClient(engine.url(), timeout_s=30.0).model_info()["model_path"] == str(model_dir)
        finally:
            engine.stop()
    finally:
        for rival in rivals:
            rival.close()
    assert rivals == [], f"a rival took an engine port after it was chosen (launched on {launched})"
    assert len(launched) == 2 and first.endswith(f":{launched[0]}"), launched
