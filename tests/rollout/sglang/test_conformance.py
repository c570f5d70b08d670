"""Our CPU server against real SGLang 0.5.23: one scripted scenario through the client, run on
both servers, must give the same status codes and response shapes, refusals included
(updates outside a weight-update session, a second session, a session closed twice, an
unknown weight group (updated or destroyed), a request without the API key, removed routes,
/health and /ready without the key, /ready 503 while paused); then greedy generation
on both with the same fp32 weights gives the same tokens and log-probs; out-of-bounds /generate
bodies (max_new_tokens past the context, sampling parameters out of range or of the wrong
type) get SGLang's status from both; /abort_request of a request id stops that row the same
way on both (200, partial output, finish_reason "abort"), spares the others, and ignores ids
that are not live (a mere prefix of live ids included); malformed request ids get SGLang's 400.

The real server is `sglang.launch_server --device cpu` from .venv-sglang, started once for the
module by our own launcher.
"""

from __future__ import annotations

import time

import pytest
import torch

from rollout_sglang.sglang.client import EngineError, SGLangClient
from rollout_sglang.engines.engine import RolloutEngine
from rollout_sglang.sglang.tensor_payload import pack_bucket, serialize_named_tensors
from rollout_sglang.engines.watchdog import run_in_thread

from tests.rollout.sglang.conftest import KEY, reset_weights

# A real SGLang server starts in ~100 s (longer on a busy machine), inside the first test.
# One xdist worker runs the whole real-SGLang tier: never two ~3 GB servers at once.
pytestmark = [pytest.mark.timeout(1200), pytest.mark.xdist_group("real_sglang")]


@pytest.fixture(scope="module")
def model_dir(tier_model_dir):
    return tier_model_dir


@pytest.fixture(scope="module")
def urls(model_dir, real_server, tmp_path_factory):
    """Our CPU server and the tier's real SGLang server, both at the seed-0 weights and the
    version a server starts with ("default")."""
    logs = tmp_path_factory.mktemp("conf_logs")
    reset_weights(real_server.url(), model_dir, "default")
    cpu = RolloutEngine(str(model_dir), backend="cpu", port=32000, log_dir=str(logs), api_key=KEY)
    try:
        yield {"cpu": cpu.url(), "sglang": real_server.url()}
    finally:
        cpu.stop()


def _shape(body) -> object:
    """What a client may rely on in a reply: dict keys (and the success flag), list lengths
    and element shapes; not the free text of messages."""
    if isinstance(body, dict):
        return {k: (body[k] if k == "success" else _shape(body[k]) if isinstance(body[k], dict) else
                    type(body[k]).__name__) for k in sorted(body)}
    if isinstance(body, list):
        return [len(body)] + ([_shape(body[0])] if body else [])
    return type(body).__name__


def _step(record: list, name: str, call) -> object:
    try:
        body = call()
        record.append((name, 200, _shape(body)))
        return body
    except EngineError as exc:
        record.append((name, exc.status, _shape(exc.body)))
        return exc


def scenario(url: str, model_dir) -> list[tuple[str, int | None, object]]:
    """The script: every step's (name, HTTP status, reply shape)."""
    from transformers import Qwen2ForCausalLM

    client = SGLangClient(url, timeout_s=120, api_key=KEY)
    anonymous = SGLangClient(url, timeout_s=30)
    named = list(Qwen2ForCausalLM.from_pretrained(model_dir).state_dict().items())
    update = [serialize_named_tensors(pack_bucket(named))]
    rec: list = []
    assert client.check_version() == "0.5.23"
    assert client.weight_version() == "default"
    assert anonymous.health()  # /health needs no key
    _step(rec, "model_info without key", anonymous.model_info)
    _step(rec, "generate without key", lambda: anonymous.generate([[1, 2]], {"max_new_tokens": 1}))
    _step(rec, "removed /get_weight_version", lambda: client._request("GET", "/get_weight_version"))
    _step(rec, "tensor update outside a session", lambda: client.update_weights_from_tensor(update, weight_version="1"))
    _step(rec, "distributed update outside a session", lambda: client.update_weights_from_distributed(
        ["model.norm.weight"], ["float32"], [[32]], "weight_update_group"))
    _step(rec, "destroy an unknown weight group", lambda: client.destroy_weights_update_group("no_such_group"))
    _step(rec, "end without begin", client.end_weight_update)
    _step(rec, "begin", client.begin_weight_update)
    _step(rec, "begin twice", client.begin_weight_update)
    _step(rec, "distributed update, unknown group", lambda: client.update_weights_from_distributed(
        ["model.norm.weight"], ["float32"], [[32]], "no_such_group"))
    _step(rec, "tensor update in the session", lambda: client.update_weights_from_tensor(update, weight_version="1"))
    _step(rec, "end", client.end_weight_update)
    assert client.weight_version() == "1"
    seeded = [{"temperature": 1.0, "max_new_tokens": 3, "ignore_eos": True, "sampling_seed": s} for s in (1, 2)]
    _step(rec, "generate, params per row", lambda: client._request("POST", "/generate", {
        "input_ids": [[5, 9, 11], [5, 9, 11]], "sampling_params": seeded, "return_logprob": True,
        "logprob_start_len": -1}))
    _step(rec, "generate, n=2", lambda: client.generate([[5, 9, 11], [3, 4]], {"max_new_tokens": 2, "n": 2}))
    # Health and readiness need no key; /ready is 503 while generation is paused, /health not.
    _step(rec, "health", lambda: anonymous._request("GET", "/health"))
    _step(rec, "ready", lambda: anonymous._request("GET", "/ready"))
    client.pause_generation()
    _step(rec, "ready while paused", lambda: anonymous._request("GET", "/ready"))
    _step(rec, "health while paused", lambda: anonymous._request("GET", "/health"))
    client.continue_generation()
    _step(rec, "ready after continue", lambda: anonymous._request("GET", "/ready"))
    return rec


def _keys_the_client_reads(rec) -> list:
    """Generate replies carry many fields on SGLang; the client reads these."""
    out = []
    for name, status, shape in rec:
        if name == "generate, params per row":
            n, item = shape
            read = {"output_ids": item["output_ids"],
                    "meta_info": {k: item["meta_info"][k] for k in
                                  ("finish_reason", "output_token_logprobs", "weight_version")}}
            shape = [n, read]
        out.append((name, status, shape))
    return out


def test_cpu_server_answers_the_scenario_as_sglang_does(urls, model_dir):
    real = _keys_the_client_reads(scenario(urls["sglang"], model_dir))
    cpu = _keys_the_client_reads(scenario(urls["cpu"], model_dir))
    for expected, got in zip(real, cpu):
        assert got == expected, f"CPU server differs from SGLang at {expected[0]!r}: {got} != {expected}"
    assert len(real) == len(cpu)
    statuses = {name: status for name, status, _ in real}
    assert statuses["tensor update outside a session"] == 400  # the refusal the issue is about
    assert statuses["model_info without key"] == 401 and statuses["removed /get_weight_version"] == 404
    assert statuses["ready while paused"] == 503 and statuses["health while paused"] == 200


def test_same_weights_same_greedy_tokens_and_logprobs(urls):
    prompts = [[5, 9, 11], [3, 4, 8, 20, 21]]
    params = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}
    outs = {k: SGLangClient(u, timeout_s=120, api_key=KEY).generate(prompts, params) for k, u in urls.items()}
    for real, cpu in zip(outs["sglang"], outs["cpu"]):
        assert real.output_ids == cpu.output_ids
        assert max(abs(a - b) for a, b in zip(real.output_logprobs, cpu.output_logprobs)) < 1e-4
        assert torch.isfinite(torch.tensor(real.output_logprobs)).all()


REFUSED = {
    "max_new_tokens past the context": {"input_ids": [5, 9], "sampling_params": {"max_new_tokens": 10**9}},
    "negative max_new_tokens": {"input_ids": [5, 9], "sampling_params": {"max_new_tokens": -1}},
    "prompt longer than the context": {"input_ids": list(range(1, 60)) * 3, "sampling_params": {"max_new_tokens": 1}},
    "negative temperature": {"input_ids": [5], "sampling_params": {"temperature": -0.5, "max_new_tokens": 1}},
    "top_p 0": {"input_ids": [5], "sampling_params": {"top_p": 0.0, "max_new_tokens": 1}},
    "top_k 0": {"input_ids": [5], "sampling_params": {"top_k": 0, "max_new_tokens": 1}},
    "min_new_tokens past max_new_tokens": {"input_ids": [5], "sampling_params": {"max_new_tokens": 2, "min_new_tokens": 3}},
    "temperature of the wrong type": {"input_ids": [5], "sampling_params": {"temperature": "hot", "max_new_tokens": 1}},
}
"""Out-of-bounds /generate bodies both servers must refuse with the same status (tiny model:
context 128 tokens)."""


def test_out_of_bounds_generate_gets_sglangs_status(urls):
    for name, body in REFUSED.items():
        got = {k: SGLangClient(u, timeout_s=60, api_key=KEY)._session.post(f"{u}/generate", json=body, timeout=60)
               for k, u in urls.items()}
        assert got["sglang"].status_code == 400, (name, got["sglang"].text)
        assert got["cpu"].status_code == got["sglang"].status_code, (name, got["cpu"].text)
    # Both serve on after the refusals.
    for u in urls.values():
        assert SGLangClient(u, timeout_s=60, api_key=KEY).generate([[5, 9]], {"max_new_tokens": 2})


def _abort_while_running(url: str) -> dict:
    """A request of 4 rows (ids "conf-abort.i") and one of 1 row ("conf-keep.0") sent together;
    the 4 ids are aborted (every 10 ms until their request answers, so an abort meets each row
    queued or running); what each request answered."""
    client = SGLangClient(url, timeout_s=120, api_key=KEY)
    params = {"temperature": 1.0, "max_new_tokens": 120, "ignore_eos": True}
    body = {"input_ids": [[5, 9, 11]] * 4, "sampling_params": params, "return_logprob": True,
            "logprob_start_len": -1, "rid": [f"conf-abort.{i}" for i in range(4)]}
    keep = {**body, "input_ids": [[5, 9, 11]], "rid": ["conf-keep.0"]}
    post = SGLangClient(url, timeout_s=120, api_key=KEY)
    aborted = run_in_thread(lambda: post._session.post(f"{url}/generate", json=body, timeout=120))
    other = SGLangClient(url, api_key=KEY)
    kept = run_in_thread(lambda: other._session.post(f"{url}/generate", json=keep, timeout=120))
    replies = []
    while not aborted.done():
        for i in range(4):
            replies.append(client._session.post(f"{url}/abort_request", json={"rid": f"conf-abort.{i}"}, timeout=30))
        time.sleep(0.01)
    return {"aborted": aborted.result(), "kept": kept.result(), "abort_replies": replies}


def test_abort_request_as_sglang_does(urls):
    got = {k: _abort_while_running(u) for k, u in urls.items()}
    for server, r in got.items():
        assert {(a.status_code, a.content) for a in r["abort_replies"]} == {(200, b"")}, server
        assert r["aborted"].status_code == 200 and r["kept"].status_code == 200, server
        rows = r["aborted"].json()
        assert len(rows) == 4, server
        for row in rows:
            reason = row["meta_info"]["finish_reason"]
            assert reason["type"] == "abort", (server, reason)
            # Running when aborted: SGLang's FINISH_ABORT; still queued: its tokenizer's reply.
            assert reason in ({"type": "abort", "message": "Aborted", "status_code": None, "err_type": None},
                              {"type": "abort", "message": "Abort in waiting queue"}), (server, reason)
            assert len(row["output_ids"]) < 120
            assert len(row["meta_info"]["output_token_logprobs"]) == len(row["output_ids"]), server
        (kept,) = r["kept"].json()  # the other request runs on
        assert kept["meta_info"]["finish_reason"] == {"type": "length", "length": 120}, server
        assert len(kept["output_ids"]) == 120
    # Aborts that match no live id are ignored: an unknown id, an empty id without abort_all,
    # and a mere prefix of live ids (SGLang's tokenizer manager looks the id up exactly).
    for u in urls.values():
        s = SGLangClient(u, api_key=KEY)._session
        for body in ({"rid": "no-such-request"}, {}, {"rid": ""}):
            reply = s.post(f"{u}/abort_request", json=body, timeout=30)
            assert (reply.status_code, reply.content) == (200, b""), (u, body)
        params = {"temperature": 1.0, "max_new_tokens": 60, "ignore_eos": True}
        body = {"input_ids": [[5, 9, 11]] * 2, "sampling_params": params, "rid": ["conf-prefix.0", "conf-prefix.1"]}
        sender = SGLangClient(u, api_key=KEY)._session
        running = run_in_thread(lambda: sender.post(f"{u}/generate", json=body, timeout=120))
        while not running.done():
            s.post(f"{u}/abort_request", json={"rid": "conf-prefix."}, timeout=30)
            time.sleep(0.01)
        assert [row["meta_info"]["finish_reason"]["type"] for row in running.result().json()] == ["length"] * 2, u


def test_generate_request_ids_are_checked_as_sglang_does(urls):
    bodies = {"duplicate ids": ["x", "x"], "one id too few": ["x"]}
    for name, rid in bodies.items():
        body = {"input_ids": [[5, 9], [5, 9]], "sampling_params": {"max_new_tokens": 1}, "rid": rid}
        status = {k: SGLangClient(u, api_key=KEY)._session.post(f"{u}/generate", json=body, timeout=60).status_code
                  for k, u in urls.items()}
        assert status["cpu"] == status["sglang"] == 400, (name, status)
