"""Qwen3 dense models: megatron logits equal transformers' Qwen3ForCausalLM under TP=1 and
TP=2 (explicit head_dim != hidden/heads, q/k RMSNorm, no qkv bias, tied and untied), and the
one mapping round-trips every Qwen3 tensor."""

from __future__ import annotations

import pytest
import torch

from megatron_qae import qwen2_mapping as qm
from tests import tiny

WORKER = tiny.ROOT / "tests" / "dist_workers" / "logits_worker.py"


@pytest.mark.parametrize("tp,tied", [(1, False), (2, False), (2, True)])
def test_megatron_logits_equal_transformers_qwen3(tmp_path, tp, tied):
    out = tmp_path / "logits.pt"
    tiny.torchrun(WORKER, tp, ["--family", "qwen3", "--tp", str(tp), "--out", str(out)] + (["--tied"] if tied else []))
    r = torch.load(out)
    assert r["ours"].shape == r["theirs"].shape == (1, 12, 64)
    assert (r["ours"] - r["theirs"]).abs().max().item() < 1e-5
    # The model really has Qwen3's attention: per-head q/k norms, no qkv bias.
    assert any(n.endswith("self_attention.q_layernorm.weight") for n in r["names"])
    assert not any(n.endswith("linear_qkv.bias") for n in r["names"])


def test_qwen2_parity_control_still_holds(tmp_path):
    out = tmp_path / "logits.pt"
    tiny.torchrun(WORKER, 2, ["--family", "qwen2", "--tp", "2", "--out", str(out)])
    r = torch.load(out)
    assert (r["ours"] - r["theirs"]).abs().max().item() < 1e-5
    assert any(n.endswith("linear_qkv.bias") for n in r["names"])


@pytest.mark.parametrize("tied", [False, True])
def test_mapping_round_trips_every_qwen3_tensor(tied):
    hf = tiny.tiny_qwen3_config(tied=tied)
    state = tiny.tiny_hf_model(hf).state_dict()
    back = {}
    for name in qm.megatron_names(hf):
        back.update(qm.megatron_to_hf(name, qm.hf_to_megatron(name, state, hf), hf))
    expected = {k for k in state if not (tied and k == "lm_head.weight")}
    assert set(back) == expected
    assert all(torch.equal(back[k], state[k]) for k in expected)
