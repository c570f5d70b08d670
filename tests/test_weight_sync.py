"""After a weight sync, the CPU rollout server's log-probs of its own samples equal the Megatron
policy's recomputed log-probs: over the weight group (TP=1, TP=2, PP=2) and colocated by
shared-memory handles (TP=2, one engine per rank); a wrong gate/up mapping must fail this; an
engine killed before a push makes the push report it without raising or hanging."""

from __future__ import annotations

import json

import pytest

from benchmarks.server import CpuServer, write_model_dir
from megatron_qae.colocated_sync import check_colocated_layout
from rollout_sglang.client import SGLangClient
from rollout_sglang.tensor_payload import serialize_named_tensors
from tests import tiny

WORKER = tiny.ROOT / "tests" / "dist_workers" / "sync_worker.py"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # The servers start from other weights (seed 0); the trainer pushes seed-7 weights.
    return write_model_dir(tmp_path_factory.mktemp("srv") / "model", tiny.tiny_hf_config(), seed=0)


@pytest.fixture(scope="module")
def started(model_dir):
    with CpuServer(model_dir) as a, CpuServer(model_dir) as b:
        yield [a, b]


@pytest.fixture
def servers(started, model_dir):
    """The module's servers, put back to their start weights (seed 0) and version 0, so no
    test can pass on what an earlier one pushed."""
    from transformers import Qwen2ForCausalLM

    state = list(Qwen2ForCausalLM.from_pretrained(model_dir).state_dict().items())
    for url in started:
        client = SGLangClient(url, timeout_s=60.0)
        client.begin_weight_update()
        client.update_weights_from_tensor([serialize_named_tensors(state)], weight_version="0")
        client.end_weight_update()
        assert client.weight_version() == "0"
    return started


def _run(tmp_path, nproc: int, urls: list[str], args: list[str]) -> dict:
    out = tmp_path / "out.json"
    tiny.torchrun(WORKER, nproc, [*args, "--urls", ",".join(urls), "--out", str(out)])
    return json.loads(out.read_text())


def _max_gap(engine: dict) -> float:
    assert len(engine["rollout"]) == len(engine["trainer"]) > 0
    return max(abs(a - b) for a, b in zip(engine["rollout"], engine["trainer"]))


@pytest.mark.parametrize("nproc,args", [(1, []), (2, ["--tp", "2"]), (2, ["--pp", "2"])])
def test_engine_logprobs_equal_trainer_logprobs_after_sync(servers, tmp_path, nproc, args):
    res = _run(tmp_path, nproc, servers[:1], args)
    (engine,) = res["engines"].values()
    assert _max_gap(engine) < 1e-4
    assert engine["engine_version"] == "3"


@pytest.mark.parametrize("engine_tp", [1, 2])
def test_colocated_sync_by_handle_reaches_every_engine(servers, tmp_path, engine_tp):
    urls = servers[: 2 // engine_tp]
    res = _run(tmp_path, 2, urls, ["--tp", "2", "--mode", "colocated", "--engine-tp", str(engine_tp)])
    assert res["report"]["ok"] == [True, True]
    assert len(res["engines"]) == len(urls)
    for engine in res["engines"].values():
        assert _max_gap(engine) < 1e-4 and engine["engine_version"] == "3"


def test_wrong_mapping_is_caught(servers, tmp_path):
    res = _run(tmp_path, 1, servers[:1], ["--corrupt"])
    (engine,) = res["engines"].values()
    assert _max_gap(engine) > 1e-2


def test_engine_killed_before_a_push_is_reported_and_the_rest_sync(model_dir, tmp_path):
    with CpuServer(model_dir) as live, CpuServer(model_dir) as doomed:
        (pid,) = tiny.cpu_server_pids(doomed.rsplit(":", 1)[1])
        res = _run(tmp_path, 2, [live, doomed], ["--tp", "2", "--kill-pid", str(pid)])
    assert "broadcast to the engines failed" in res["report"]["failed"]
    assert res["report"]["live"] == [live] and res["report"]["second_failed"] is None
    assert _max_gap(res["engines"][live]) < 1e-4


def test_colocated_layout_errors_name_the_fix():
    with pytest.raises(ValueError, match="set engine.num_engines=4"):
        check_colocated_layout(4, 2, 1)
    with pytest.raises(ValueError, match="engine.engine_tp=3 must divide the trainer world size 4"):
        check_colocated_layout(4, 1, 3)
    check_colocated_layout(4, 2, 2)
