"""bf16 params with the distributed optimizer (DP=2): weights loaded from HF safetensors, or
from the model-only checkpoint converted from them, survive the first optimizer step, which
moves each element by at most the learning rate (Adam's first update is lr * g / |g|)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_qae.model import qwen2_mapping as qm
from testsupport import tiny
from testsupport.jobs import torchrun_jobs

WORKER = tiny.ROOT / "tests" / "dist_workers" / "train_worker.py"
LR = 1e-2


def _loaded(hf_dir, hf: dict) -> dict[str, torch.Tensor]:
    """The safetensors' tensors under megatron names, read here without our loader."""
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    return {name: qm.hf_to_megatron(name, state, hf) for name in qm.megatron_names(hf)}


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory) -> tuple[Path, dict]:
    """One bf16 DP=2 step from the HF dir and one from its converted model-only checkpoint, in
    one launch (testsupport/jobs.py)."""
    tmp = tmp_path_factory.mktemp("bf16")
    hf = tiny.tiny_hf_config()
    hf_dir = tmp / "hf"
    tiny.tiny_hf_model(hf, seed=3).to(torch.bfloat16).save_pretrained(hf_dir)
    ckpt = tmp / "ckpt"
    subprocess.run([sys.executable, "-m", "tools.convert_checkpoint", "hf-to-mcore", "--hf-dir", str(hf_dir),
                    "--out", str(ckpt)], cwd=tiny.ROOT, check=True, capture_output=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tiny.ROOT)})
    loads = {"hf": ["--hf-dir", str(hf_dir)], "model_only_checkpoint": ["--ckpt-dir", str(ckpt)]}
    torchrun_jobs(WORKER, 2, [["--bf16", "--dist-opt", *load, "--mini-steps", "1", "--lr", str(LR),
                               "--max-tokens", "64", "--out", str(tmp / source)] for source, load in loads.items()])
    return hf_dir, {source: torch.load(tmp / f"{source}.mt64.pp0.pt", weights_only=False) for source in loads}


@pytest.mark.parametrize("source", ["hf", "model_only_checkpoint"])
def test_bf16_distributed_optimizer_keeps_the_loaded_weights(bf16_runs, source):
    hf = tiny.tiny_hf_config()
    hf_dir, results = bf16_runs
    res = results[source]
    loaded = _loaded(hf_dir, hf)
    before, after = res["history"][0]["params"], res["params"]
    assert before.keys() == after.keys() == loaded.keys()
    moved = 0.0
    for name, want in loaded.items():
        assert before[name].dtype == after[name].dtype == torch.bfloat16
        assert torch.equal(before[name], want), name
        step = (after[name].double() - want.double()).abs()
        # One Adam step moves by lr at most; bf16 rounding of the result adds half an ulp
        # (2^-8 relative) of the new value.
        bound = LR * (1 + 1e-3) + after[name].double().abs() * 2.0**-8 + 1e-12
        assert (step <= bound).all(), (name, float((step - bound).max()))
        moved = max(moved, float(step.max()))
    assert moved > 0.5 * LR  # the step did update the loaded weights
