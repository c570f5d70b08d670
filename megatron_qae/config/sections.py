"""The trainer-side sections of the run config: run, model, parallel, optim, train, ray.

What it does: one frozen dataclass per section, a docstring per field, per-field validation
in `__post_init__` (ValueError through rollout_sglang.config_checks, naming field, value and
fix; every numeric field has a `BOUNDS` entry); the parallel degrees are checked here on their own, and against the world size once, by
`ParallelDims.from_config` (model/layout.py). What it does not: load files or check across
sections (loading.py); algo.py and rollout_sglang.config hold the other sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rollout_sglang.config_checks import (AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SECONDS, SEED, Bound, check_bounds,
                                          fail, no_shadowing, one_of)

CP_UNSUPPORTED = ("context parallelism is not built: nothing splits sequences over cp ranks, so "
                  "every cp rank would train on whole sequences with wrong attention and loss; set "
                  "parallel.cp=1 (for long sequences use model.recompute_granularity=full and "
                  "parallel.tp / parallel.sequence_parallel)")
VPP_UNSUPPORTED = ("the interleaved schedule is not supported yet: with variable sequence lengths "
                   "(every micro-batch its own length) it deadlocked in megatron-core 0.19's "
                   "pipeline shape exchange in our pp=2 and pp=4 runs; set parallel.vpp=null "
                   "(the 1F1B schedule)")

_ADAM_BETA = Bound(0, 1, high_open=True, why="torch.optim.Adam's betas")
_FROM_HF = "the model's config.json (model.path)"
TRANSFORMER_SHADOWED = {
    "params_dtype": "model.params_dtype", "pipeline_dtype": "model.params_dtype", "bf16": "model.params_dtype",
    "fp8": "model.fp8", "fp8_recipe": "model.fp8_recipe", "sequence_parallel": "parallel.sequence_parallel",
    "recompute_granularity": "model.recompute_granularity", "recompute_method": "model.recompute_method",
    "recompute_num_layers": "model.recompute_num_layers", "tensor_model_parallel_size": "parallel.tp",
    "pipeline_model_parallel_size": "parallel.pp", "virtual_pipeline_model_parallel_size": "parallel.vpp",
    "context_parallel_size": "parallel.cp",
    **{name: _FROM_HF for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                                   "kv_channels", "ffn_hidden_size", "layernorm_epsilon", "add_qkv_bias",
                                   "qk_layernorm", "init_method_std")},
}
"""TransformerConfig fields that model/build.py sets from a first-class field (-> that field)."""
OPTIMIZER_SHADOWED = {
    **{name: f"optim.{name}" for name in ("lr", "min_lr", "weight_decay", "clip_grad", "adam_beta1",
                                          "adam_beta2", "adam_eps")},
    "bf16": "model.params_dtype", "params_dtype": "model.params_dtype",
    "use_distributed_optimizer": "parallel.use_distributed_optimizer",
    "overlap_param_gather": "parallel.ddp_overrides.overlap_param_gather",
}
"""OptimizerConfig fields that model/policy.py sets from a first-class field (-> that field)."""


def check_upstream_keys(name: str, keys: dict[str, Any], module: str, upstream_name: str) -> None:
    """Raise when `keys` has names that the megatron-core dataclass `module.upstream_name`
    lacks. megatron-core is imported only when there are keys to check: loading a config
    stays light, so the entry point can start Ray while megatron-core imports."""
    if not keys:
        return
    upstream = getattr(importlib.import_module(module), upstream_name)
    known = {f.name for f in dataclasses.fields(upstream)}
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            fail(f"{name}.{key}", keys[key],
                  f"{upstream.__name__} has no field {key!r}" + (f"; did you mean {close}?" if close else ""))


@dataclass(frozen=True)
class RunConfig:
    run_dir: str = "runs/default"
    """Directory of this run: config.yaml, metrics.jsonl, tensorboard/, checkpoints/."""
    seed: int = 1234
    """Seed of weight init, data order and sampling."""
    num_rollout_steps: int = 10
    """Number of rollout steps (generate -> train -> sync iterations)."""
    save_interval_steps: int = 0
    """Save a checkpoint every N rollout steps (0 = only on SIGTERM)."""
    keep_last_checkpoints: int = 2
    """Checkpoints kept in run_dir/checkpoints (older ones are deleted)."""
    eval_interval_steps: int = 0
    """Evaluate avg@n / pass@k / maj@k per data source (as megatron_qae.eval) every N steps (0 = never)."""
    eval_n_samples: int = 4
    """n of avg@n (pass@k, maj@k for k = 1, 2, 4, ... n): responses sampled per validation prompt."""
    log_tensorboard: bool = True
    """Also write TensorBoard scalars to run_dir/tensorboard (metrics.jsonl is always written)."""
    wandb_project: str | None = None
    """Weights & Biases project to log to (None = off; needs `pip install wandb`)."""
    progress_bar: bool = True
    """Show a tqdm progress bar with the key metrics on rank 0."""
    resume_from_damaged: str = "fallback"
    """A damaged latest checkpoint (digest mismatch, missing or truncated file): 'fallback' resumes from the newest intact one with a warning; 'fail' stops."""
    checkpoint_optimizer_format: str = "dp_reshardable"
    """How checkpoints hold the distributed optimizer's state (megatron-core's sharding types): 'dp_reshardable' writes each rank's shard as it is (no gather, no host copies beyond what is written; resumes under the same tp / pp, any dp); 'fully_reshardable' gathers it into model space (resumes under any tp / pp / dp, but every rank builds fp32 host copies of its whole TP-PP shard of params and both Adam moments). Save once with 'fully_reshardable' before changing tp or pp."""
    collective_timeout_s: float = 1800.0
    """Timeout of collectives between trainer ranks (NCCL / gloo); a hang fails after it."""
    rollout_wait_timeout_s: float = 21600.0
    """How long trainer ranks wait for rank 0's rollout / eval hand-off (its own gloo group)."""


    BOUNDS: ClassVar[dict[str, Bound]] = {
        "seed": SEED, "num_rollout_steps": AT_LEAST_ONE, "save_interval_steps": NON_NEGATIVE,
        "keep_last_checkpoints": AT_LEAST_ONE, "eval_interval_steps": NON_NEGATIVE, "eval_n_samples": AT_LEAST_ONE,
        "collective_timeout_s": SECONDS, "rollout_wait_timeout_s": SECONDS,
    }

    def __post_init__(self) -> None:
        check_bounds("run", self, self.BOUNDS)
        one_of("run.resume_from_damaged", self.resume_from_damaged, ("fallback", "fail"))
        one_of("run.checkpoint_optimizer_format", self.checkpoint_optimizer_format,
               ("dp_reshardable", "fully_reshardable"))
        if self.rollout_wait_timeout_s < self.collective_timeout_s:
            fail("run.rollout_wait_timeout_s", self.rollout_wait_timeout_s,
                  f"must be >= run.collective_timeout_s={self.collective_timeout_s} (a rollout "
                  "outlasts any collective); raise it to the longest rollout + eval you expect")


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """HF Qwen2 / Qwen2.5 model directory: config.json, tokenizer files, optional *.safetensors."""
    load_weights: bool = True
    """Load *.safetensors from `path` when present (else the seeded random init is kept)."""
    params_dtype: str = "float32"
    """Parameter dtype: 'bfloat16' (GPU runs; also runs on CPU, slowly) or 'float32'."""
    fp8: str | None = None
    """Transformer Engine FP8 format for training: None, 'hybrid' or 'e4m3' (GPU + TE only)."""
    fp8_recipe: str = "tensorwise"
    """FP8 scaling recipe: 'tensorwise' (current scaling), 'delayed', 'blockwise' or 'mxfp8'."""
    transformer_impl: str = "auto"
    """Layer spec: 'local' (megatron-core modules), 'transformer_engine', or 'auto' (TE on GPU)."""
    recompute_granularity: str | None = None
    """Activation recompute: None, 'selective' (attention core) or 'full' (whole layers)."""
    recompute_method: str | None = None
    """With full recompute: 'uniform' or 'block'."""
    recompute_num_layers: int | None = None
    """With full recompute: layers per recompute unit ('uniform') or recomputed layers ('block')."""
    transformer_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra megatron.core TransformerConfig fields, passed through (checked against its fields)."""


    BOUNDS: ClassVar[dict[str, Bound]] = {"recompute_num_layers": AT_LEAST_ONE}

    def __post_init__(self) -> None:
        check_bounds("model", self, self.BOUNDS)
        one_of("model.params_dtype", self.params_dtype, ("float32", "bfloat16"))
        one_of("model.fp8", self.fp8, (None, "hybrid", "e4m3"))
        one_of("model.fp8_recipe", self.fp8_recipe, ("tensorwise", "delayed", "blockwise", "mxfp8"))
        one_of("model.transformer_impl", self.transformer_impl, ("auto", "local", "transformer_engine"))
        one_of("model.recompute_granularity", self.recompute_granularity, (None, "full", "selective"))
        one_of("model.recompute_method", self.recompute_method, (None, "uniform", "block"))
        if self.recompute_granularity == "full" and self.recompute_method is None:
            fail("model.recompute_method", None, "full recompute needs 'uniform' or 'block'")
        no_shadowing("model.transformer_overrides", self.transformer_overrides, TRANSFORMER_SHADOWED)
        check_upstream_keys("model.transformer_overrides", self.transformer_overrides,
                            "megatron.core.transformer", "TransformerConfig")


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel degree (must divide attention heads and KV heads)."""
    pp: int = 1
    """Pipeline-parallel degree (must divide the layer count)."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved schedule); only None for now."""
    cp: int = 1
    """Context-parallel degree; only 1 for now (nothing splits sequences over cp ranks yet)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1 and Transformer Engine)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    ddp_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra megatron.core DistributedDataParallelConfig fields (checked against its fields)."""


    BOUNDS: ClassVar[dict[str, Bound]] = {"tp": AT_LEAST_ONE, "pp": AT_LEAST_ONE, "cp": AT_LEAST_ONE,
                                          "vpp": Bound(2, why="virtual pipeline stages per rank")}

    def __post_init__(self) -> None:
        check_bounds("parallel", self, self.BOUNDS)
        if self.cp != 1:
            fail("parallel.cp", self.cp, CP_UNSUPPORTED)
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            fail("parallel.vpp", self.vpp, f"needs vpp >= 2 and pp >= 2 (pp={self.pp}); or null")
        if self.vpp is not None:
            fail("parallel.vpp", self.vpp, VPP_UNSUPPORTED)
        if self.sequence_parallel and self.tp < 2:
            fail("parallel.sequence_parallel", True, "needs parallel.tp > 1")
        no_shadowing("parallel.ddp_overrides", self.ddp_overrides,
                     {"use_distributed_optimizer": "parallel.use_distributed_optimizer"})
        check_upstream_keys("parallel.ddp_overrides", self.ddp_overrides,
                            "megatron.core.distributed", "DistributedDataParallelConfig")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    min_lr: float = 0.0
    """Floor of the decayed learning rate."""
    warmup_steps: int = 10
    """Linear warm-up, in optimizer steps."""
    lr_decay_style: str = "constant"
    """After warm-up: 'constant', 'linear' or 'cosine' decay to min_lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    clip_grad: float = 1.0
    """Global gradient-norm clip."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    optimizer_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra megatron.core OptimizerConfig fields (checked against its fields)."""


    BOUNDS: ClassVar[dict[str, Bound]] = {
        "lr": POSITIVE, "min_lr": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE,
        "weight_decay": Bound(0, why="torch.optim.AdamW: weight_decay >= 0"), "clip_grad": POSITIVE,
        "adam_beta1": _ADAM_BETA, "adam_beta2": _ADAM_BETA, "adam_eps": Bound(0, why="torch.optim.Adam: eps >= 0"),
    }

    def __post_init__(self) -> None:
        check_bounds("optim", self, self.BOUNDS)
        one_of("optim.lr_decay_style", self.lr_decay_style, ("constant", "linear", "cosine"))
        if self.min_lr > self.lr:
            fail("optim.min_lr", self.min_lr, f"must be <= optim.lr={self.lr}")
        no_shadowing("optim.optimizer_overrides", self.optimizer_overrides, OPTIMIZER_SHADOWED)
        check_upstream_keys("optim.optimizer_overrides", self.optimizer_overrides,
                            "megatron.core.optimizer", "OptimizerConfig")


@dataclass(frozen=True)
class TrainConfig:
    micro_batch_max_tokens: int = 8192
    """Token budget of a micro-batch: its packed row's length, or rows x longest row when padded."""
    logprob_chunk_tokens: int = 4096
    """Response tokens per chunk of the log-prob / entropy computation (bounds its fp32 temporaries)."""
    pack_sequences: bool = True
    """Pack a micro-batch's samples end to end in one row (THD, no padding between them; the
    budget is then the row's total tokens); false: one right-padded row per sample."""


    BOUNDS: ClassVar[dict[str, Bound]] = {"micro_batch_max_tokens": AT_LEAST_ONE, "logprob_chunk_tokens": AT_LEAST_ONE}

    def __post_init__(self) -> None:
        check_bounds("train", self, self.BOUNDS)


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None
    """Ray cluster address to join (e.g. 'auto' or 'head:6379'); None = start a local Ray."""
    num_cpus: int | None = None
    """CPUs of the local Ray (None = all)."""

    BOUNDS: ClassVar[dict[str, Bound]] = {"num_cpus": AT_LEAST_ONE}

    def __post_init__(self) -> None:
        check_bounds("ray", self, self.BOUNDS)
