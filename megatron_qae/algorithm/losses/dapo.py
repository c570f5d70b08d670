"""DAPO: the clipped token-level surrogate (verl's 'vanilla' policy loss), registered as 'dapo'.

What it does: per-token ratio exp(log p - log p_old) with the log-ratio clamped, PPO clip with
the asymmetric range [1 - clip_low, 1 + clip_high] (clip-higher), dual clip at -A * clip_c for
negative advantages, optional truncated importance sampling, reduced by the global token-mean,
so the gradient is independent of how the mini-batch is split into micro-batches and DP ranks.
What it does not: compute advantages or log-probs, add KL / entropy terms (objective.py), or
talk to megatron's schedule (run/train_step.py does).
"""

from __future__ import annotations

import torch

from megatron_qae.algorithm.aggregation import Aggregation
from megatron_qae.algorithm.losses import surrogate as s
from megatron_qae.algorithm.losses.registry import LossInputs, register_policy_loss
from megatron_qae.config.algo import AlgoConfig


@register_policy_loss("dapo", metrics=("loss/dual_clip_tokens",))
def dapo_loss(x: LossInputs, agg: Aggregation, algo: AlgoConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAPO loss of one micro-batch (algo.clip_low, clip_high, clip_c, tis_cap); (loss, metrics),
    metrics as token sums (divided by the trained token count after a cross-rank sum)."""
    mask = s.token_mask(x)
    log_ratio = s.log_ratio(x, clamp=True)
    ratio = log_ratio.exp()
    per_token, clipped = s.clipped_surrogate(x.advantages, ratio, algo.clip_low, algo.clip_high)
    per_token, dual = s.dual_clip(per_token, x.advantages, algo.clip_c)
    loss, per_token = s.weight_and_reduce(per_token, x, agg, algo)
    metrics = s.surrogate_metrics(mask, clipped, log_ratio, ratio, per_token)
    return loss, {**metrics, "loss/dual_clip_tokens": s.token_count(dual, mask)}
