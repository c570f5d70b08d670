"""One real SGLang server for the whole real-SGLang tier of this folder (conformance and the
real-server tests): it starts in ~100 s and takes ~3 GB, so the modules share it. It serves the
tiny model's seed-0 weights; each module's fixture puts it back at those weights (and a
weight version of its choosing) before its tests, so no module passes on what another pushed."""

from __future__ import annotations

import pytest

from rollout_sglang.sglang.client import SGLangClient
from rollout_sglang.sglang.tensor_payload import serialize_named_tensors
from testsupport import tiny
from testsupport.cpu_server import write_model_dir
from testsupport.sglang_server import real_sglang

KEY = "tier-key"
"""The API key of the tier's servers (ours and SGLang)."""


@pytest.fixture(scope="session")
def tier_model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("tier") / "model", tiny.tiny_hf_config(), seed=0)


@pytest.fixture(scope="session")
def real_server(tier_model_dir, tmp_path_factory):
    with real_sglang(tier_model_dir, tmp_path_factory.mktemp("real_logs"), api_key=KEY) as engine:
        yield engine


def reset_weights(url: str, model_dir, version: str) -> None:
    """The server at `url` back at `model_dir`'s weights, tagged `version`."""
    from transformers import Qwen2ForCausalLM

    client = SGLangClient(url, timeout_s=120, api_key=KEY)
    state = list(Qwen2ForCausalLM.from_pretrained(model_dir).state_dict().items())
    client.begin_weight_update()
    client.update_weights_from_tensor([serialize_named_tensors(state)], weight_version=version)
    client.end_weight_update()
    assert client.weight_version() == version
