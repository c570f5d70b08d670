"""Dry run: does a config fit its GPUs? Runs on CPU, needs no GPU.

    python -m megatron_qae.plan --config configs/qwen2.5_32b_qae.yaml --nodes 8 [key=value ...]

What it does: validates the config against the model's config.json, counts parameters from the
HF config (and checks the formula against a Megatron GPTModel built at reduced width, so the
two agree on the structure), and prints per GPU the trainer's parameter / gradient / optimizer
/ activation memory, the engines' weight + KV-cache memory, the parallel layout per node and
the bytes of one weight sync. Exits non-zero naming the shortfall when the trainer does not
fit. What it does not: measure anything (benchmarks/ do); the activation figure is the
standard estimate stated below, not a measurement.

Activation estimate per GPU (bf16, flash attention, sequence parallel dividing by tp):
  full recompute: layers_per_stage * tokens * hidden * 2 bytes per in-flight micro-batch
                  (pp micro-batches in flight under 1F1B) + one layer's working set
                  tokens * hidden * 34 / tp bytes;
  no recompute:   layers_per_stage * tokens * hidden * 34 / tp bytes per in-flight micro-batch;
  logits:         tokens * vocab / tp * 4 bytes * 2 (fp32 logits and their gradient).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from megatron_qae.config import Config, load_config, validate_against_model

GIB = 1024**3


def count_parameters(hf: dict[str, Any]) -> int:
    """Parameters of a Qwen2 model from its config.json arithmetic."""
    h, layers, ffn, vocab = hf["hidden_size"], hf["num_hidden_layers"], hf["intermediate_size"], hf["vocab_size"]
    heads = hf["num_attention_heads"]
    kv_dim = hf.get("num_key_value_heads", heads) * (hf.get("head_dim") or h // heads)
    q_dim = heads * (hf.get("head_dim") or h // heads)
    attn = h * q_dim + q_dim + 2 * (h * kv_dim + kv_dim) + q_dim * h
    per_layer = attn + 3 * h * ffn + 2 * h
    embed = vocab * h * (1 if hf.get("tie_word_embeddings", False) else 2)
    return layers * per_layer + embed + h


def megatron_parameter_count(hf: dict[str, Any]) -> int:
    """Parameters of the GPTModel megatron builds for `hf` (built for real: use small configs)."""
    from megatron_qae import model as model_lib, parallel

    parallel.single_process_env()
    groups = parallel.init_distributed(lambda w: parallel.ParallelDims.from_world(w, 1, 1))
    config = model_lib.build_transformer_config(hf, groups.dims)
    chunks = model_lib.build_model_chunks(hf, config, "local")
    return sum(p.numel() for c in chunks for p in c.parameters())


def reduced(hf: dict[str, Any], factor: int = 16) -> dict[str, Any]:
    """The same structure at 1/factor width and 2 layers (for the Megatron cross-check)."""
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads", hf["num_attention_heads"])
    head_dim = 8
    return {**hf, "num_hidden_layers": 2, "hidden_size": heads * head_dim, "head_dim": head_dim,
            "num_key_value_heads": kv, "intermediate_size": max(hf["intermediate_size"] // factor, 8),
            "vocab_size": max(hf["vocab_size"] // factor // 8 * 8, 8)}


@dataclass
class TrainerMemory:
    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.logits


def trainer_memory(cfg: Config, hf: dict[str, Any], n_params: int, dp: int) -> TrainerMemory:
    """Bytes per GPU of the trainer (see the module docstring for the activation estimate)."""
    p = cfg.parallel
    mp = p.tp * p.pp
    bf16 = cfg.model.params_dtype == "bfloat16"
    params = n_params * (2 if bf16 else 4) / mp
    grads = n_params * 4 / mp  # gradients reduced in fp32
    opt_bytes = (12 if bf16 else 8) * n_params / mp  # fp32 master (bf16 only) + Adam m, v
    optimizer = opt_bytes / dp if p.use_distributed_optimizer else opt_bytes
    tokens = cfg.train.micro_batch_max_tokens
    h, layers = hf["hidden_size"], hf["num_hidden_layers"] // p.pp
    sp = p.tp if p.sequence_parallel else 1
    if cfg.model.recompute_granularity == "full":
        acts = p.pp * layers * tokens * h * 2 / sp + tokens * h * 34 / p.tp
    else:
        acts = p.pp * layers * tokens * h * 34 / p.tp
    logits = tokens * hf["vocab_size"] / p.tp * 4 * 2
    return TrainerMemory(params, grads, optimizer, acts, logits)


def engine_memory(cfg: Config, n_params: int, gpu_bytes: float) -> tuple[float, float]:
    """(weight bytes, KV-cache bytes) per engine GPU under SGLang's mem_fraction_static."""
    weights = n_params * 2 / cfg.engine.engine_tp
    kv = max(gpu_bytes * cfg.engine.mem_fraction_static - weights, 0.0)
    return weights, kv


def kv_bytes_per_token(hf: dict[str, Any], engine_tp: int) -> float:
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    kv_heads = max(hf.get("num_key_value_heads", heads) // engine_tp, 1)
    return 2 * hf["num_hidden_layers"] * kv_heads * head_dim * 2


def plan(cfg: Config, nodes: int, gpus_per_node: int, gpu_gib: float, trainer_gpus: int | None) -> int:
    """Print the plan; return the exit status (0 = fits)."""
    from megatron_qae.model import load_hf_config

    hf = load_hf_config(cfg.model.path)
    validate_against_model(cfg, hf)
    n_params = count_parameters(hf)
    small = reduced(hf)
    mega, formula = megatron_parameter_count(small), count_parameters(small)
    if mega != formula:
        raise AssertionError(f"parameter formula {formula} != megatron's {mega} on the reduced model")
    gpu = gpu_gib * GIB
    e, p = cfg.engine, cfg.parallel
    total_gpus = nodes * gpus_per_node
    world = total_gpus if e.colocate else (trainer_gpus or total_gpus // 2)
    dp = p.dp(world)
    mem = trainer_memory(cfg, hf, n_params, dp)
    engine_gpus = world if e.colocate else total_gpus - world
    n_engines = engine_gpus // e.engine_tp
    w_bytes, kv = engine_memory(cfg, n_params, gpu)
    kv_tok = kv_bytes_per_token(hf, e.engine_tp)
    print(f"model: {cfg.model.path}  parameters: {n_params / 1e9:.2f}B "
          f"(formula checked against megatron on a reduced model: {mega} == {formula})")
    print(f"cluster: {nodes} nodes x {gpus_per_node} GPUs of {gpu_gib:.0f} GiB; "
          f"trainer {world} GPUs (tp={p.tp} pp={p.pp} dp={dp}; {world // gpus_per_node or 1} node(s)), "
          f"{'colocated' if e.colocate else f'{engine_gpus} engine GPUs'}: "
          f"{n_engines} engines x tp {e.engine_tp}")
    print("trainer per GPU (GiB): " + ", ".join(f"{k} {getattr(mem, k) / GIB:.1f}" for k in
          ("params", "grads", "optimizer", "activations", "logits")) + f"; total {mem.total / GIB:.1f}")
    print(f"engine per GPU (GiB): weights {w_bytes / GIB:.1f}, KV cache {kv / GIB:.1f} "
          f"= {kv / kv_tok / 1e3:.0f}k tokens ({kv_tok / 1024:.0f} KiB/token)")
    print(f"weight sync: {n_params * 2 / 1e9:.1f} GB in bf16 per sync to each engine")
    usable = gpu * (1 - e.mem_fraction_static) if e.colocate else gpu * 0.92
    if mem.total > usable:
        print(f"DOES NOT FIT: the trainer needs {mem.total / GIB:.1f} GiB per GPU but "
              f"{usable / GIB:.1f} GiB are usable: short by {(mem.total - usable) / GIB:.1f} GiB. "
              "Raise parallel.tp / parallel.pp, enable parallel.use_distributed_optimizer or "
              "model.recompute_granularity=full, or lower train.micro_batch_max_tokens.")
        return 1
    print("fits")
    return 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0)
    ap.add_argument("--trainer-gpus", type=int, default=None,
                    help="disaggregated: GPUs of the trainer (default: half; the rest run engines)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    sys.exit(plan(cfg, a.nodes, a.gpus_per_node, a.gpu_memory_gib, a.trainer_gpus))


if __name__ == "__main__":
    main(sys.argv[1:])
