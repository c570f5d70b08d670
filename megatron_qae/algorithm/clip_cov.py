"""Clip-Cov: the clipped surrogate with the gradient of a few high-covariance tokens dropped.

What it does: the PPO clipped surrogate (clip-higher, no dual clip, unclamped ratio, as verl's
`compute_policy_loss_clip_cov`) times (1 - selected), where `selected` [b, t] marks the tokens
`cov_selection.clip_cov_pick` drew over the whole mini-batch; reduced by the global token-mean.
What it does not: pick the tokens (cov_selection.py) or add KL / entropy terms (objective.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_qae.algorithm.aggregation import Aggregation
from megatron_qae.algorithm.loss import truncated_is_weight

if TYPE_CHECKING:  # objective.py imports this module
    from megatron_qae.algorithm.objective import LossConfig


def clip_cov_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    selected: torch.Tensor,
    agg: Aggregation,
    cfg: LossConfig,
    rollout_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clip-Cov loss of one micro-batch; tensors [b, t], `mask` 1 on response tokens,
    `selected` 1 on the tokens whose gradient is dropped. `cfg` has clip_low, clip_high,
    tis_cap. Returns (loss, token-sum metrics)."""
    mask = mask.to(logprobs.dtype)
    keep = 1.0 - selected.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    per_token = torch.maximum(unclipped, clipped) * keep
    tis = truncated_is_weight(old_logprobs, rollout_logprobs, cfg.tis_cap)
    if tis is not None:
        per_token = per_token * tis
    loss = agg.reduce(per_token, mask)
    with torch.no_grad():
        metrics = {
            "loss/pg_clip_tokens": ((clipped > unclipped).to(mask.dtype) * mask).sum(),
            "loss/cov_selected_tokens": ((1.0 - keep) * mask).sum(),
            "loss/approx_kl_sum": ((-log_ratio) * mask).sum(),
            "loss/ratio_sum": (ratio * mask).sum(),
            "loss/pg_loss_sum": (per_token * mask).sum(),
        }
    return loss, metrics
