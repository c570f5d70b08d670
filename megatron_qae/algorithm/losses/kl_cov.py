"""KL-Cov: the unclipped surrogate with a |log-ratio| penalty on a few high-covariance tokens,
registered as 'kl_cov'.

What it does: -A * ratio on every response token (no clip, as verl's
`compute_policy_loss_kl_cov`), plus kl_cov_coef * |log p - log p_old| on the tokens
`LossInputs.cov_selected` marks (`cov_selection.kl_cov_pick` over the whole mini-batch);
reduced by the global token-mean. A selected token with zero advantage still has the penalty's
gradient, so zero-advantage skipping is off with this loss. What it does not: pick the tokens
(cov_selection.py) or add KL-to-reference / entropy terms (objective.py).
"""

from __future__ import annotations

import torch

from megatron_qae.algorithm.aggregation import Aggregation
from megatron_qae.algorithm.cov_selection import kl_cov_pick
from megatron_qae.algorithm.losses import surrogate as s
from megatron_qae.algorithm.losses.registry import LossInputs, register_policy_loss
from megatron_qae.config.algo import AlgoConfig


def _pick(advantages: torch.Tensor, logprobs: torch.Tensor, old_logprobs: torch.Tensor, algo: AlgoConfig,
          generator: torch.Generator) -> torch.Tensor:
    # The largest covariances: deterministic, so neither the old log-probs nor the draw matter.
    return kl_cov_pick(advantages, logprobs, algo)


@register_policy_loss("kl_cov", metrics=("loss/cov_selected_tokens",), selection=_pick)
def kl_cov_loss(x: LossInputs, agg: Aggregation, algo: AlgoConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL-Cov loss of one micro-batch (algo.kl_cov_coef, tis_cap; x.cov_selected 1 on the
    penalized tokens); (loss, token-sum metrics)."""
    mask = s.token_mask(x)
    log_ratio = s.log_ratio(x, clamp=False)
    ratio = log_ratio.exp()
    penalty = algo.kl_cov_coef * log_ratio.abs()
    per_token = -x.advantages * ratio + torch.where(x.cov_selected.bool(), penalty, torch.zeros_like(penalty))
    loss, per_token = s.weight_and_reduce(per_token, x, agg, algo)
    return loss, {**s.surrogate_metrics(mask, None, log_ratio, ratio, per_token),
                  "loss/cov_selected_tokens": s.token_count(x.cov_selected, mask)}
