"""The dry-run planner: parameter counts against transformers and megatron, memory arithmetic
against hand-derived numbers, the shipped configs fit, impossible layouts fail naming the
shortfall in GiB."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import subprocess
import sys

import pytest

from megatron_qae.config.loading import load_config
from megatron_qae.model.build import load_hf_config
from megatron_qae.plan import (
    GIB,
    ModelShape,
    activation_bytes,
    count_parameters,
    engine_memory,
    save_host_bytes,
    stage_parameters,
    trainer_memory,
)
from megatron_qae.plan import main as plan_main
from testsupport import tiny

HF = {name: load_hf_config(tiny.ROOT / "configs" / "hf" / name)
      for name in ("qwen2.5-32b", "qwen2.5-7b", "qwen2.5-1.5b", "qwen3-8b-base", "qwen3-14b-base")}


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m megatron_qae.plan` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "megatron_qae.plan", *args], cwd=tiny.ROOT,
                          capture_output=True, text=True, timeout=120)


def _plan(*args: str) -> subprocess.CompletedProcess:
    """The planner's `main` in this process, its output and exit status as the CLI gives them
    (one megatron-core import for the module, not one per call: each CLI start imports it
    again, about 7 s of CPU on the 2-core test machine). Its logging setup is undone after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                plan_main(list(args))
                status = 0
            except SystemExit as stop:
                status = stop.code if isinstance(stop.code, int) else 1
    finally:
        root.handlers, root.level = handlers, level
        logging.captureWarnings(False)
    return subprocess.CompletedProcess(["megatron_qae.plan", *args], status, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_formula_matches_transformers(tied, family):
    make = tiny.tiny_qwen3_config if family == "qwen3" else tiny.tiny_hf_config
    hf = make(tied=tied, layers=3)
    model = tiny.tiny_hf_model(hf)
    assert count_parameters(hf) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,published", [("qwen2.5-32b", 32.76), ("qwen2.5-7b", 7.62), ("qwen2.5-1.5b", 1.54),
                                            ("qwen3-8b-base", 8.19), ("qwen3-14b-base", 14.77)])
def test_shipped_hf_configs_have_the_published_sizes(name, published):
    # The model cards round to two decimals (billions).
    assert round(count_parameters(HF[name]) / 1e9, 2) == published
    if name == "qwen2.5-32b":
        assert abs(count_parameters(HF[name]) / 32.76e9 - 1) < 1e-3


def _shape(hf: dict) -> ModelShape:
    """Parts by hand from config.json (independent of the megatron build)."""
    h, ffn, heads, kv = hf["hidden_size"], hf["intermediate_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    d = h // heads
    sharded = h * (heads + 2 * kv) * d + (heads + 2 * kv) * d + heads * d * h + 3 * h * ffn
    tied = hf["tie_word_embeddings"]
    return ModelShape(hf["num_hidden_layers"], hf["vocab_size"] * h, sharded, 2 * h, h,
                      0 if tied else hf["vocab_size"] * h, tied)


def test_stage_parameters_sum_to_the_model():
    shape = _shape(HF["qwen2.5-32b"])
    assert shape.total == count_parameters(HF["qwen2.5-32b"])
    per_gpu = [stage_parameters(shape, 8, 2, s) for s in range(2)]
    replicated = shape.num_layers * shape.layer_replicated + shape.final_norm  # on every TP rank
    assert sum(per_gpu) * 8 == pytest.approx(shape.total + 7 * replicated)
    # Tied embeddings with pp > 1: the last stage holds a copy of the embedding as its output layer.
    tied = _shape(HF["qwen2.5-1.5b"])
    last = stage_parameters(tied, 1, 2, 1)
    assert last == tied.num_layers // 2 * (tied.layer_sharded + tied.layer_replicated) + tied.final_norm + tied.embedding


def test_trainer_memory_by_hand():
    hf = HF["qwen2.5-32b"]
    cfg = load_config("configs/qwen2.5_32b_qae.yaml", [])  # tp 8, pp 2, bf16, fp8, dist-opt, full/uniform/1
    shape = _shape(hf)
    n = stage_parameters(shape, 8, 2, 0)
    m = trainer_memory(cfg, hf, shape, dp=2, stage=0)
    assert (m.params, m.grads, m.optimizer, m.fp8_weights, m.logits) == (2 * n, 4 * n, 12 * n / 2, 2 * n, 0.0)
    assert m.reference == 0.0
    with_kl = trainer_memory(load_config("configs/qwen2.5_32b_qae.yaml", ["algo.kl_coef=0.001"]), hf, shape, 2, 0)
    assert with_kl.reference == 2 * n and with_kl.resident == m.resident + 2 * n  # the frozen bf16 copy
    t, h = 24576, 5120
    layer = t * 2 * (4 * h / 8 + (2 * 5120 + 2 * 1024) / 8 + 3 * 27648 / 8)  # one layer's saved tensors
    assert m.activations == pytest.approx(2 * 32 * t * 2 * h / 8 + layer)  # 2 micro-batches of 32 inputs
    last = trainer_memory(cfg, hf, shape, dp=2, stage=1)
    v = 152064 / 8
    # bf16 logits, their response rows and both gradients; one 4096-token chunk's fp32 work.
    assert last.logits == 4 * 2 * t * v + 4 * 4 * 4096 * v
    assert last.activations == pytest.approx(32 * t * 2 * h / 8 + layer)
    no_recompute = load_config("configs/qwen2.5_32b_qae.yaml", ["model.recompute_granularity=null",
                                                                 "model.recompute_method=null"])
    assert activation_bytes(no_recompute, hf, 0) == pytest.approx(2 * 32 * layer)
    plain = load_config("configs/qwen2.5_32b_qae.yaml", ["parallel.use_distributed_optimizer=false"])
    assert trainer_memory(plain, hf, shape, dp=2, stage=0).optimizer == 12 * n


def test_checkpoint_save_host_memory_by_hand():
    # The figure for the fully reshardable format: fp32 params + 2 Adam moments of the
    # whole TP-PP shard on every rank, about 25 GB per rank at tp 8 x pp 2.
    shape = _shape(HF["qwen2.5-32b"])
    n = stage_parameters(shape, 8, 2, 0)
    cfg = load_config("configs/qwen2.5_32b_qae.yaml", [])  # bf16, dist-opt, dp 2 on 32 GPUs
    assert save_host_bytes(cfg, n, 2) == 2 * n + 12 * n / 2
    full = load_config("configs/qwen2.5_32b_qae.yaml", ["run.checkpoint_optimizer_format=fully_reshardable"])
    assert save_host_bytes(full, n, 2) == 2 * n + 12 * n and 12 * n / 1e9 == pytest.approx(24.6, abs=0.1)
    plain = load_config("configs/qwen2.5_32b_qae.yaml", ["parallel.use_distributed_optimizer=false"])
    assert save_host_bytes(plain, n, 2) == 2 * n + 12 * n
    r = _plan("--config", "configs/qwen2.5_32b_qae.yaml", "--nodes", "8", "--trainer-gpus", "32")
    worst = max(save_host_bytes(cfg, stage_parameters(shape, 8, 2, s), 2) for s in range(2))
    assert (f"checkpoint save (run.checkpoint_optimizer_format=dp_reshardable): host memory {worst / GIB:.1f} GiB "
            f"per trainer rank at most, {8 * worst / GIB:.1f} GiB per node of 8 trainer GPUs") in r.stdout, r.stdout


def test_engine_memory_by_hand():
    cfg = load_config("configs/qwen2.5_32b_qae.yaml", [])  # engine tp 4, mem_fraction 0.8
    n = count_parameters(HF["qwen2.5-32b"])
    e = engine_memory(cfg, HF["qwen2.5-32b"], n, 80 * GIB)
    assert e.weights == n * 2 / 4
    assert e.kv_bytes_per_token == 2 * 64 * (8 // 4) * 128 * 2  # K and V, 64 layers, 2 kv heads/GPU, bf16
    assert e.kv_tokens == int((0.8 * 80 * GIB - n / 2) // e.kv_bytes_per_token)


@pytest.mark.parametrize("config,nodes,trainer_gpus,params", [
    ("qwen2.5_32b_qae", 8, 32, "32.76B"), ("qwen2.5_7b_qae", 1, 4, "7.62B"), ("qwen2.5_1.5b_qae", 1, 4, "1.54B"),
    ("qwen3_8b_base_qae", 1, 4, "8.19B"), ("qwen3_14b_base_qae", 2, 8, "14.77B")])
def test_shipped_configs_pass_the_dry_run(config, nodes, trainer_gpus, params):
    r = _plan("--config", f"configs/{config}.yaml", "--nodes", str(nodes), "--trainer-gpus", str(trainer_gpus))
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert f"parameters: {params}" in r.stdout and r.stdout.rstrip().endswith("fits")
    # The meta-device Megatron build agrees with the config.json arithmetic, to the parameter.
    counts = re.search(r"\(([0-9,]+); Megatron GPTModel on the meta device: ([0-9,]+)\)", r.stdout)
    assert counts and counts.group(1) == counts.group(2)


def test_tp1_pp1_32b_does_not_fit_and_says_by_how_much():
    r = _plan_cli("--config", "configs/qwen2.5_32b_qae.yaml", "--nodes", "8", "--trainer-gpus", "32",
              "parallel.tp=1", "parallel.pp=1", "parallel.sequence_parallel=false")
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    short = re.search(r"needs ([0-9.]+) GiB per GPU but ([0-9.]+) GiB are usable: short by ([0-9.]+) GiB", r.stdout)
    assert short, r.stdout
    need, usable, missing = map(float, short.groups())
    assert usable == pytest.approx(80 * 0.92, abs=0.05) and missing == pytest.approx(need - usable, abs=0.11)
    assert missing > 100  # 32.8B bf16 params + fp32 grads alone are 183 GiB


def test_engine_shortfalls_and_config_errors():
    r = _plan("--config", "configs/qwen2.5_32b_qae.yaml", "--nodes", "8", "--trainer-gpus", "32", "engine.engine_tp=1")
    assert r.returncode == 1 and "for one 22528-token sequence; raise engine.engine_tp" in r.stdout
    r = _plan("--config", "configs/qwen2.5_32b_qae.yaml", "--nodes", "8", "--trainer-gpus", "32", "engine.num_engines=9")
    assert r.returncode == 1 and "engine.num_engines=9 x engine.engine_tp=4 needs 36 GPUs but 32 are left" in r.stdout
    r = _plan("--config", "configs/qwen2.5_32b_qae.yaml", "--nodes", "8", "--trainer-gpus", "24")
    assert r.returncode == 2 and "world size 24 is not divisible by tp*pp*cp = 16" in r.stderr


def test_colocated_layout_counts_the_resident_trainer_state():
    args = ["--config", "configs/qwen2.5_7b_qae.yaml", "--nodes", "1", "--trainer-gpus", "8",
            "engine.colocate=true", "engine.num_engines=4"]
    r = _plan(*args, "engine.mem_fraction_static=0.5")
    assert r.returncode == 0 and "colocated engines 0-3 (tp 2 each)" in r.stdout, r.stdout + r.stderr[-2000:]
    cfg = load_config("configs/qwen2.5_7b_qae.yaml", ["engine.colocate=true", "engine.num_engines=4"])
    shape = _shape(HF["qwen2.5-7b"])
    n = stage_parameters(shape, 4, 1, 0)
    resident = 2 * n + 4 * n + 12 * n / 2 + 2 * n  # bf16 params, fp32 grads, Adam over dp=2, FP8 copies
    m = trainer_memory(cfg, HF["qwen2.5-7b"], shape, dp=2, stage=0)
    assert m.params + m.grads + m.optimizer + m.fp8_weights == resident
    # Not offloaded: SGLang takes 0.95 of what the whole state leaves free at its start
    # (kv_cache_configurator.py:2990-3057), more than the usable rest.
    r = _plan(*args, "engine.offload_train_state=false", "engine.mem_fraction_static=0.95")
    over = resident / GIB + 0.95 * (80 - resident / GIB) - 0.92 * 80
    room = (0.92 * 80 - resident / GIB) / (80 - resident / GIB)
    assert r.returncode == 1, r.stdout
    assert f"by {over:.1f} GiB; lower engine.mem_fraction_static to {room:.2f}" in r.stdout
    # Offloaded (the default): grads + optimizer state leave the GPU during rollout, and fit.
    stays, freed = 2 * n + 2 * n, 4 * n + 12 * n / 2
    assert m.during_rollout(True) == stays and m.during_rollout(False) == resident
    r = _plan(*args)
    assert r.returncode == 0, r.stdout
    assert (f"trainer state {stays / GIB:.1f} GiB stays during rollout ({freed / GIB:.1f} GiB of grads "
            "+ optimizer state offloaded to host memory); engines start after it and take "
            f"{0.8 * (80 - stays / GIB):.1f} GiB") in r.stdout
    # The engines start after the first offload: their KV pool is what SGLang sizes from the
    # memory then free, less their weights (7.6B bf16 over engine tp 2).
    kv = 0.8 * (80 * GIB - stays) - count_parameters(HF["qwen2.5-7b"]) * 2 / 2
    assert f"KV cache {kv / GIB:.1f} = " in r.stdout
    # A checkpoint is saved with the engines released: the whole train state, not the engines'
    # share on top of it.
    assert m.at_save == resident
    assert f"checkpoint save (GiB per GPU): trainer state {resident / GIB:.1f}, engines released" in r.stdout
    r = _plan(*args[:-1], "engine.num_engines=3")
    assert r.returncode == 2 and "set engine.num_engines=4" in r.stderr
