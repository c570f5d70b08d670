"""The DAPO clipped policy-gradient loss (verl's 'vanilla' policy loss).

What it does: per-token clipped surrogate with asymmetric clip (clip-higher), dual-clip for
negative advantages, optional truncated importance sampling against the rollout engine's
log-probs, reduced by the mini-batch's `Aggregation` (the global token-mean), so the gradient
is independent of how the mini-batch is split into micro-batches and DP ranks. What it does
not: compute advantages or log-probs, add KL / entropy terms (objective.py), or talk to
megatron's schedule (train_step.py does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_qae.algorithm.aggregation import Aggregation

if TYPE_CHECKING:  # objective.py imports this module
    from megatron_qae.algorithm.objective import LossConfig


def truncated_is_weight(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor | None,
                        cap: float | None) -> torch.Tensor | None:
    """exp(old - rollout) capped at `cap` (no gradient), or None when TIS is off."""
    if rollout_logprobs is None or cap is None:
        return None
    return (old_logprobs - rollout_logprobs).clamp(max=20.0).exp().clamp(max=cap).detach()


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    agg: Aggregation,
    cfg: LossConfig,
    rollout_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAPO loss of one micro-batch; tensors [b, t] over positions, `mask` 1 on response tokens.

    `cfg` has clip_low, clip_high, clip_c and tis_cap (objective.LossConfig). Returns (loss,
    metrics); metrics are token sums (divided by the trained token count after a cross-rank sum).
    """
    mask = mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    per_token = torch.maximum(unclipped, clipped)
    clip_frac = (clipped > unclipped).to(mask.dtype)
    dual_frac = torch.zeros_like(mask)
    if cfg.clip_c is not None:
        # Dual clip: for negative advantages the loss is bounded by -A * c.
        bound = -advantages * cfg.clip_c
        dual_active = (advantages < 0) & (per_token > bound)
        per_token = torch.where(advantages < 0, torch.minimum(per_token, bound), per_token)
        dual_frac = dual_active.to(mask.dtype)
    tis = truncated_is_weight(old_logprobs, rollout_logprobs, cfg.tis_cap)
    if tis is not None:
        per_token = per_token * tis
    loss = agg.reduce(per_token, mask)
    with torch.no_grad():
        metrics = {
            "loss/pg_clip_tokens": (clip_frac * mask).sum(),
            "loss/dual_clip_tokens": (dual_frac * mask).sum(),
            "loss/approx_kl_sum": ((-log_ratio) * mask).sum(),
            "loss/ratio_sum": (ratio * mask).sum(),
            "loss/pg_loss_sum": (per_token * mask).sum(),
        }
    return loss, metrics
