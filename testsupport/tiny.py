"""Tiny Qwen2-architecture models and synthetic RL samples shared by the tests."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from rollout_sglang.types import Group, Prompt, RolloutBatch, Sample

ROOT = Path(__file__).resolve().parents[1]


def tiny_hf_config(tied: bool = False, layers: int = 2, vocab: int = 64) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 32,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "hidden_act": "silu",
        "initializer_range": 0.02,
    }


def tiny_qwen3_config(tied: bool = False, layers: int = 2, vocab: int = 64) -> dict:
    """Qwen3 dense: no qkv bias, q/k RMSNorm per head, and a head_dim (16) that is not
    hidden_size / heads (8), as in the real Qwen3 models."""
    hf = tiny_hf_config(tied=tied, layers=layers, vocab=vocab)
    hf.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=16, attention_bias=False)
    return hf


def tiny_hf_model(hf: dict, seed: int = 0):
    """A transformers Qwen2ForCausalLM / Qwen3ForCausalLM (by model_type) with random weights,
    biases and norms non-trivial."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items()
                                                       if k not in ("architectures", "model_type")})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def synthetic_samples(n: int = 12, vocab: int = 64, seed: int = 0) -> tuple[list[Sample], list[float]]:
    """Samples of varied lengths (group size 4) and advantages with many exact zeros."""
    g = torch.Generator().manual_seed(seed)
    samples, advs = [], []
    for i in range(n):
        p = int(torch.randint(3, 9, (1,), generator=g))
        r = int(torch.randint(2, 12, (1,), generator=g))
        ids = torch.randint(1, vocab, (p + r,), generator=g).tolist()
        lps = (-torch.rand(r, generator=g) * 3).tolist()
        samples.append(Sample(i // 4, tuple(ids[:p]), tuple(ids[p:]), tuple(lps), "stop",
                              1.0 if i % 3 == 0 else -1.0, float(i % 3 == 0), 0))
        advs.append([0.0, 1.5, -0.7, 0.0, 0.0, 2.0][i % 6])
    return samples, advs


def old_logprob_noise(mb) -> torch.Tensor:
    """Deterministic per-(sample, position in its sequence) offsets so ratios differ from 1 and
    clipping acts; the same values for a sample in a padded row or in a packed one."""
    if mb.cu_seqlens is None:
        index = torch.tensor(mb.sample_index or [0], dtype=torch.float64)[:, None].expand(mb.tokens.shape)
    else:  # packed: the tail after the last sample gets index -1 (its loss mask is 0)
        lengths = (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).long()
        ids = torch.tensor(mb.sample_index + [-1] * (lengths.numel() - len(mb.sample_index)), dtype=torch.float64)
        index = torch.repeat_interleave(ids, lengths)[None]
    noise = torch.sin(31.0 * index + 7.0 * mb.position_ids.double()) * 0.4
    return noise.float() * mb.loss_mask


def run_config(tp: int = 1, pp: int = 1, dist_opt: bool = False, lr: float = 1e-2) -> SimpleNamespace:
    """The attributes of the run config that build_policy reads."""
    model = SimpleNamespace(params_dtype="float32", fp8=None, fp8_recipe="tensorwise",
                            transformer_impl="local", recompute_granularity=None,
                            recompute_method=None, recompute_num_layers=None,
                            transformer_overrides={})
    parallel = SimpleNamespace(tp=tp, pp=pp, vpp=None, cp=1, sequence_parallel=False,
                               use_distributed_optimizer=dist_opt, ddp_overrides={})
    optim = SimpleNamespace(lr=lr, min_lr=0.0, warmup_steps=0, lr_decay_style="constant",
                            weight_decay=0.0, clip_grad=1.0, adam_beta1=0.9, adam_beta2=0.999,
                            adam_eps=1e-8, optimizer_overrides={})
    return SimpleNamespace(model=model, parallel=parallel, optim=optim)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_logged(cmd: list[str], env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    """Run `cmd` with stdout / stderr in temp files, not pipes: helpers the job leaves behind
    (torch_shm_manager lives as long as a server still maps the job's shared memory) inherit
    the job's output and would keep a pipe open past its exit."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=err, text=True, timeout=timeout_s,
                              cwd=ROOT, start_new_session=True)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def torchrun(script: Path, nproc: int, args: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `nproc` gloo ranks; raise with its output on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(script), *args]
    proc = run_logged(cmd, env, timeout_s)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def cpu_server_pids(arg: str) -> list[int]:
    """Process ids of running CPU rollout servers whose command line has `arg` as one argument
    (a port, a model directory)."""
    import psutil

    return sorted(p.pid for p in psutil.process_iter(["cmdline"])
                  if "rollout_sglang.cpu_server.server" in (p.info["cmdline"] or [])
                  and arg in (p.info["cmdline"] or []))


def train_run(run_dir: Path, nproc: int, overrides: list[str], timeout_s: float = 420,
              model_dir: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m megatron_qae.train` under torchrun with `nproc` ranks on the demo task (test
    config, local Ray, CPU engines); raises with its output when the run fails."""
    from rollout_sglang import demo_task

    model_dir = model_dir or demo_task.write_demo_model_dir(run_dir.parent / "model", seed=0)
    train_path, val_path = demo_task.write_demo_data(run_dir.parent / "data", seed=0, task="single_digit")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "megatron_qae.train",
           "--config", "configs/test_tiny.yaml", f"run.run_dir={run_dir}", f"model.path={model_dir}",
           f"data.train_path={train_path}", f"data.val_path={val_path}", *overrides]
    proc = run_logged(cmd, env, timeout_s)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def synthetic_batch(prompts: int, n: int, prompt_tokens: int, max_response: int, seed: int = 0) -> RolloutBatch:
    """A rollout batch of `prompts` groups of `n` samples, responses of random length up to
    `max_response` over a Qwen-sized vocabulary (the hand-off tests and benchmark)."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for gid in range(prompts):
        samples = []
        for _ in range(n):
            r = int(torch.randint(max_response // 10, max_response + 1, (1,), generator=g))
            ids = torch.randint(1, 150_000, (prompt_tokens + r,), generator=g).tolist()
            acc = float(torch.rand(1, generator=g) < 0.5)
            samples.append(Sample(gid, tuple(ids[:prompt_tokens]), tuple(ids[prompt_tokens:]),
                                  tuple((-torch.rand(r, generator=g)).tolist()), "stop", 2 * acc - 1, acc, 0))
        prompt = Prompt(gid, samples[0].prompt_ids, "42", "Q" * 400)
        groups.append(Group(gid, prompt, tuple(samples)))
    return RolloutBatch(groups, 0, {"rollout/accuracy_all": 0.5})
