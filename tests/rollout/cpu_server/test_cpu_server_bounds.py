"""The CPU rollout server bounded like a production server: each out-of-bounds /generate is a
400 naming the field and the bound (and the server serves on); a request never waits without a
deadline (a pause, the model lock); pause with mode=abort aborts in-flight requests; SIGTERM
stops the server within seconds during a long generation; the weight-group rendezvous dials
only the trainer address it was given and gives up within seconds."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import requests

from testsupport.cpu_server import CpuServer, write_model_dir
from rollout_sglang.sglang.client import EngineError, SGLangClient
from testsupport import tiny

pytestmark = pytest.mark.faults
LONG = {"temperature": 1.0, "max_new_tokens": 120, "ignore_eos": True, "n": 1024}
"""A valid request that takes many seconds: 1024 sequences to the context's end."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # vocab 64, context (max_position_embeddings) 128
    return write_model_dir(tmp_path_factory.mktemp("bounds") / "model", tiny.tiny_hf_config(), seed=0)


@pytest.fixture(scope="module")
def url(model_dir):
    with CpuServer(model_dir, extra_args=("--lock-timeout-s", "3", "--weight-sync-timeout-s", "3")) as u:
        yield u


BAD = [
    ({"input_ids": [5, 9], "sampling_params": {"max_new_tokens": 10**9}},
     "sampling_params.max_new_tokens=1000000000: the prompt (2 tokens) + max_new_tokens must be <= "
     "the model's context length (128 tokens), so at most 126"),
    ({"input_ids": [5, 9], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens=-1: must be at least 0"),
    ({"input_ids": [5, 9], "sampling_params": {"n": 200000}}, "sampling_params.n=200000: must be in [1, 1024]"),
    ({"input_ids": [[5, 9]] * 600, "sampling_params": {"n": 2}},
     "input_ids x sampling_params.n = 1200 sequences: at most 1024 per request"),
    ({"input_ids": list(range(1, 60)) * 3}, "input_ids[0]: the input (177 tokens) is longer than the model's "
                                            "context length (128 tokens)"),
    ({"input_ids": [5, 64]}, "input_ids[0]: token id 64 is out of the vocabulary [0, 64)"),
    ({"input_ids": [5, -1]}, "token id -1 is out of the vocabulary"),
    ({"input_ids": [5, "x"]}, "input_ids[0]: token id 'x' is not an integer"),
    ({"input_ids": "hello"}, "input_ids: required, a list of token ids"),
    ({"input_ids": [5], "sampling_params": {"temperature": -0.5}},
     "sampling_params.temperature=-0.5: must be a non-negative finite number"),
    ({"input_ids": [5], "sampling_params": {"temperature": "hot"}}, "sampling_params.temperature='hot': must be a number"),
    ({"input_ids": [5], "sampling_params": {"top_p": 0}}, "sampling_params.top_p=0.0: must be in (0, 1]"),
    ({"input_ids": [5], "sampling_params": {"top_k": 0}}, "sampling_params.top_k=0: must be -1 (disabled) or at least 1"),
    ({"input_ids": [5], "sampling_params": {"max_new_tokens": 4, "min_new_tokens": 5}},
     "sampling_params.min_new_tokens=5: must be in [0, max_new_tokens=4]"),
    ({"input_ids": [5], "sampling_params": {"max_new_tokens": 2.5}}, "sampling_params.max_new_tokens=2.5: must be an integer"),
    ({"input_ids": [5], "sampling_params": {"stop_token_ids": [99]}},
     "sampling_params.stop_token_ids: token id 99 is out of the vocabulary [0, 64)"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m[:40] for _, m in BAD])
def test_out_of_bounds_request_is_a_400_naming_field_and_bound(url, body, message):
    resp = requests.post(f"{url}/generate", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    assert message in resp.json()["error"]["message"]


def test_body_over_the_limit_is_refused_before_it_is_read_and_the_server_serves_on(url):
    body = b'{"input_ids": [' + b"5, " * (6 * 1024 * 1024) + b'5]}'  # 18 MB > 16 MiB
    resp = requests.post(f"{url}/generate", data=body, headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == 400
    assert f"request body: {len(body)} bytes, at most {16 * 1024 * 1024} (--max-body-bytes)" in resp.json()["error"]["message"]
    out = SGLangClient(url, timeout_s=30).generate([[5, 9]], {"max_new_tokens": 3, "ignore_eos": True})
    assert len(out[0].output_ids) == 3


def test_a_paused_server_answers_503_within_the_lock_timeout(url):
    client = SGLangClient(url, timeout_s=60)
    client.pause_generation(mode="in_place")
    try:
        t0 = time.monotonic()
        with pytest.raises(EngineError) as err:
            client.generate([[5, 9]], {"max_new_tokens": 2})
        assert err.value.status == 503 and "--lock-timeout-s" in str(err.value)
        assert 2.5 < time.monotonic() - t0 < 20
    finally:
        client.continue_generation()
    assert client.generate([[5, 9]], {"max_new_tokens": 2})


def test_pause_with_abort_aborts_the_request_in_flight(url):
    client = SGLangClient(url, timeout_s=120)
    got: list = []
    worker = threading.Thread(target=lambda: got.append(client.generate([[5, 9]], LONG)))
    worker.start()
    time.sleep(2.0)
    t0 = time.monotonic()
    client.pause_generation(mode="abort")
    worker.join(timeout=60)
    aborted_in_s = time.monotonic() - t0
    client.continue_generation()
    assert got and len(got[0]) == 1024
    assert {o.finish_reason for o in got[0]} == {"abort"}
    assert all(len(o.output_ids) < 120 for o in got[0])
    assert aborted_in_s < 15


def test_rendezvous_dials_only_the_trainer_address_and_times_out_in_seconds(url):
    client = SGLangClient(url, timeout_s=60)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"master_address='10\.255\.255\.1' is not a trainer address this "
                                          r"server may dial .*--weight-sync-hosts 10\.255\.255\.1"):
        client.init_weights_update_group("10.255.255.1", 29999, 1, 2, "g")
    assert time.monotonic() - t0 < 5
    t0 = time.monotonic()  # an allowed address where no trainer listens: --weight-sync-timeout-s 3
    with pytest.raises(EngineError, match="init_weights_update_group failed"):
        client.init_weights_update_group("127.0.0.1", tiny.free_port(), 1, 2, "g")
    assert time.monotonic() - t0 < 20


def test_sigterm_during_a_long_generation_stops_the_server_within_seconds(model_dir):
    server = CpuServer(model_dir)
    url = server.__enter__()
    client = SGLangClient(url, timeout_s=300)
    worker = threading.Thread(target=lambda: _swallow(lambda: client.generate([[5, 9]], LONG)), daemon=True)
    worker.start()
    time.sleep(2.0)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=30)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert time.monotonic() - t0 < 12  # in-flight generation aborted; 10 s is the hard stop
    assert tiny.cpu_server_pids(str(server.port)) == []


def _swallow(call) -> None:
    try:
        call()
    except EngineError:
        pass
