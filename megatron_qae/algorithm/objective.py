"""The training objective: which policy loss, plus the optional KL-to-reference and entropy terms.

What it does: `LossConfig` holds every loss knob (from config.algo); `total_loss` is the one
place the train step calls: the selected policy loss (DAPO, GSPO, Clip-Cov or KL-Cov) plus
kl_coef * KL(pi || pi_ref) plus -entropy_coef * entropy, all reduced with the same
`Aggregation` (token-mean, sequence-mean for GSPO as verl's GSPO recipe does), returning
(loss, token-sum metrics). `zero_advantage_gradient` says why a configuration gives a
zero-advantage response a gradient (then skipping such responses would change the step).
What it does not: compute log-probs, reference log-probs or the covariance selection (the
train step hands them in), or know about micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_qae.algorithm.aggregation import Aggregation
from megatron_qae.algorithm.clip_cov import clip_cov_loss
from megatron_qae.algorithm.entropy_bonus import entropy_term
from megatron_qae.algorithm.gspo import gspo_loss
from megatron_qae.algorithm.kl_cov import kl_cov_loss
from megatron_qae.algorithm.kl_penalty import kl_term
from megatron_qae.algorithm.loss import policy_loss

POLICY_LOSSES = ("dapo", "gspo", "clip_cov", "kl_cov")
COV_LOSSES = ("clip_cov", "kl_cov")


@dataclass(frozen=True)
class LossConfig:
    """Knobs of the objective (from config.algo; validated there)."""

    clip_low: float = 0.2
    """Lower clip: ratio >= 1 - clip_low for positive advantages (DAPO, Clip-Cov)."""
    clip_high: float = 0.28
    """Upper clip (DAPO clip-higher): ratio <= 1 + clip_high (DAPO, Clip-Cov)."""
    clip_c: float | None = 10.0
    """Dual-clip bound for negative advantages (> 1), None disables it (DAPO only)."""
    tis_cap: float | None = None
    """Truncated importance sampling cap on exp(old - rollout) log-prob; None disables it."""
    policy_loss: str = "dapo"
    """'dapo', 'gspo', 'clip_cov' or 'kl_cov'."""
    gspo_clip_low: float = 3e-4
    """GSPO: sequence ratio >= 1 - gspo_clip_low."""
    gspo_clip_high: float = 4e-4
    """GSPO: sequence ratio <= 1 + gspo_clip_high."""
    clip_cov_ratio: float = 2e-4
    """Clip-Cov: share of the mini-batch's response tokens whose gradient is dropped."""
    clip_cov_lb: float = 1.0
    """Clip-Cov: only tokens with covariance above this are candidates."""
    clip_cov_ub: float = 5.0
    """Clip-Cov: only tokens with covariance below this are candidates."""
    kl_cov_ratio: float = 2e-4
    """KL-Cov: share of the mini-batch's response tokens that get the |log-ratio| penalty."""
    kl_cov_coef: float = 1.0
    """KL-Cov: coefficient of the |log-ratio| penalty (verl's ppo_kl_coef)."""
    kl_coef: float = 0.0
    """Coefficient of the KL penalty to the reference policy; 0 = no reference."""
    kl_estimator: str = "k3"
    """'k1', 'k2', 'k3' or 'low_var_kl' (= k3)."""
    entropy_coef: float = 0.0
    """Coefficient of the entropy bonus; 0 = none."""
    seed: int = 0
    """Seed of Clip-Cov's random token draw (combined with the optimizer step)."""

    @property
    def agg_mode(self) -> str:
        """GSPO averages per response (verl's seq-mean-token-mean); the rest per token."""
        return "seq-mean-token-mean" if self.policy_loss == "gspo" else "token-mean"

    @property
    def needs_selection(self) -> bool:
        return self.policy_loss in COV_LOSSES


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch's tensors, all [b, t] over positions (0 outside the response)."""

    logprobs: torch.Tensor
    """Current log-probs (with gradient)."""
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    """1.0 on response tokens."""
    rollout_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    """Per-token entropy; with gradient when entropy_coef > 0."""
    ref_logprobs: torch.Tensor | None = None
    """Reference policy log-probs; needed when kl_coef > 0."""
    cov_selected: torch.Tensor | None = None
    """1.0 on the tokens the covariance selection picked; needed by Clip-Cov / KL-Cov."""


def _policy_term(x: LossInputs, agg: Aggregation, cfg: LossConfig):
    args = (x.logprobs, x.old_logprobs, x.advantages, x.mask)
    if cfg.policy_loss == "dapo":
        return policy_loss(*args, agg, cfg, rollout_logprobs=x.rollout_logprobs)
    if cfg.policy_loss == "gspo":
        return gspo_loss(*args, agg, cfg, rollout_logprobs=x.rollout_logprobs)
    if x.cov_selected is None:
        raise ValueError(f"policy_loss={cfg.policy_loss!r} needs the covariance selection of the "
                         "mini-batch (the train step attaches it before the forward pass)")
    fn = clip_cov_loss if cfg.policy_loss == "clip_cov" else kl_cov_loss
    return fn(*args, x.cov_selected, agg, cfg, rollout_logprobs=x.rollout_logprobs)


def total_loss(x: LossInputs, agg: Aggregation, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss + KL-to-reference + entropy bonus of one micro-batch; (loss, token-sum metrics)."""
    loss, metrics = _policy_term(x, agg, cfg)
    if cfg.kl_coef > 0.0:
        if x.ref_logprobs is None:
            raise ValueError(f"kl_coef={cfg.kl_coef} needs reference log-probs; none reached the loss")
        kl, kl_metrics = kl_term(x.logprobs, x.ref_logprobs, x.mask, agg, cfg.kl_estimator, cfg.kl_coef)
        loss, metrics = loss + kl, {**metrics, **kl_metrics}
    if cfg.entropy_coef > 0.0:
        if x.entropy is None:
            raise ValueError(f"entropy_coef={cfg.entropy_coef} needs the per-token entropy")
        bonus, _ = entropy_term(x.entropy, x.mask, agg, cfg.entropy_coef)
        loss = loss + bonus
    return loss, metrics


def metric_names(cfg: LossConfig) -> list[str]:
    """The token-sum metric names `total_loss` returns for `cfg` (the same on every rank)."""
    names = ["loss/pg_clip_tokens", "loss/approx_kl_sum", "loss/ratio_sum", "loss/pg_loss_sum"]
    if cfg.policy_loss == "dapo":
        names.append("loss/dual_clip_tokens")
    if cfg.policy_loss in COV_LOSSES:
        names.append("loss/cov_selected_tokens")
    if cfg.kl_coef > 0.0:
        names.append("loss/kl_ref_sum")
    return names


def zero_advantage_gradient(cfg: LossConfig) -> str | None:
    """Why a response with advantage exactly 0 still changes the step under `cfg`, or None
    when it does not (then leaving it out of forward/backward is exact)."""
    reasons = []
    if cfg.kl_coef > 0.0:
        reasons.append(f"the KL penalty (kl_coef={cfg.kl_coef}) has a gradient at every token")
    if cfg.entropy_coef > 0.0:
        reasons.append(f"the entropy bonus (entropy_coef={cfg.entropy_coef}) has a gradient at every token")
    if cfg.policy_loss in COV_LOSSES:
        reasons.append(f"{cfg.policy_loss}'s covariance selection is over every token of the mini-batch")
    return "; ".join(reasons) or None
