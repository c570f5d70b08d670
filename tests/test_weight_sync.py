"""After a weight sync, the CPU rollout server's log-probs of its own samples equal the Megatron
policy's recomputed log-probs (TP=1, TP=2, PP=2); a wrong gate/up mapping must fail this."""

from __future__ import annotations

import json

import pytest

from benchmarks.server import CpuServer, write_model_dir
from tests import tiny

WORKER = tiny.ROOT / "tests" / "dist_workers" / "sync_worker.py"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # The server starts from other weights (seed 0); the trainer pushes seed-7 weights.
    model_dir = write_model_dir(tmp_path_factory.mktemp("srv") / "model", tiny.tiny_hf_config(), seed=0)
    with CpuServer(model_dir) as url:
        yield url


def _run(server, tmp_path, nproc: int, args: list[str]) -> dict:
    out = tmp_path / "out.json"
    tiny.torchrun(WORKER, nproc, [*args, "--url", server, "--out", str(out)])
    return json.loads(out.read_text())


@pytest.mark.parametrize("nproc,args", [(1, []), (2, ["--tp", "2"]), (2, ["--pp", "2"])])
def test_engine_logprobs_equal_trainer_logprobs_after_sync(server, tmp_path, nproc, args):
    res = _run(server, tmp_path, nproc, args)
    assert len(res["rollout"]) == len(res["trainer"]) > 0
    assert max(abs(a - b) for a, b in zip(res["rollout"], res["trainer"])) < 1e-4
    assert res["engine_version"] == "3"


def test_wrong_mapping_is_caught(server, tmp_path):
    res = _run(server, tmp_path, 1, ["--corrupt"])
    assert max(abs(a - b) for a, b in zip(res["rollout"], res["trainer"])) > 1e-2
