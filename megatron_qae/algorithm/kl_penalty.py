"""KL penalty to a frozen reference policy, per token, with Schulman's estimators.

What it does: estimates KL(pi || pi_ref) at each response token from log p and log p_ref:
k1 = log p - log p_ref; k2 = (log p - log p_ref)^2 / 2; k3 ('low_var_kl') = r - log r - 1
with r = p_ref / p, its log clamped to [-20, 20] and the result to [-10, 10] (verl's
`kl_penalty` estimators, http://joschu.net/blog/kl-approx.html); `kl_term` adds coef times the
estimate's aggregate to the loss, as verl's actor does with use_kl_loss. What it does not:
compute the reference log-probs (the trainer's reference forward, model/reference.py) or put
the KL into the reward.
"""

from __future__ import annotations

import torch

from megatron_qae.algorithm.aggregation import Aggregation

KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate, same shape as the inputs; differentiable in `logprobs`."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if estimator in ("k3", "low_var_kl"):
        log_r = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
        return (log_r.exp() - log_r - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"KL estimator {estimator!r} is not one of {KL_ESTIMATORS}")


def kl_term(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    agg: Aggregation,
    estimator: str,
    coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(coef * aggregated KL estimate, {'loss/kl_ref_sum': token sum of the estimate});
    tensors [b, t], `mask` 1 on response tokens."""
    kl = kl_estimate(logprobs, ref_logprobs, estimator)
    with torch.no_grad():
        metrics = {"loss/kl_ref_sum": torch.where(mask.bool(), kl, torch.zeros_like(kl)).sum()}
    return coef * agg.reduce(kl, mask), metrics
