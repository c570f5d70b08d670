"""KL-Cov: the unclipped surrogate with a |log-ratio| penalty on a few high-covariance tokens.

What it does: -A * ratio on every response token (no clip, as verl's
`compute_policy_loss_kl_cov`), plus kl_cov_coef * |log p - log p_old| on the tokens `selected`
[b, t] marks (`cov_selection.kl_cov_pick` over the whole mini-batch); reduced by the global
token-mean. A selected token with zero advantage still has the penalty's gradient, so
zero-advantage skipping is off with this loss. What it does not: pick the tokens
(cov_selection.py) or add KL-to-reference / entropy terms (objective.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_qae.algorithm.aggregation import Aggregation
from megatron_qae.algorithm.loss import truncated_is_weight

if TYPE_CHECKING:  # objective.py imports this module
    from megatron_qae.algorithm.objective import LossConfig


def kl_cov_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    selected: torch.Tensor,
    agg: Aggregation,
    cfg: LossConfig,
    rollout_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL-Cov loss of one micro-batch; tensors [b, t], `mask` 1 on response tokens,
    `selected` 1 on the penalized tokens. `cfg` has kl_cov_coef, tis_cap. Returns (loss,
    token-sum metrics)."""
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    penalty = cfg.kl_cov_coef * log_ratio.abs()
    per_token = -advantages * ratio + torch.where(selected.bool(), penalty, torch.zeros_like(penalty))
    tis = truncated_is_weight(old_logprobs, rollout_logprobs, cfg.tis_cap)
    if tis is not None:
        per_token = per_token * tis
    loss = agg.reduce(per_token, mask)
    with torch.no_grad():
        metrics = {
            "loss/pg_clip_tokens": torch.zeros((), dtype=mask.dtype, device=mask.device),
            "loss/cov_selected_tokens": (selected.to(mask.dtype) * mask).sum(),
            "loss/approx_kl_sum": ((-log_ratio) * mask).sum(),
            "loss/ratio_sum": (ratio * mask).sum(),
            "loss/pg_loss_sum": (per_token * mask).sum(),
        }
    return loss, metrics
