"""Clip-Cov: the clipped surrogate with the gradient of a few high-covariance tokens dropped,
registered as 'clip_cov'.

What it does: the PPO clipped surrogate (clip-higher, no dual clip, unclamped ratio, as verl's
`compute_policy_loss_clip_cov`) times (1 - selected), where `LossInputs.cov_selected` marks the
tokens `cov_selection.clip_cov_pick` drew over the whole mini-batch; reduced by the global
token-mean. What it does not: pick the tokens (cov_selection.py, gathered over DP by
batch/token_selection.py) or add KL / entropy terms (objective.py).
"""

from __future__ import annotations

import torch

from megatron_qae.algorithm.aggregation import Aggregation
from megatron_qae.algorithm.cov_selection import clip_cov_pick
from megatron_qae.algorithm.losses import surrogate as s
from megatron_qae.algorithm.losses.registry import LossInputs, register_policy_loss
from megatron_qae.config.algo import AlgoConfig


@register_policy_loss("clip_cov", metrics=("loss/cov_selected_tokens",), selection=clip_cov_pick)
def clip_cov_loss(x: LossInputs, agg: Aggregation, algo: AlgoConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clip-Cov loss of one micro-batch (algo.clip_low, clip_high, tis_cap; x.cov_selected 1 on
    the tokens whose gradient is dropped); (loss, token-sum metrics)."""
    mask = s.token_mask(x)
    keep = 1.0 - x.cov_selected.to(x.logprobs.dtype)
    log_ratio = s.log_ratio(x, clamp=False)
    ratio = log_ratio.exp()
    per_token, clipped = s.clipped_surrogate(x.advantages, ratio, algo.clip_low, algo.clip_high)
    loss, per_token = s.weight_and_reduce(per_token * keep, x, agg, algo)
    metrics = s.surrogate_metrics(mask, clipped, log_ratio, ratio, per_token)
    return loss, {**metrics, "loss/cov_selected_tokens": s.token_count(x.cov_selected, mask)}
