"""The CPU rollout server: greedy output equals transformers' generate, log-probs equal an
independent recomputation, stop / length / n handling, pause / release endpoints, SGLang's
tensor update by shared memory, bad updates (and destroying a group not held) refused."""

from __future__ import annotations

import base64
import os
import pickle

import pytest
import torch

from testsupport.cpu_server import CpuServer, write_model_dir
from rollout_sglang.sglang.client import EngineError, SGLangClient
from rollout_sglang.sglang.tensor_payload import pack_bucket, serialize_named_tensors
from testsupport import tiny


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    hf = tiny.tiny_hf_config()
    model_dir = write_model_dir(tmp_path_factory.mktemp("srv") / "m", hf, seed=3)
    from transformers import Qwen2ForCausalLM

    with CpuServer(model_dir) as url:
        yield SGLangClient(url, timeout_s=60), Qwen2ForCausalLM.from_pretrained(model_dir).eval()


def _logprobs(model, prompt: list[int], out: list[int]) -> list[float]:
    ids = torch.tensor([prompt + out])
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(out)]


def test_greedy_equals_transformers_generate_and_logprobs_match(served):
    client, model = served
    prompts = [[5, 9, 11], [3, 4, 8, 20, 21]]
    outs = client.generate(prompts, {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True})
    for p, o in zip(prompts, outs):
        ref = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert o.output_ids == ref[0, len(p):].tolist()
        assert max(abs(a - b) for a, b in zip(o.output_logprobs, _logprobs(model, p, o.output_ids))) < 1e-5
        assert o.finish_reason == "length"


def test_sampled_logprobs_are_those_of_the_temperature_scaled_distribution(served):
    client, model = served
    out = client.generate([[7, 7, 1]], {"temperature": 0.7, "max_new_tokens": 8, "ignore_eos": True,
                                        "sampling_seed": 11})[0]
    ids = torch.tensor([[7, 7, 1] + out.output_ids])
    logp = torch.log_softmax(model(ids).logits[0].float() / 0.7, -1)
    ref = [logp[2 + i, t].item() for i, t in enumerate(out.output_ids)]
    assert max(abs(a - b) for a, b in zip(out.output_logprobs, ref)) < 1e-5
    again = client.generate([[7, 7, 1]], {"temperature": 0.7, "max_new_tokens": 8, "ignore_eos": True,
                                          "sampling_seed": 11})[0]
    assert again.output_ids == out.output_ids  # the per-request seed makes sampling reproducible


def test_stop_tokens_and_n_samples(served):
    client, model = served
    greedy = client.generate([[5, 9, 11]], {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True})[0]
    stop = greedy.output_ids[2]
    first = greedy.output_ids.index(stop)
    out = client.generate([[5, 9, 11]], {"temperature": 0.0, "max_new_tokens": 6, "stop_token_ids": [stop]})[0]
    assert out.output_ids == greedy.output_ids[: first + 1] and out.finish_reason == "stop"
    many = client.generate([[5, 9, 11]], {"temperature": 1.0, "max_new_tokens": 3, "n": 4, "ignore_eos": True})
    assert len(many) == 4 and all(len(o.output_ids) == 3 for o in many)


def _push(client: SGLangClient, named: list, version: str) -> None:
    """One colocated update inside a weight-update session, as the trainer sends it."""
    client.begin_weight_update()
    client.update_weights_from_tensor([serialize_named_tensors(named)], weight_version=version)
    client.end_weight_update()


def test_release_then_colocated_update_by_shared_memory(served):
    client, model = served
    client.release_memory_occupation(["weights", "kv_cache"])
    assert client.server_info()["released_tags"] == ["kv_cache", "weights"]
    with pytest.raises(EngineError, match="released"):
        client.generate([[1, 2]], {"max_new_tokens": 1})
    client.resume_memory_occupation(["weights"])
    # SGLang's update_weights_from_tensor payload from this (unrelated) process: tensors pass
    # as shared-memory handles, one entry per engine TP rank.
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    new = {n: p * 1.5 + 0.01 for n, p in original.items()}
    _push(client, pack_bucket(list(new.items())), "9")
    client.resume_memory_occupation(["kv_cache"])
    assert client.weight_version() == "9"
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(new[n])
    out = client.generate([[4, 6, 8]], {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True})[0]
    assert max(abs(a - b) for a, b in zip(out.output_logprobs, _logprobs(model, [4, 6, 8], out.output_ids))) < 1e-5
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(original[n])
    _push(client, list(original.items()), "0")
    out = client.generate([[4, 6, 8]], {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True})[0]
    assert max(abs(a - b) for a, b in zip(out.output_logprobs, _logprobs(model, [4, 6, 8], out.output_ids))) < 1e-5


def test_per_row_seeds_give_distinct_reproducible_samples(served):
    client, _ = served
    params = {"temperature": 1.0, "max_new_tokens": 8, "ignore_eos": True}
    rows = [[7, 7, 1]] * 4
    seeded = [{**params, "sampling_seed": s} for s in (1, 2, 3, 4)]
    first = [o.output_ids for o in client.generate(rows, seeded)]
    again = [o.output_ids for o in client.generate(rows, seeded)]
    assert first == again and len({tuple(o) for o in first}) == 4


def test_bad_weight_updates_are_refused_by_name(served):
    client, _ = served
    client.begin_weight_update()
    with pytest.raises(EngineError, match="refused posix.system"):
        client.update_weights_from_tensor([base64.b64encode(pickle.dumps([("x", os.system)])).decode()])
    with pytest.raises(EngineError, match="shape"):
        client.update_weights_from_tensor([serialize_named_tensors([("model.norm.weight", torch.ones(3))])])
    with pytest.raises(EngineError, match="load_format='flattened_bucket' is not supported"):
        client.update_weights_from_tensor(["x"], load_format="flattened_bucket")
    with pytest.raises(EngineError, match="Group missing not in"):
        client.update_weights_from_distributed(["model.norm.weight"], ["float32"], [[32]], "missing")
    client.end_weight_update()
    with pytest.raises(EngineError, match="The group to be destroyed does not exist") as unknown:
        client.destroy_weights_update_group("missing")
    assert unknown.value.status == 400 and client.server_info()["weight_update_groups"] == []
    client.pause_generation()
    client.continue_generation()
    assert client.health()


def test_start_up_as_sglang_health_and_ready_503_until_the_warmup_request(tmp_path):
    """SGLang serves its routes at once but counts as started only after its warmup request:
    /health and /ready answer 503 until then (http_server.py:714-736); /ready also while
    generation is paused. The server runs here in-process, its warmup called by hand."""
    import socket
    import threading

    import uvicorn

    from rollout_sglang.cpu_server.server import ServerState, build_app
    from rollout_sglang.cpu_server.startup import warm_up

    model_dir = write_model_dir(tmp_path / "m", tiny.tiny_hf_config(), seed=0)
    state = ServerState(str(model_dir), 0, api_key="k")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        client, anonymous = SGLangClient(url, timeout_s=30, api_key="k"), SGLangClient(url, timeout_s=30)
        while not anonymous.answers():
            pass  # uvicorn coming up
        with pytest.raises(EngineError) as starting:
            anonymous._request("GET", "/health")
        assert starting.value.status == 503 and not anonymous.ready()
        assert client.model_info()["model_path"] == str(model_dir)  # served while starting
        warm_up(url, state.api_key, state.started)
        assert anonymous.health() and anonymous.ready()  # neither needs the key
        client.pause_generation()
        assert anonymous.health() and not anonymous.ready()
        client.continue_generation()
        assert anonymous.ready()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
