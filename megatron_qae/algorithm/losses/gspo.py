"""GSPO: the clipped surrogate with a sequence-level, length-normalized ratio, registered as 'gspo'.

What it does: s_i = exp(mean over response i's tokens of (log p - log p_old)), clipped to
[1 - gspo_clip_low, 1 + gspo_clip_high] (GSPO's own, much tighter range); the token-level
form sg[s_i] * p / sg[p] carries the gradient of every token of response i, as verl's
`compute_policy_loss_gspo` does, and the loss is averaged per response then over the global
mini-batch's responses ('seq-mean-token-mean'). A response's ratio needs only its own tokens,
so it is exact under any micro-batch / DP split that keeps responses whole. What it does not:
dual-clip (GSPO has none) or add KL / entropy terms (objective.py).
"""

from __future__ import annotations

import torch

from megatron_qae.algorithm.aggregation import Aggregation
from megatron_qae.algorithm.losses import surrogate as s
from megatron_qae.algorithm.losses.registry import LossInputs, register_policy_loss
from megatron_qae.config.algo import AlgoConfig


@register_policy_loss("gspo", agg_mode="seq-mean-token-mean")
def gspo_loss(x: LossInputs, agg: Aggregation, algo: AlgoConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO loss of one micro-batch (algo.gspo_clip_low, gspo_clip_high, tis_cap); (loss,
    token-sum metrics)."""
    mask = s.token_mask(x)
    log_ratio = s.log_ratio(x, clamp=False)
    lengths = mask.sum(-1).clamp(min=1.0)
    seq_log_ratio = (log_ratio * mask).sum(-1) / lengths
    # Value: the sequence ratio; gradient: d log p of each token (the stop-gradient trick).
    token_log_ratio = x.logprobs - x.logprobs.detach() + seq_log_ratio.detach().unsqueeze(-1)
    ratio = token_log_ratio.clamp(max=10.0).exp()
    per_token, clipped = s.clipped_surrogate(x.advantages, ratio, algo.gspo_clip_low, algo.gspo_clip_high)
    loss, per_token = s.weight_and_reduce(per_token, x, agg, algo)
    return loss, s.surrogate_metrics(mask, clipped, log_ratio, ratio, per_token)
