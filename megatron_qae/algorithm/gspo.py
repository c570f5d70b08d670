"""GSPO: the clipped surrogate with a sequence-level, length-normalized importance ratio.

What it does: s_i = exp(mean over response i's tokens of (log p - log p_old)), clipped to
[1 - gspo_clip_low, 1 + gspo_clip_high] (GSPO's own, much tighter range); the token-level
form sg[s_i] * p / sg[p] carries the gradient of every token of response i, as verl's
`compute_policy_loss_gspo` does, and the loss is averaged per response then over the global
mini-batch's responses (`Aggregation('seq-mean-token-mean')`). A response's ratio needs only
its own tokens, so it is exact under any micro-batch / DP split that keeps responses whole.
What it does not: dual-clip (GSPO has none) or add KL / entropy terms (objective.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_qae.algorithm.aggregation import Aggregation
from megatron_qae.algorithm.loss import truncated_is_weight

if TYPE_CHECKING:  # objective.py imports this module
    from megatron_qae.algorithm.objective import LossConfig


def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    agg: Aggregation,
    cfg: LossConfig,
    rollout_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO loss of one micro-batch; tensors [b, t], `mask` 1 on response tokens.

    `cfg` has gspo_clip_low, gspo_clip_high and tis_cap. Returns (loss, token-sum metrics).
    """
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    lengths = mask.sum(-1).clamp(min=1.0)
    seq_log_ratio = (log_ratio * mask).sum(-1) / lengths
    # Value: the sequence ratio; gradient: d log p of each token (the stop-gradient trick).
    token_log_ratio = logprobs - logprobs.detach() + seq_log_ratio.detach().unsqueeze(-1)
    ratio = token_log_ratio.clamp(max=10.0).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cfg.gspo_clip_low, 1.0 + cfg.gspo_clip_high)
    per_token = torch.maximum(unclipped, clipped)
    tis = truncated_is_weight(old_logprobs, rollout_logprobs, cfg.tis_cap)
    if tis is not None:
        per_token = per_token * tis
    loss = agg.reduce(per_token, mask)
    with torch.no_grad():
        metrics = {
            "loss/pg_clip_tokens": ((clipped > unclipped).to(mask.dtype) * mask).sum(),
            "loss/approx_kl_sum": ((-log_ratio) * mask).sum(),
            "loss/ratio_sum": (ratio * mask).sum(),
            "loss/pg_loss_sum": (per_token * mask).sum(),
        }
    return loss, metrics
