"""The supervised warm start: its loss is transformers' token-mean cross-entropy of the same
weights, and one process and two data-parallel ranks take the same steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from testsupport.tiny import ROOT, free_port
from rollout_sglang import demo_task


def _sft(out, model_dir, data, nproc: int, steps: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
              f"--master_port={free_port()}", "-m"] if nproc > 1 else [sys.executable, "-m"]
    proc = subprocess.run([*launch, "megatron_qae.sft", "--config", "configs/demo.yaml", "--steps", str(steps),
                           "--batch-prompts", "100", "--lr", "3e-3", "--out", str(out), f"model.path={model_dir}",
                           f"data.train_path={data}", f"run.run_dir={out}", "train.micro_batch_max_tokens=200"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "sft_metrics.json").read_text())


def _nll(model, tok) -> float:
    """Token-mean NLL of answer + end token over every padded sum, by transformers."""
    rows = [tok(q + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for q, a in demo_task.problems()]
    ids = torch.tensor(rows)
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        return float(model(input_ids=ids, labels=labels).loss)


@pytest.mark.timeout(1200)
def test_sft_loss_is_the_cross_entropy_and_dp2_takes_the_same_steps(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

    model_dir = demo_task.write_demo_model_dir(tmp_path / "hf", seed=0)
    torch.manual_seed(0)
    start = Qwen2ForCausalLM(AutoConfig.from_pretrained(model_dir)).eval()
    start.save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data, _ = demo_task.write_demo_data(tmp_path / "data")
    one = _sft(tmp_path / "one", model_dir, data, 1, 3)
    # Step 1's loss is taken before its update: the starting weights' cross-entropy.
    assert one[0]["sft/nll"] == pytest.approx(_nll(start, tok), abs=1e-5)
    # The exported model is the weights after the last update: lower loss than the last step's.
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "hf").eval()
    assert _nll(trained, tok) < one[-1]["sft/nll"] < one[0]["sft/nll"]
    two = _sft(tmp_path / "two", model_dir, data, 2, 3)  # dp=2: each rank half the batch
    for a, b in zip(one, two):
        assert b["sft/nll"] == pytest.approx(a["sft/nll"], abs=1e-5)
        assert b["sft/grad_norm"] == pytest.approx(a["sft/grad_norm"], rel=1e-4)
