"""The trainable policy: model chunks in megatron DDP, the optimizer and its LR schedule.

What it does: builds the GPTModel chunks from the HF config, wraps them in megatron-core's
DistributedDataParallel, creates the (optionally distributed) Adam optimizer and the
OptimizerParamScheduler from the config. What it does not: run steps (train_step.py) or
save them (checkpoint.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from megatron_qae.model import build as model_lib
from megatron_qae.model.parallel import ParallelGroups

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.distributed import finalize_model_grads  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402


@dataclass
class Policy:
    """Everything one rank holds of the trained policy."""

    chunks: list[torch.nn.Module]
    """DDP-wrapped GPTModel chunks of this rank (one per virtual pipeline stage)."""
    optimizer: Any
    """megatron MegatronOptimizer (DistributedOptimizer when enabled)."""
    scheduler: OptimizerParamScheduler
    """LR / weight-decay schedule, stepped once per optimizer step."""
    config: TransformerConfig
    hf_config: dict[str, Any]
    groups: ParallelGroups


def _finalize_grads_without_token_scaling(model, num_tokens, **kwargs) -> None:
    # The loss is already divided by the global mini-batch token count (loss.py), so the
    # DP all-reduce must sum, not average, and no further token scaling is applied.
    finalize_model_grads(model, None, **kwargs)


def _with_overrides(cls: type, ours: dict[str, Any], overrides: dict[str, Any], where: str):
    """`cls(**ours)` with `overrides` taking precedence (an override of a field we also set
    wins; unknown fields are an error)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{where} has keys {unknown} that {cls.__name__} does not have")
    return cls(**{**ours, **overrides})


def _wire_overlap(config: TransformerConfig, chunks: list[DistributedDataParallel],
                  ddp_config: DistributedDataParallelConfig) -> None:
    """Hand megatron's schedule the DDP hooks that make overlap_grad_reduce /
    overlap_param_gather overlap, as megatron's own training loop does
    (megatron/training/training.py: no_sync_func and grad_sync_func with overlap_grad_reduce,
    param_sync_func with overlap_param_gather + align_param_gather). Without no_sync_func
    every micro-batch's backward would start the gradient reduction."""
    def one_or_list(funcs: list):
        return funcs[0] if len(funcs) == 1 else funcs

    if ddp_config.overlap_grad_reduce:
        config.no_sync_func = one_or_list([c.no_sync for c in chunks])
        config.grad_sync_func = one_or_list([c.start_grad_sync for c in chunks])
    if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
        config.param_sync_func = one_or_list([c.start_param_sync for c in chunks])


def finish_param_sync(policy: Policy) -> None:
    """Bring every parameter up to the optimizer's last step.

    With overlap_param_gather the distributed optimizer updates only this rank's shard and
    leaves the all-gather to the forward pre-hooks of the next training forward (after
    zero_grad_buffer). Whatever reads parameters otherwise (the old-log-prob pass, weight
    sync, checkpoints) calls this first; without overlap it does nothing."""
    for chunk in policy.chunks:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def transformer_config_from(cfg, hf: dict[str, Any], groups: ParallelGroups) -> TransformerConfig:
    """TransformerConfig of the policy from the run config (`cfg.model`, `cfg.parallel`)."""
    m, p = cfg.model, cfg.parallel
    config = model_lib.build_transformer_config(
        hf,
        groups.dims,
        params_dtype=m.params_dtype,
        fp8=m.fp8,
        fp8_recipe=m.fp8_recipe,
        sequence_parallel=p.sequence_parallel,
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
        overrides={"calculate_per_token_loss": True, **dict(m.transformer_overrides)},
    )
    config.finalize_model_grads_func = _finalize_grads_without_token_scaling
    return config


def build_policy(cfg, hf: dict[str, Any], groups: ParallelGroups, total_steps: int) -> Policy:
    """Model chunks + DDP + optimizer + scheduler for this rank."""
    config = transformer_config_from(cfg, hf, groups)
    chunks = model_lib.build_model_chunks(hf, config, cfg.model.transformer_impl)
    ddp_config = _with_overrides(DistributedDataParallelConfig, dict(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    ), dict(cfg.parallel.ddp_overrides), "parallel.ddp_overrides")
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk)
        for chunk in chunks
    ]
    _wire_overlap(config, wrapped, ddp_config)
    o = cfg.optim
    opt_config = _with_overrides(OptimizerConfig, dict(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        # The optimizer's copy of DDP's overlap flag: it decides whether step() all-gathers.
        overlap_param_gather=ddp_config.overlap_param_gather,
    ), dict(o.optimizer_overrides), "optim.optimizer_overrides")
    optimizer = get_megatron_optimizer(opt_config, wrapped)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps > 0 else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(total_steps, o.warmup_steps + 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    return Policy(wrapped, optimizer, scheduler, config, hf, groups)
