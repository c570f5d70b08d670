"""SGLangClient against hand-built SGLang 0.5 responses (mocked transport: client unit test)."""

from __future__ import annotations

import json

import pytest
import requests

from rollout_sglang.sglang.client import EngineError, SGLangClient


class _Resp:
    def __init__(self, status: int, body) -> None:
        self.status_code = status
        self.content = json.dumps(body).encode() if body is not None else b""
        self.text = self.content.decode()

    def json(self):
        return json.loads(self.content)


@pytest.fixture
def calls(monkeypatch):
    log: list[tuple[str, str, dict]] = []
    replies: dict[str, _Resp] = {}

    def request(self, method, url, json=None, timeout=None):
        log.append((method, url, json))
        endpoint = url.split(":1234", 1)[1]
        if endpoint not in replies:
            raise requests.ConnectionError("refused")
        return replies[endpoint]

    monkeypatch.setattr(requests.Session, "request", request)
    return log, replies


def test_generate_sends_token_ids_and_parses_logprob_triples(calls):
    log, replies = calls
    replies["/generate"] = _Resp(200, [
        {"text": "", "meta_info": {"finish_reason": {"type": "stop", "matched": 2},
                                   "output_token_logprobs": [[-0.5, 7, None], [-1.25, 2, None]],
                                   "completion_tokens": 2, "weight_version": "4"}},
        {"text": "", "output_ids": [9], "meta_info": {"finish_reason": {"type": "length"},
                                                       "output_token_logprobs": [[-3.0, 9, None]]}},
    ])
    out = SGLangClient("http://h:1234").generate([[1, 2], [3]], {"max_new_tokens": 2, "temperature": 1.0})
    method, url, body = log[0]
    assert (method, url) == ("POST", "http://h:1234/generate")
    assert body["input_ids"] == [[1, 2], [3]] and body["return_logprob"] is True
    assert body["sampling_params"] == {"max_new_tokens": 2, "temperature": 1.0}
    assert out[0].output_ids == [7, 2] and out[0].output_logprobs == [-0.5, -1.25]
    assert out[0].finish_reason == "stop" and out[0].weight_version == "4"
    assert out[1].output_ids == [9] and out[1].finish_reason == "length" and out[1].weight_version is None


def test_weight_update_requests_use_sglang_field_names(calls):
    log, replies = calls
    replies["/init_weights_update_group"] = _Resp(200, {"success": True, "message": "ok"})
    replies["/update_weights_from_distributed"] = _Resp(200, {"success": True, "message": "ok"})
    c = SGLangClient("http://h:1234")
    c.init_weights_update_group("10.0.0.1", 29600, 1, 3, "g", "nccl")
    c.update_weights_from_distributed(["a.weight"], ["bfloat16"], [[2, 3]], "g", True, "7")
    assert log[0][2] == {"master_address": "10.0.0.1", "master_port": 29600, "rank_offset": 1,
                         "world_size": 3, "group_name": "g", "backend": "nccl"}
    assert log[1][2] == {"names": ["a.weight"], "dtypes": ["bfloat16"], "shapes": [[2, 3]],
                         "group_name": "g", "flush_cache": True, "weight_version": "7"}


def test_refusals_and_http_errors_name_the_endpoint(calls):
    _, replies = calls
    replies["/update_weights_from_distributed"] = _Resp(200, {"success": False, "message": "bad shape"})
    replies["/generate"] = _Resp(500, {"error": "boom"})
    c = SGLangClient("http://h:1234")
    with pytest.raises(EngineError, match="update_weights_from_distributed refused: bad shape"):
        c.update_weights_from_distributed(["x"], ["float32"], [[1]], "g")
    with pytest.raises(EngineError, match=r"/generate -> HTTP 500"):
        c.generate([[1]], {})
    with pytest.raises(EngineError, match="health|failed"):
        c.flush_cache()  # no reply registered: connection refused
    assert c.health() is False


def test_server_versions_outside_the_supported_range_are_named():
    from rollout_sglang.sglang.client import check_supported_version

    check_supported_version("0.5.23", "http://h:1234")
    check_supported_version("0.5.21.post1", "http://h:1234")
    for old_or_new in ("0.5.20", "0.4.9", "0.6.0"):
        with pytest.raises(EngineError, match=rf"runs SGLang {old_or_new}; .*>=0\.5\.21,<0\.6\.0"):
            check_supported_version(old_or_new, "http://h:1234")


def test_api_key_goes_in_every_request(calls, monkeypatch):
    seen = []
    original = requests.Session.request

    def request(self, method, url, json=None, timeout=None):
        seen.append(self.headers.get("Authorization"))
        return original(self, method, url, json=json, timeout=timeout)

    monkeypatch.setattr(requests.Session, "request", request)
    _, replies = calls
    replies["/model_info"] = _Resp(200, {"weight_version": "default"})
    assert SGLangClient("http://h:1234", api_key="k1").weight_version() == "default"
    assert seen == ["Bearer k1"]
