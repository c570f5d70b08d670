"""The pieces every clipped-surrogate policy loss shares, written once.

What it does: the token log-ratio (optionally clamped so exp cannot overflow), the PPO clip
with its asymmetric range (clip-higher), the dual clip for negative advantages, truncated
importance sampling against the rollout engine's log-probs (capped at algo.tis_cap), the
reduction of the weighted per-token loss by the mini-batch's `Aggregation`, and the token-sum
metrics (clipped tokens, approx KL, ratio, per-token loss) every loss reports. Each helper is
the exact float sequence the losses ran before it was shared, so their values and gradients
are bit for bit what they were. What it does not: decide which pieces a loss uses (each loss
module does) or know about micro-batches or ranks.
"""

from __future__ import annotations

import torch

from megatron_qae.algorithm.aggregation import Aggregation
from megatron_qae.algorithm.losses.registry import LossInputs
from megatron_qae.config.algo import AlgoConfig

LOG_RATIO_CLAMP = 20.0
"""|log p - log p_old| bound of the clamped log-ratio: exp(20) is finite in fp32."""
COMMON_METRICS = ("loss/pg_clip_tokens", "loss/approx_kl_sum", "loss/ratio_sum", "loss/pg_loss_sum")
"""Token-sum metrics every policy loss returns (`surrogate_metrics`)."""


def token_mask(x: LossInputs) -> torch.Tensor:
    """The response mask [b, t] in the log-probs' dtype (the metrics multiply by it)."""
    return x.mask.to(x.logprobs.dtype)


def log_ratio(x: LossInputs, clamp: bool) -> torch.Tensor:
    """log p - log p_old [b, t]; clamped to +-LOG_RATIO_CLAMP when `clamp`."""
    diff = x.logprobs - x.old_logprobs
    return diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) if clamp else diff


def clipped_surrogate(advantages: torch.Tensor, ratio: torch.Tensor, low: float,
                      high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(max(-A * r, -A * clip(r, 1 - low, 1 + high)), bool [b, t] where the clip is active)."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - low, 1.0 + high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def dual_clip(per_token: torch.Tensor, advantages: torch.Tensor,
              clip_c: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss bounded by -A * clip_c where A < 0, bool [b, t] where that bound acts);
    unchanged with clip_c None."""
    if clip_c is None:
        return per_token, torch.zeros_like(per_token, dtype=torch.bool)
    bound = -advantages * clip_c
    active = (advantages < 0) & (per_token > bound)
    return torch.where(advantages < 0, torch.minimum(per_token, bound), per_token), active


def truncated_is_weight(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor | None,
                        cap: float | None) -> torch.Tensor | None:
    """exp(old - rollout) capped at `cap` (no gradient), or None when TIS is off."""
    if rollout_logprobs is None or cap is None:
        return None
    return (old_logprobs - rollout_logprobs).clamp(max=LOG_RATIO_CLAMP).exp().clamp(max=cap).detach()


def weight_and_reduce(per_token: torch.Tensor, x: LossInputs, agg: Aggregation,
                      algo: AlgoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(this micro-batch's share of the mini-batch loss, the TIS-weighted per-token loss [b, t])."""
    tis = truncated_is_weight(x.old_logprobs, x.rollout_logprobs, algo.tis_cap)
    if tis is not None:
        per_token = per_token * tis
    return agg.reduce(per_token, token_mask(x)), per_token


@torch.no_grad()
def token_count(flags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How many response tokens `flags` [b, t] (bool or 0/1) marks."""
    return (flags.to(mask.dtype) * mask).sum()


@torch.no_grad()
def surrogate_metrics(mask: torch.Tensor, clipped: torch.Tensor | None, log_ratio: torch.Tensor,
                      ratio: torch.Tensor, per_token: torch.Tensor) -> dict[str, torch.Tensor]:
    """The COMMON_METRICS token sums; `clipped` None for a loss without a clip (counts 0)."""
    clip_tokens = (token_count(clipped, mask) if clipped is not None
                   else torch.zeros((), dtype=mask.dtype, device=mask.device))
    return {
        "loss/pg_clip_tokens": clip_tokens,
        "loss/approx_kl_sum": ((-log_ratio) * mask).sum(),
        "loss/ratio_sum": (ratio * mask).sum(),
        "loss/pg_loss_sum": (per_token * mask).sum(),
    }
