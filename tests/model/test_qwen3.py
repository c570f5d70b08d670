"""Qwen3 dense models: megatron logits equal transformers' Qwen3ForCausalLM under TP=1 and
TP=2 (explicit head_dim != hidden/heads, q/k RMSNorm, no qkv bias, tied and untied), and the
one mapping round-trips every Qwen3 tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_qae.model import qwen2_mapping as qm
from testsupport import tiny
from testsupport.jobs import torchrun_jobs

WORKER = tiny.ROOT / "tests" / "dist_workers" / "logits_worker.py"


QWEN3_CASES = [(1, False), (2, False), (2, True)]


@pytest.fixture(scope="module")
def logits(tmp_path_factory) -> Path:
    """Every logits comparison of this module: one launch per world size (testsupport/jobs.py)."""
    out = tmp_path_factory.mktemp("logits")
    jobs = {1: [], 2: [["--family", "qwen2", "--tp", "2", "--out", str(out / "qwen2-tp2.pt")]]}
    for tp, tied in QWEN3_CASES:
        jobs[tp].append(["--family", "qwen3", "--tp", str(tp), "--out", str(out / f"qwen3-tp{tp}-{tied}.pt"),
                         *(["--tied"] if tied else [])])
    for nproc, argvs in jobs.items():
        torchrun_jobs(WORKER, nproc, argvs)
    return out


@pytest.mark.parametrize("tp,tied", QWEN3_CASES)
def test_megatron_logits_equal_transformers_qwen3(logits, tp, tied):
    r = torch.load(logits / f"qwen3-tp{tp}-{tied}.pt")
    assert r["ours"].shape == r["theirs"].shape == (1, 12, 64)
    assert (r["ours"] - r["theirs"]).abs().max().item() < 1e-5
    # The model really has Qwen3's attention: per-head q/k norms, no qkv bias.
    assert any(n.endswith("self_attention.q_layernorm.weight") for n in r["names"])
    assert not any(n.endswith("linear_qkv.bias") for n in r["names"])


def test_qwen2_parity_control_still_holds(logits):
    r = torch.load(logits / "qwen2-tp2.pt")
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


def test_two_steps_end_to_end_on_a_tiny_qwen3(tmp_path):
    """torchrun TP=2 + Ray + a CPU engine on a Qwen3 model: the engine samples with exactly the
    trainer's weights (q/k norms included) after every push."""
    import json

    from megatron_qae.persistence.metrics import read_metrics
    from rollout_sglang import demo_task

    model_dir = demo_task.write_demo_model_dir(tmp_path / "model", seed=0)
    hf = json.loads((model_dir / "config.json").read_text())
    hf.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32, attention_bias=False)
    (model_dir / "config.json").write_text(json.dumps(hf))
    run_dir = tmp_path / "run"
    tiny.train_run(run_dir, 2, ["run.num_rollout_steps=2", "parallel.tp=2"], model_dir=model_dir)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["sync/engine_version_min"] == r["sync/engine_version_max"] == r["step"]
        assert r["train/logprob_gap_rollout"] < 1e-4
