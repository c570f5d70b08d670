"""Dry run: does a config fit its GPUs? Runs on CPU, needs no GPU.

    python -m megatron_qae.plan --config configs/qwen2.5_32b_qae.yaml --nodes 8 --trainer-gpus 32 \
        [--gpus-per-node 8] [--gpu-memory-gib 80] [key=value ...]

What it does: loads and validates the config against the model's config.json, counts the
parameters two ways (config.json arithmetic, and the Megatron GPTModel built for real on the
meta device: same structure, no memory) and requires them to agree, then prints per GPU the
trainer's parameters / gradients / optimizer state / activations / logits for every pipeline
stage, the engines' weights and KV cache, the bytes of one weight sync and the layout per
node. Exits 1 naming each shortfall in GiB when something does not fit, 2 on a config error.
What it does not: measure anything (benchmarks/ do); the activation figure is the estimate
below, not a measurement, and it does not decide where Ray places engines.

Trainer bytes per GPU of pipeline stage s (n = that stage's parameters on one GPU):
  params n*2 (bf16) or n*4; grads n*4 (fp32 grad buffer, megatron's grad_reduce_in_fp32);
  optimizer n*12 (fp32 master + Adam m, v; n*8 for fp32 params) / (dp*cp) with the
  distributed optimizer; FP8: + n*2 (Transformer Engine's fp8 weight copy and its transpose);
  KL penalty (algo.kl_coef > 0): reference n*2 or n*4 (the frozen initial policy's weights).
Activations (bf16, flash attention, t = train.micro_batch_max_tokens / cp tokens per
micro-batch, sp = tp with sequence parallel else 1, q/kv = query/KV projection widths):
  one layer keeps  a = t * 2 * (4h/sp + (2q + 2kv)/tp + 3*ffn/tp)  bytes (norm and linear
  inputs, q/k/v and the attention output, SwiGLU's input and output); its input alone is
  i = t * 2h/sp. Stage s under 1F1B holds m = pp - s micro-batches in flight
  (x (1 + (pp-1)/(pp*vpp)) interleaved). No recompute: m*L*a; full/uniform, r layers per
  unit: m*ceil(L/r)*i + r*a; full/block: m*(r*i + (L-r)*a) + a (L = layers per stage);
  selective: as none (flash attention already keeps no s^2 score matrix).
Logits (last stage; e = 2 bytes bf16, 4 fp32; v = vocab/tp; c = min(train.logprob_chunk_tokens,
  t)): 4*e*t*v + 16*c*v bytes: the logits over every position (Float16Module keeps them bf16),
  their response rows (at most t), and the gradients of both; plus one chunk's fp32 work (the
  entropy's upcast, shifted and exp'd copies in forward; in backward the recomputed chunk's
  upcast copy, softmax and gradient), since log-probs and entropy run over response rows only,
  a chunk at a time, each chunk recomputed in backward (logprobs.response_logprobs). Usable memory: (1 - 0.08) * GPU memory (CUDA context, NCCL
  buffers, allocator fragmentation).
Engine GPU (SGLang): weights = params*2/engine_tp; KV cache = (GPU - held)*mem_fraction_static
  - weights, held = what other processes hold on the GPU when the engine starts (SGLang 0.5.23
  mem_cache/kv_cache_configurator.py:2990-3057: the memory free after its weights minus
  (1 - mem_fraction_static) of the memory free before them); KV bytes/token = 2 (K, V) * layers
  * max(kv_heads/engine_tp, 1) * head_dim * 2.
Colocated (engine.colocate): engines run on the trainer's GPUs; while they generate, the
  trainer's params (+ FP8 copies) stay, its grads + optimizer state too unless
  engine.offload_train_state moved them out (freed / in host memory), and SGLang takes
  (GPU - that)*mem_fraction_static: the engines start after the first offload, so `held` is what
  stays during rollout. While the trainer trains, the engines have released theirs. A
  checkpoint is saved right after training, before the offload: the whole train state on the
  GPU (params, grads, optimizer, FP8 copies, reference), the engines holding nothing; below the
  training peak, printed as the save's figure.
Checkpoint save, host memory per trainer rank (n as above; see save_host_bytes): params
  n*2 or n*4, plus with the distributed optimizer n*12/(dp*cp) ('dp_reshardable') or n*12
  ('fully_reshardable'), without it n*12 (n*8 for fp32 params).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any

from megatron_qae.run import console
from megatron_qae.config.loading import Config, load_config, validate_against_model
from megatron_qae.model.layout import ParallelDims
from megatron_qae.model.qwen2_mapping import attention_dims, has_qk_norm, has_qkv_bias

GIB = 1024**3
RESERVED_FRACTION = 0.08


def count_parameters(hf: dict[str, Any]) -> int:
    """Parameters of a Qwen2 / Qwen3 model from its config.json arithmetic."""
    h, layers, ffn, vocab = hf["hidden_size"], hf["num_hidden_layers"], hf["intermediate_size"], hf["vocab_size"]
    heads, kv_heads, head_dim = attention_dims(hf)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    attn = h * q_dim + 2 * h * kv_dim + q_dim * h  # q, k, v, o weights
    attn += (q_dim + 2 * kv_dim) * has_qkv_bias(hf) + 2 * head_dim * has_qk_norm(hf)  # Qwen2 bias; Qwen3 q/k norms
    per_layer = attn + 3 * h * ffn + 2 * h  # SwiGLU gate/up/down; two RMSNorm weights
    embed = vocab * h * (1 if hf.get("tie_word_embeddings", False) else 2)
    return layers * per_layer + embed + h


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of the Megatron GPTModel by part (from a meta-device build, tp=pp=1)."""

    num_layers: int
    embedding: int
    layer_sharded: int
    """Per decoder layer: parameters split over TP (linear weights, qkv bias)."""
    layer_replicated: int
    """Per decoder layer: parameters copied on every TP rank (RMSNorm weights)."""
    final_norm: int
    output: int
    """Output layer (0 when tied to the embedding)."""
    tied: bool

    @property
    def total(self) -> int:
        layer = self.layer_sharded + self.layer_replicated
        return self.embedding + self.num_layers * layer + self.final_norm + self.output


def megatron_shape(hf: dict[str, Any]) -> ModelShape:
    """Build the GPTModel for `hf` on the meta device (no memory) and count its parameters."""
    import torch

    from megatron_qae.launch_env import single_process_env
    from megatron_qae.model import build as model_lib, parallel
    from megatron_qae.config.sections import ParallelConfig

    from megatron.core.models.gpt import GPTModel

    single_process_env()
    groups = parallel.init_distributed(ParallelConfig())
    config = model_lib.build_transformer_config(hf, groups.dims)
    tied = bool(hf.get("tie_word_embeddings", False))
    with torch.device("meta"):
        gpt = GPTModel(config=config, transformer_layer_spec=model_lib.layer_spec(config, "local"),
                       vocab_size=hf["vocab_size"], max_sequence_length=hf.get("max_position_embeddings", 4096),
                       share_embeddings_and_output_weights=tied, position_embedding_type="rope")
    parts = {"embedding": 0, "sharded": 0, "replicated": 0, "final_norm": 0, "output": 0}
    for name, p in gpt.named_parameters():
        if name.startswith("embedding."):
            parts["embedding"] += p.numel()
        elif name.startswith("decoder.layers."):
            parts["sharded" if getattr(p, "tensor_model_parallel", False) else "replicated"] += p.numel()
        elif name.startswith("decoder.final_layernorm"):
            parts["final_norm"] += p.numel()
        else:
            assert name.startswith("output_layer."), name
            parts["output"] += p.numel()
    layers = hf["num_hidden_layers"]
    assert parts["sharded"] % layers == 0 and parts["replicated"] % layers == 0, parts
    return ModelShape(layers, parts["embedding"], parts["sharded"] // layers, parts["replicated"] // layers,
                      parts["final_norm"], parts["output"], tied)


def stage_parameters(shape: ModelShape, tp: int, pp: int, stage: int) -> float:
    """Parameters on one GPU of pipeline stage `stage` (a tied embedding is copied to the
    last stage when pp > 1, as megatron does)."""
    n = shape.num_layers // pp * (shape.layer_sharded / tp + shape.layer_replicated)
    if stage == 0:
        n += shape.embedding / tp
    if stage == pp - 1:
        n += shape.final_norm + (shape.embedding if shape.tied and pp > 1 else shape.output) / tp
    return n


def layer_activation_bytes_per_token(hf: dict[str, Any], tp: int, sp: int) -> float:
    """Bytes one decoder layer keeps for backward per token (the `a` of the module docstring)."""
    h, ffn = hf["hidden_size"], hf["intermediate_size"]
    heads, kv_heads, head_dim = attention_dims(hf)
    q, kv = heads * head_dim, kv_heads * head_dim
    return 2 * (4 * h / sp + (2 * q + 2 * kv) / tp + 3 * ffn / tp)


def activation_bytes(cfg: Config, hf: dict[str, Any], stage: int) -> float:
    """Activation bytes on one GPU of pipeline stage `stage` (formula in the module docstring)."""
    p, m = cfg.parallel, cfg.model
    tokens = cfg.train.micro_batch_max_tokens / p.cp
    sp = p.tp if p.sequence_parallel else 1
    layers = hf["num_hidden_layers"] // p.pp
    a = tokens * layer_activation_bytes_per_token(hf, p.tp, sp)
    i = tokens * 2 * hf["hidden_size"] / sp
    in_flight = (p.pp - stage) * (1 + (p.pp - 1) / (p.pp * p.vpp) if p.vpp else 1)
    if m.recompute_granularity != "full":
        return in_flight * layers * a
    r = min(m.recompute_num_layers or 1, layers)
    if m.recompute_method == "uniform":
        return in_flight * math.ceil(layers / r) * i + r * a
    return in_flight * (r * i + (layers - r) * a) + a


def logits_bytes(cfg: Config, hf: dict[str, Any]) -> float:
    """Last-stage bytes of the logits and the log-prob / entropy code (module docstring)."""
    t = cfg.train.micro_batch_max_tokens / cfg.parallel.cp
    v = hf["vocab_size"] / cfg.parallel.tp
    e = 2 if cfg.model.params_dtype == "bfloat16" else 4
    c = min(cfg.train.logprob_chunk_tokens, t)
    return 4 * e * t * v + 16 * c * v


@dataclass(frozen=True)
class StageMemory:
    """Trainer bytes on one GPU of one pipeline stage."""

    stage: int
    params: float
    grads: float
    optimizer: float
    fp8_weights: float
    reference: float
    activations: float
    logits: float

    @property
    def resident(self) -> float:
        """Bytes that stay between steps (what colocated engines share the GPU with)."""
        return self.params + self.grads + self.optimizer + self.fp8_weights + self.reference

    def during_rollout(self, offload: bool) -> float:
        """Bytes that stay while colocated engines generate: with engine.offload_train_state
        the gradient buffers are freed and the optimizer state is in host memory."""
        return self.resident - (self.grads + self.optimizer if offload else 0.0)

    @property
    def at_save(self) -> float:
        """Bytes during a checkpoint save: the whole train state, back on the GPU after the
        colocated engines released theirs (the loop saves after training, before the offload)."""
        return self.resident

    @property
    def total(self) -> float:
        return self.resident + self.activations + self.logits


def trainer_memory(cfg: Config, hf: dict[str, Any], shape: ModelShape, dp: int, stage: int) -> StageMemory:
    """Bytes per GPU of pipeline stage `stage` (formulas in the module docstring)."""
    p, m = cfg.parallel, cfg.model
    n = stage_parameters(shape, p.tp, p.pp, stage)
    bf16 = m.params_dtype == "bfloat16"
    grad_bytes = 4 if p.ddp_overrides.get("grad_reduce_in_fp32", True) else (2 if bf16 else 4)
    shards = dp * p.cp if p.use_distributed_optimizer else 1
    logits = logits_bytes(cfg, hf) if stage == p.pp - 1 else 0.0
    params = n * (2 if bf16 else 4)
    reference = params if cfg.algo.kl_coef > 0 else 0.0
    return StageMemory(stage, params, n * grad_bytes, n * (12 if bf16 else 8) / shards,
                       n * 2 if m.fp8 else 0.0, reference, activation_bytes(cfg, hf, stage), logits)


def save_host_bytes(cfg: Config, n: float, dp: int) -> float:
    """Host bytes a trainer rank holds while it saves a checkpoint, n = its parameters (the
    worst rank: DP rank 0 of its TP-PP group, which also writes the model's shard). megatron
    stages every tensor a rank writes in host memory before writing it
    (dist_checkpointing/strategies/filesystem_async.py:227-248). With the distributed optimizer,
    'dp_reshardable' writes each rank's shard of the fp32 main params and both Adam moments as
    it is (12 bytes / (dp*cp) per parameter); 'fully_reshardable' first builds fp32 host copies
    of the whole TP-PP shard of all three on every DP rank (distrib_optimizer.py:1315-1321,
    1729-1738: 12 bytes per parameter). Without it, DP rank 0 writes the whole optimizer state."""
    p = cfg.parallel
    bf16 = cfg.model.params_dtype == "bfloat16"
    params = n * (2 if bf16 else 4)
    if not p.use_distributed_optimizer:
        return params + n * (12 if bf16 else 8)
    if cfg.run.checkpoint_optimizer_format == "fully_reshardable":
        return params + 12 * n
    return params + 12 * n / (dp * p.cp)


@dataclass(frozen=True)
class EngineMemory:
    """Bytes on one GPU of one SGLang engine."""

    weights: float
    kv_cache: float
    kv_bytes_per_token: float

    @property
    def kv_tokens(self) -> int:
        return int(self.kv_cache // self.kv_bytes_per_token)


def engine_memory(cfg: Config, hf: dict[str, Any], n_params: int, gpu_bytes: float,
                  held_bytes: float = 0.0) -> EngineMemory:
    """Weights and KV cache per engine GPU under SGLang's --mem-fraction-static, with
    `held_bytes` of the GPU taken by others when the engine starts (colocated: the trainer)."""
    etp = cfg.engine.engine_tp
    _, kv_heads, head_dim = attention_dims(hf)
    weights = n_params * 2 / etp
    kv = (gpu_bytes - held_bytes) * cfg.engine.mem_fraction_static - weights
    return EngineMemory(weights, kv, 2 * hf["num_hidden_layers"] * max(kv_heads // etp, 1) * head_dim * 2)


def node_layout(cfg: Config, world: int, total_gpus: int, gpus_per_node: int) -> list[str]:
    """One line per node: trainer ranks with their (pp stage, dp rank), then engine GPUs.
    Rank order is megatron's default tp-cp-dp-pp (tp fastest)."""
    p, etp = cfg.parallel, cfg.engine.engine_tp
    dp = ParallelDims.from_config(p, world).dp
    lines = []
    for node in range(math.ceil(total_gpus / gpus_per_node)):
        gpus = range(node * gpus_per_node, min((node + 1) * gpus_per_node, total_gpus))
        ranks = [g for g in gpus if g < world]
        parts = []
        if ranks:
            stages = sorted({r // (p.tp * p.cp * dp) for r in ranks})
            dps = sorted({r // (p.tp * p.cp) % dp for r in ranks})
            parts.append(f"trainer ranks {ranks[0]}-{ranks[-1]} (pp stage {stages}, dp rank {dps})")
            if cfg.engine.colocate:
                parts.append(f"colocated engines {ranks[0] // etp}-{ranks[-1] // etp} (tp {etp} each)")
        engine_gpus = [] if cfg.engine.colocate else [g - world for g in gpus if g >= world]
        if engine_gpus:
            engines = sorted({g // etp for g in engine_gpus if g // etp < cfg.engine.num_engines})
            idle = [g for g in engine_gpus if g // etp >= cfg.engine.num_engines]
            if engines:
                parts.append(f"engines {engines[0]}-{engines[-1]} (tp {etp} each)")
            if idle:
                parts.append(f"{len(idle)} idle GPU(s)")
        lines.append(f"  node {node}: " + "; ".join(parts))
    if p.tp > gpus_per_node or gpus_per_node % p.tp:
        lines.append(f"  warning: TP groups of {p.tp} cross node boundaries (TP traffic over the network)")
    return lines


def shortfalls(cfg: Config, mem: list[StageMemory], eng: EngineMemory, usable: float, gpu: float,
               engine_gpus: int) -> list[str]:
    """What does not fit, each naming the numbers and a fix."""
    out = _colocated_shortfall(cfg, mem, usable, gpu) if cfg.engine.colocate else []
    worst = max(mem, key=lambda s: s.total)
    if worst.total > usable:
        out.append(f"trainer pipeline stage {worst.stage} needs {worst.total / GIB:.1f} GiB per GPU but "
                   f"{usable / GIB:.1f} GiB are usable: short by {(worst.total - usable) / GIB:.1f} GiB. "
                   "Raise parallel.tp / parallel.pp, set parallel.use_distributed_optimizer=true or "
                   "model.recompute_granularity=full, or lower train.micro_batch_max_tokens")
    e = cfg.engine
    if not e.colocate and e.num_engines * e.engine_tp > engine_gpus:
        out.append(f"engine.num_engines={e.num_engines} x engine.engine_tp={e.engine_tp} needs "
                   f"{e.num_engines * e.engine_tp} GPUs but {engine_gpus} are left after the trainer; "
                   "add nodes, lower --trainer-gpus or engine.num_engines")
    seq = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    if eng.kv_tokens < seq:
        have = max(eng.kv_cache, 0.0)
        need = seq * eng.kv_bytes_per_token - have
        out.append(f"engine GPU: weights {eng.weights / GIB:.1f} GiB leave {have / GIB:.1f} GiB of KV cache "
                   f"under mem_fraction_static={e.mem_fraction_static} of {gpu / GIB:.0f} GiB, short by "
                   f"{need / GIB:.1f} GiB for one {seq}-token sequence; raise engine.engine_tp")
    return out


def _colocated_shortfall(cfg: Config, mem: list[StageMemory], usable: float, gpu: float) -> list[str]:
    """Colocated: during rollout the trainer's state (params, and grads + optimizer unless
    offloaded) stays while SGLang takes mem_fraction_static of what it found free at its start;
    during training and a checkpoint save the engine has released its memory."""
    resident = max(s.during_rollout(cfg.engine.offload_train_state) for s in mem)
    engine = (gpu - resident) * cfg.engine.mem_fraction_static
    if resident + engine <= usable:
        return []
    room = (usable - resident) / (gpu - resident)
    fix = (f"lower engine.mem_fraction_static to {room:.2f} or less" if room > 0 else
           "the trainer state alone leaves no room: raise parallel.tp / parallel.pp")
    return [f"colocated rollout: trainer state {resident / GIB:.1f} GiB + engine {engine / GIB:.1f} GiB "
            f"(mem_fraction_static={cfg.engine.mem_fraction_static}) exceed the {usable / GIB:.1f} GiB usable "
            f"by {(resident + engine - usable) / GIB:.1f} GiB; {fix}"]


def report(cfg: Config, hf: dict[str, Any], shape: ModelShape, n_params: int, world: int,
           total_gpus: int, gpus_per_node: int, gpu: float) -> list[str]:
    """Print the plan; return the shortfalls (empty = fits)."""
    p, e = cfg.parallel, cfg.engine
    dp = ParallelDims.from_config(p, world).dp
    mem = [trainer_memory(cfg, hf, shape, dp, s) for s in range(p.pp)]
    held = max(s.during_rollout(e.offload_train_state) for s in mem) if e.colocate else 0.0
    eng = engine_memory(cfg, hf, n_params, gpu, held)
    print(f"model: {cfg.model.path}  parameters: {n_params / 1e9:.2f}B ({n_params:,}; "
          f"Megatron GPTModel on the meta device: {shape.total:,})")
    engine_gpus = world if e.colocate else total_gpus - world
    print(f"cluster: {total_gpus // gpus_per_node} nodes x {gpus_per_node} GPUs of {gpu / GIB:.0f} GiB; "
          f"trainer {world} GPUs (tp={p.tp} pp={p.pp} cp={p.cp} dp={dp}), "
          f"engines {e.num_engines} x tp {e.engine_tp} on {engine_gpus} GPUs"
          + (" (colocated with the trainer)" if e.colocate else ""))
    print("layout:", *node_layout(cfg, world, total_gpus, gpus_per_node), sep="\n")
    for s in mem:
        print(f"trainer GPU, pp stage {s.stage} (GiB): " + ", ".join(
            f"{k} {getattr(s, k) / GIB:.1f}" for k in
            ("params", "grads", "optimizer", "fp8_weights", "reference", "activations", "logits")) + f"; total {s.total / GIB:.1f}")
    seq = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    print(f"engine GPU (GiB): weights {eng.weights / GIB:.1f}, KV cache {max(eng.kv_cache, 0) / GIB:.1f} = "
          f"{eng.kv_tokens:,} tokens ({eng.kv_bytes_per_token / 1024:.0f} KiB/token), "
          f"{eng.kv_tokens // seq} concurrent {seq}-token sequences")
    sync = n_params * 2
    print(f"weight sync: {sync / 1e9:.1f} GB bf16 per sync in {math.ceil(sync / e.weight_sync_bucket_bytes)} "
          f"buckets of <= {e.weight_sync_bucket_bytes / GIB:.2f} GiB, "
          + (f"by memory handle to {e.num_engines} colocated engines" if e.colocate
             else f"broadcast to {e.num_engines} engines"))
    save = max(save_host_bytes(cfg, stage_parameters(shape, p.tp, p.pp, s), dp) for s in range(p.pp))
    print(f"checkpoint save (run.checkpoint_optimizer_format={cfg.run.checkpoint_optimizer_format}): host memory "
          f"{save / GIB:.1f} GiB per trainer rank at most, {save * min(gpus_per_node, world) / GIB:.1f} GiB per node "
          f"of {min(gpus_per_node, world)} trainer GPUs")
    if e.colocate:
        freed = max(s.resident for s in mem) - held
        print(f"colocated: trainer state {held / GIB:.1f} GiB stays during rollout"
              + (f" ({freed / GIB:.1f} GiB of grads + optimizer state offloaded to host memory)"
                 if e.offload_train_state else "")
              + f"; engines start after it and take {(gpu - held) * e.mem_fraction_static / GIB:.1f} GiB, "
              "released during training")
    print(f"checkpoint save (GiB per GPU): trainer state {max(s.at_save for s in mem) / GIB:.1f}"
          + (", engines released" if e.colocate else "") + " (saved after training, before the offload)")
    return shortfalls(cfg, mem, eng, gpu * (1 - RESERVED_FRACTION), gpu, engine_gpus)


def plan(cfg: Config, nodes: int, gpus_per_node: int, gpu_gib: float, trainer_gpus: int | None) -> int:
    """Validate, print the plan, return the exit status (0 fits, 1 shortfall)."""
    from megatron_qae.sync.colocated_sync import check_colocated_layout
    from megatron_qae.model.build import load_hf_config

    hf = load_hf_config(cfg.model.path)
    validate_against_model(cfg, hf)
    total = nodes * gpus_per_node
    if cfg.engine.colocate:
        world = trainer_gpus or total
        if not 0 < world <= total:
            raise ValueError(f"--trainer-gpus={world} must be in 1..{total} (the GPUs of {nodes} nodes)")
        check_colocated_layout(world, cfg.engine.num_engines, cfg.engine.engine_tp)
    else:
        world = trainer_gpus or total // 2
        if not 0 < world < total:
            raise ValueError(f"--trainer-gpus={world} must leave engine GPUs out of {total}; lower it or add nodes")
    n_params = count_parameters(hf)
    shape = megatron_shape(hf)
    if shape.total != n_params:
        raise AssertionError(f"config.json arithmetic gives {n_params} parameters, megatron's model {shape.total}")
    short = report(cfg, hf, shape, n_params, world, total, gpus_per_node, gpu_gib * GIB)
    for s in short:
        print(f"DOES NOT FIT: {s}")
    if not short:
        print("fits")
    return 1 if short else 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML under configs/")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0)
    ap.add_argument("--trainer-gpus", type=int, default=None,
                    help="GPUs of the trainer (default: half); the rest run engines")
    ap.add_argument("--verbose", action="store_true",
                    help="also show third-party logs and warnings (megatron-core, torch)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    a = ap.parse_args(argv)
    console.setup(0, a.verbose)  # megatron-core's notices while it builds the meta model stay quiet
    try:
        cfg = load_config(a.config, a.overrides)
        status = plan(cfg, a.nodes, a.gpus_per_node, a.gpu_memory_gib, a.trainer_gpus)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 2
    finally:
        from megatron_qae.model import parallel

        parallel.destroy()
    sys.exit(status)


if __name__ == "__main__":
    main(sys.argv[1:])
