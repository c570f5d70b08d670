"""The DAPO clipped policy-gradient loss with a global token-mean.

What it does: per-token clipped surrogate with asymmetric clip (clip-higher), dual-clip for
negative advantages, optional truncated importance sampling against the rollout engine's
log-probs, summed over response tokens and divided by the token count of the whole global
mini-batch, so the gradient is independent of how the mini-batch is split into micro-batches
and DP ranks. What it does not: compute advantages or log-probs, or talk to megatron's
schedule (train_step.py does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossConfig:
    """Knobs of the policy loss (from config.algo)."""

    clip_low: float = 0.2
    """Lower clip: ratio >= 1 - clip_low for positive advantages."""
    clip_high: float = 0.28
    """Upper clip (DAPO clip-higher): ratio <= 1 + clip_high."""
    clip_c: float | None = 10.0
    """Dual-clip bound for negative advantages (> 1), None disables it."""
    tis_cap: float | None = None
    """Truncated importance sampling cap on exp(old - rollout) log-prob; None disables it."""


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    global_tokens: int,
    cfg: LossConfig,
    rollout_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over masked tokens of the clipped loss, divided by `global_tokens`.

    All tensors are [b, t] over response positions; `mask` is 1 on response tokens.
    Returns (loss, metrics); metrics are token sums (divide by `global_tokens` after a
    cross-rank sum to get the mini-batch mean).
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
    if rollout_logprobs is not None and cfg.tis_cap is not None:
        tis = (old_logprobs - rollout_logprobs).clamp(max=20.0).exp().clamp(max=cfg.tis_cap)
        per_token = per_token * tis.detach()
    loss = (per_token * mask).sum() / global_tokens
    with torch.no_grad():
        metrics = {
            "loss/pg_clip_tokens": (clip_frac * mask).sum(),
            "loss/dual_clip_tokens": (dual_frac * mask).sum(),
            "loss/approx_kl_sum": ((-log_ratio) * mask).sum(),
            "loss/ratio_sum": (ratio * mask).sum(),
            "loss/pg_loss_sum": (per_token * mask).sum(),
        }
    return loss, metrics
