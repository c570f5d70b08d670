"""The training objective: the registered policy loss, plus the optional KL-to-reference and
entropy terms.

What it does: `total_loss` is the one place the train step calls: the policy loss that
algo.policy_loss names (looked up in losses/registry.py) plus kl_coef * KL(pi || pi_ref) plus
-entropy_coef * entropy, all reduced with the same `Aggregation` (`aggregation` builds it in
the loss's mode: token-mean, or sequence-mean for GSPO as verl's GSPO recipe does), returning
(loss, token-sum metrics). It reads the `algo` config section directly. `zero_advantage_gradient`
says why a configuration gives a zero-advantage response a gradient (then skipping such
responses would change the step). What it does not: compute log-probs, reference log-probs or
the covariance selection (the train step hands them in), or know about micro-batches.
"""

from __future__ import annotations

import torch

from megatron_qae.algorithm.aggregation import Aggregation
from megatron_qae.algorithm.entropy_bonus import entropy_term
from megatron_qae.algorithm.kl_penalty import kl_term
from megatron_qae.algorithm.losses.registry import LossInputs, get_policy_loss
from megatron_qae.algorithm.losses.surrogate import COMMON_METRICS
from megatron_qae.config.algo import AlgoConfig


def aggregation(algo: AlgoConfig, global_tokens: int, global_samples: int = 0) -> Aggregation:
    """The reduction of one global mini-batch in the mode of algo.policy_loss."""
    return Aggregation(get_policy_loss(algo.policy_loss).agg_mode, global_tokens, global_samples)


def needs_selection(algo: AlgoConfig) -> bool:
    """Whether algo.policy_loss reads a mini-batch-wide token selection (Clip-Cov, KL-Cov)."""
    return get_policy_loss(algo.policy_loss).selection is not None


def total_loss(x: LossInputs, agg: Aggregation, algo: AlgoConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss + KL-to-reference + entropy bonus of one micro-batch; (loss, token-sum metrics)."""
    if needs_selection(algo) and x.cov_selected is None:
        raise ValueError(f"algo.policy_loss={algo.policy_loss!r} needs the covariance selection of the "
                         "mini-batch (the train step attaches it before the forward pass)")
    loss, metrics = get_policy_loss(algo.policy_loss).fn(x, agg, algo)
    if algo.kl_coef > 0.0:
        if x.ref_logprobs is None:
            raise ValueError(f"algo.kl_coef={algo.kl_coef} needs reference log-probs; none reached the loss")
        kl, kl_metrics = kl_term(x.logprobs, x.ref_logprobs, x.mask, agg, algo.kl_estimator, algo.kl_coef)
        loss, metrics = loss + kl, {**metrics, **kl_metrics}
    if algo.entropy_coef > 0.0:
        if x.entropy is None:
            raise ValueError(f"algo.entropy_coef={algo.entropy_coef} needs the per-token entropy")
        bonus, _ = entropy_term(x.entropy, x.mask, agg, algo.entropy_coef)
        loss = loss + bonus
    return loss, metrics


def metric_names(algo: AlgoConfig) -> list[str]:
    """The token-sum metric names `total_loss` returns for `algo` (the same on every rank)."""
    names = [*COMMON_METRICS, *get_policy_loss(algo.policy_loss).metrics]
    if algo.kl_coef > 0.0:
        names.append("loss/kl_ref_sum")
    return names


def zero_advantage_gradient(algo: AlgoConfig) -> str | None:
    """Why a response with advantage exactly 0 still changes the step under `algo`, or None
    when it does not (then leaving it out of forward/backward is exact)."""
    reasons = []
    if algo.kl_coef > 0.0:
        reasons.append(f"the KL penalty (kl_coef={algo.kl_coef}) has a gradient at every token")
    if algo.entropy_coef > 0.0:
        reasons.append(f"the entropy bonus (entropy_coef={algo.entropy_coef}) has a gradient at every token")
    if needs_selection(algo):
        reasons.append(f"{algo.policy_loss}'s covariance selection is over every token of the mini-batch")
    return "; ".join(reasons) or None
