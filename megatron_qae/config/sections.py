"""The sections of the run config (see config.py for loading and cross-field checks).

What it does: one frozen dataclass per section, a docstring per field, per-field validation
in `__post_init__` (ValueError naming field, value and fix). What it does not: load files.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any


def _fail(name: str, value: Any, fix: str) -> None:
    raise ValueError(f"{name}={value!r}: {fix}")


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        _fail(name, value, f"use one of {list(allowed)}")


def _positive(name: str, value: float, strict: bool = True) -> None:
    if value < 0 or (strict and value == 0):
        _fail(name, value, "must be > 0" if strict else "must be >= 0")


def check_upstream_keys(name: str, keys: dict[str, Any], upstream: type) -> None:
    """Raise when `keys` has names that the megatron-core dataclass `upstream` lacks."""
    known = {f.name for f in dataclasses.fields(upstream)}
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            _fail(f"{name}.{key}", keys[key],
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
    """Evaluate avg@k / pass@k on data.val_path every N rollout steps (0 = never)."""
    eval_n_samples: int = 4
    """k of avg@k and pass@k: responses sampled per validation prompt."""
    log_tensorboard: bool = True
    """Also write TensorBoard scalars to run_dir/tensorboard (metrics.jsonl is always written)."""
    wandb_project: str | None = None
    """Weights & Biases project to log to (None = off; needs `pip install wandb`)."""
    progress_bar: bool = True
    """Show a tqdm progress bar with the key metrics on rank 0."""
    resume_from_damaged: str = "fallback"
    """A damaged latest checkpoint (digest mismatch, missing or truncated file): 'fallback' resumes from the newest intact one with a warning; 'fail' stops."""
    collective_timeout_s: float = 1800.0
    """Timeout of collectives between trainer ranks (NCCL / gloo); a hang fails after it."""
    rollout_wait_timeout_s: float = 21600.0
    """How long trainer ranks wait for rank 0's rollout / eval hand-off (its own gloo group)."""

    def __post_init__(self) -> None:
        _positive("run.num_rollout_steps", self.num_rollout_steps)
        _positive("run.save_interval_steps", self.save_interval_steps, strict=False)
        _positive("run.keep_last_checkpoints", self.keep_last_checkpoints)
        _positive("run.eval_interval_steps", self.eval_interval_steps, strict=False)
        _positive("run.eval_n_samples", self.eval_n_samples)
        _one_of("run.resume_from_damaged", self.resume_from_damaged, ("fallback", "fail"))
        _positive("run.collective_timeout_s", self.collective_timeout_s)
        if self.rollout_wait_timeout_s < self.collective_timeout_s:
            _fail("run.rollout_wait_timeout_s", self.rollout_wait_timeout_s,
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

    def __post_init__(self) -> None:
        _one_of("model.params_dtype", self.params_dtype, ("float32", "bfloat16"))
        _one_of("model.fp8", self.fp8, (None, "hybrid", "e4m3"))
        _one_of("model.fp8_recipe", self.fp8_recipe, ("tensorwise", "delayed", "blockwise", "mxfp8"))
        _one_of("model.transformer_impl", self.transformer_impl, ("auto", "local", "transformer_engine"))
        _one_of("model.recompute_granularity", self.recompute_granularity, (None, "full", "selective"))
        _one_of("model.recompute_method", self.recompute_method, (None, "uniform", "block"))
        if self.recompute_granularity == "full" and self.recompute_method is None:
            _fail("model.recompute_method", None, "full recompute needs 'uniform' or 'block'")
        from megatron.core.transformer import TransformerConfig

        check_upstream_keys("model.transformer_overrides", self.transformer_overrides, TransformerConfig)


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

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp"):
            _positive(f"parallel.{name}", getattr(self, name))
        from megatron_qae.model.parallel import CP_UNSUPPORTED, VPP_UNSUPPORTED

        if self.cp != 1:
            _fail("parallel.cp", self.cp, CP_UNSUPPORTED)
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            _fail("parallel.vpp", self.vpp, f"needs vpp >= 2 and pp >= 2 (pp={self.pp}); or null")
        if self.vpp is not None:
            _fail("parallel.vpp", self.vpp, VPP_UNSUPPORTED)
        if self.sequence_parallel and self.tp < 2:
            _fail("parallel.sequence_parallel", True, "needs parallel.tp > 1")
        from megatron.core.distributed import DistributedDataParallelConfig

        check_upstream_keys("parallel.ddp_overrides", self.ddp_overrides, DistributedDataParallelConfig)

    def dp(self, world_size: int) -> int:
        """Data-parallel degree for a world of `world_size` ranks."""
        mp = self.tp * self.pp * self.cp
        if world_size % mp:
            raise ValueError(f"world size {world_size} is not divisible by tp*pp*cp = {mp}; "
                             f"launch a multiple of {mp} processes or change parallel.*")
        return world_size // mp


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

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.min_lr", self.min_lr, strict=False)
        _positive("optim.warmup_steps", self.warmup_steps, strict=False)
        _one_of("optim.lr_decay_style", self.lr_decay_style, ("constant", "linear", "cosine"))
        _positive("optim.clip_grad", self.clip_grad)
        if self.min_lr > self.lr:
            _fail("optim.min_lr", self.min_lr, f"must be <= optim.lr={self.lr}")
        from megatron.core.optimizer import OptimizerConfig

        check_upstream_keys("optim.optimizer_overrides", self.optimizer_overrides, OptimizerConfig)


@dataclass(frozen=True)
class AlgoConfig:
    baseline: str = "quantile"
    """Group baseline: 'quantile' (QAE) or 'mean' (GRPO / DAPO)."""
    quantile_k: float = 0.4
    """K of the QAE baseline, in (0, 1); raise to 0.6 if entropy collapses early."""
    quantile_method: str = "linear"
    """'linear' (torch.quantile, as the public code) or 'inverted_cdf' (the paper's definition)."""
    quantile_source: str = "score"
    """Quantile over 'score' (shaped reward) or 'accuracy' (0/1 correctness before shaping)."""
    norm_adv_by_std: bool = True
    """Divide advantages by the group's unbiased std (+ adv_eps)."""
    adv_eps: float = 1e-6
    """Epsilon of the std normalization."""
    clip_low: float = 0.2
    """PPO clip below: ratio >= 1 - clip_low."""
    clip_high: float = 0.28
    """PPO clip above (DAPO clip-higher): ratio <= 1 + clip_high."""
    clip_c: float | None = 10.0
    """Dual-clip bound for negative advantages (> 1); None disables it."""
    tis_cap: float | None = None
    """Truncated importance-sampling cap on trainer/rollout probability ratios; None = off."""
    skip_zero_advantage: bool = True
    """Leave responses with advantage exactly 0 out of forward/backward (same update)."""
    kl_coef: float = 0.0
    """KL penalty coefficient (DAPO: 0; any other value is not supported yet and rejected)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (DAPO: 0; any other value is not supported yet and rejected)."""

    def __post_init__(self) -> None:
        _one_of("algo.baseline", self.baseline, ("quantile", "mean"))
        if self.baseline == "quantile" and not 0.0 < self.quantile_k < 1.0:
            _fail("algo.quantile_k", self.quantile_k, "must be in (0, 1) with baseline=quantile "
                  "(0.4 recommended), or set algo.baseline=mean for GRPO/DAPO")
        _one_of("algo.quantile_method", self.quantile_method, ("linear", "inverted_cdf"))
        _one_of("algo.quantile_source", self.quantile_source, ("score", "accuracy"))
        _positive("algo.clip_low", self.clip_low)
        _positive("algo.clip_high", self.clip_high)
        if self.clip_c is not None and self.clip_c <= 1.0:
            _fail("algo.clip_c", self.clip_c, "dual clip needs c > 1 (DAPO uses 10), or null")
        if self.tis_cap is not None and self.tis_cap <= 0:
            _fail("algo.tis_cap", self.tis_cap, "must be > 0, or null")
        for name in ("kl_coef", "entropy_coef"):
            if getattr(self, name) != 0.0:
                _fail(f"algo.{name}", getattr(self, name), "the DAPO loss has no such term; set 0")

    @property
    def effective_quantile_k(self) -> float:
        """K passed to the advantage (-1 = mean baseline)."""
        return self.quantile_k if self.baseline == "quantile" else -1.0

    @property
    def can_skip_zero_advantage(self) -> bool:
        """Zero-advantage responses give exactly zero gradient only without KL / entropy terms."""
        return self.skip_zero_advantage and self.kl_coef == 0.0 and self.entropy_coef == 0.0


@dataclass(frozen=True)
class RolloutConfig:
    n_samples_per_prompt: int = 16
    """Responses per prompt (the group size G)."""
    prompts_per_step: int = 512
    """Groups kept per rollout step (the train batch, in prompts)."""
    mini_batch_prompts: int = 32
    """Prompts per optimizer step; prompts_per_step / mini_batch_prompts steps per rollout."""
    gen_batch_prompts: int = 1536
    """Prompts generated per generation batch (over-sampling for dynamic sampling)."""
    max_gen_batches: int = 10
    """Generation batches per rollout step before giving up on filling the batch."""
    on_underfilled: str = "train"
    """When max_gen_batches run out with fewer than prompts_per_step groups kept: 'train' on the groups kept (warns, logs rollout/underfilled), 'fail' stops (DAPO's strict behaviour)."""
    dynamic_sampling: bool = True
    """Drop groups whose accuracy is all-equal (all right or all wrong) and refill."""
    max_prompt_tokens: int = 2048
    """Longest prompt (longer ones are filtered out of the data set)."""
    max_response_tokens: int = 20480
    """max_new_tokens of generation."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts (log-probs are taken at this temperature)."""
    top_p: float = 1.0
    """Nucleus sampling of training rollouts."""
    top_k: int = -1
    """Top-k sampling of training rollouts (-1 = off)."""
    val_temperature: float = 1.0
    """Sampling temperature of evaluation."""
    val_top_p: float = 0.7
    """Nucleus sampling of evaluation."""

    def __post_init__(self) -> None:
        for name in ("n_samples_per_prompt", "prompts_per_step", "mini_batch_prompts",
                     "gen_batch_prompts", "max_gen_batches", "max_prompt_tokens", "max_response_tokens"):
            _positive(f"rollout.{name}", getattr(self, name))
        _one_of("rollout.on_underfilled", self.on_underfilled, ("train", "fail"))
        if self.prompts_per_step % self.mini_batch_prompts:
            _fail("rollout.mini_batch_prompts", self.mini_batch_prompts,
                  f"must divide rollout.prompts_per_step={self.prompts_per_step}")
        for name in ("temperature", "val_temperature"):
            _positive(f"rollout.{name}", getattr(self, name))
        for name in ("top_p", "val_top_p"):
            if not 0.0 < getattr(self, name) <= 1.0:
                _fail(f"rollout.{name}", getattr(self, name), "must be in (0, 1]")

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps per rollout step."""
        return self.prompts_per_step // self.mini_batch_prompts


@dataclass(frozen=True)
class EngineConfig:
    backend: str = "cpu"
    """'sglang' (sglang.launch_server, GPU) or 'cpu' (our server with the same HTTP API)."""
    num_engines: int = 1
    """Rollout engines (each a server process run by a Ray actor)."""
    engine_tp: int = 1
    """Tensor-parallel size of each engine (GPUs per engine)."""
    colocate: bool = False
    """Engines share the trainer's GPUs: one engine TP rank per trainer rank (num_engines x
    engine_tp = trainer world size), memory released during training, weights passed by
    handle (update_weights_from_tensor)."""
    offload_train_state: bool = True
    """Colocated: while the engines generate, free the trainer's gradient buffers and keep its
    optimizer state (moments, fp32 main params) in host memory, restored bit for bit before
    training (model/offload.py); ignored unless colocate."""
    mem_fraction_static: float = 0.8
    """SGLang --mem-fraction-static (weights + KV cache share of GPU memory)."""
    sglang_args: dict[str, Any] = field(default_factory=dict)
    """Extra sglang.launch_server arguments by SGLang's own ServerArgs names, passed as
    --key value (checked against SGLang's parser when sglang is importable). `device: cpu`
    (with `max_total_tokens`) serves real SGLang on CPU with the tools/sglang_cpu stand-in."""
    sglang_python: str | None = None
    """Python interpreter that runs sglang.launch_server (e.g. .venv-sglang/bin/python when
    SGLang lives in its own venv); None = the trainer's own interpreter."""
    host: str = "127.0.0.1"
    """Address the engines listen on."""
    port_base: int = 30000
    """First port tried for engine servers."""
    startup_timeout_s: float = 300.0
    """Seconds an engine may take to become healthy."""
    request_timeout_s: float = 600.0
    """HTTP timeout of one engine request."""
    max_restarts: int = 3
    """Restarts allowed per engine before the run fails."""
    weight_sync_bucket_bytes: int = 512 * 1024 * 1024
    """Bytes per weight-sync bucket (one HTTP update request each)."""
    max_running_requests: int | None = None
    """SGLang --max-running-requests, None = SGLang's default."""

    def __post_init__(self) -> None:
        _one_of("engine.backend", self.backend, ("cpu", "sglang"))
        _positive("engine.num_engines", self.num_engines)
        _positive("engine.engine_tp", self.engine_tp)
        if not 0.0 < self.mem_fraction_static < 1.0:
            _fail("engine.mem_fraction_static", self.mem_fraction_static, "must be in (0, 1)")
        _positive("engine.weight_sync_bucket_bytes", self.weight_sync_bucket_bytes)


@dataclass(frozen=True)
class RewardConfig:
    name: str = "dapo_math"
    """'dapo_math' (verl's DAPO grading, +1/-1), 'dapo_math_strict_box', 'math_verify', 'arithmetic' (demo), or 'package.module:function' (docs/rewards.md)."""
    overlong_buffer_enable: bool = True
    """DAPO overlong penalty: linear in the last overlong_buffer_tokens before the max length."""
    overlong_buffer_tokens: int = 4096
    """Length of the penalty buffer, in tokens."""
    overlong_penalty_factor: float = 1.0
    """Penalty at the max length (the penalty grows linearly to -factor)."""
    num_workers: int = 2
    """Processes scoring responses (math-verify needs a main thread, so always processes)."""
    timeout_s: float = 30.0
    """Seconds one response's reward may take; past it the worker is killed and the response gets failure_score."""
    failure_score: float = -1.0
    """Score (accuracy 0) of a response whose reward raised, timed out, or returned a non-number or NaN; counted in reward/errors."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.failure_score):
            _fail("reward.failure_score", self.failure_score, "must be a finite number, e.g. -1.0")
        _positive("reward.timeout_s", self.timeout_s)
        _positive("reward.overlong_buffer_tokens", self.overlong_buffer_tokens)
        _positive("reward.overlong_penalty_factor", self.overlong_penalty_factor, strict=False)
        _positive("reward.num_workers", self.num_workers)


@dataclass(frozen=True)
class DataConfig:
    train_path: str = ""
    """Training prompts: parquet (DAPO-Math-17k / verl schema) or jsonl."""
    val_path: str | None = None
    """Validation prompts for avg@k / pass@k (same formats), None = no evaluation."""
    prompt_key: str = "prompt"
    """Column holding the prompt (chat messages or a string)."""
    answer_key: str = "reward_model.ground_truth"
    """Dotted path to the ground-truth answer in a row."""
    apply_chat_template: bool = True
    """Apply the tokenizer's chat template (with the generation prompt)."""
    shuffle: bool = True
    """Shuffle prompts each epoch (deterministically from `seed`)."""
    seed: int = 1234
    """Seed of the prompt order."""


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None
    """Ray cluster address to join (e.g. 'auto' or 'head:6379'); None = start a local Ray."""
    num_cpus: int | None = None
    """CPUs of the local Ray (None = all)."""


@dataclass(frozen=True)
class TrainConfig:
    micro_batch_max_tokens: int = 8192
    """Token budget of a micro-batch (rows x longest row), padding kept small by sorting."""
    logprob_chunk_tokens: int = 4096
    """Response tokens per chunk of the log-prob / entropy computation (bounds its fp32 temporaries)."""

    def __post_init__(self) -> None:
        _positive("train.micro_batch_max_tokens", self.micro_batch_max_tokens)
        _positive("train.logprob_chunk_tokens", self.logprob_chunk_tokens)
