"""The policy-loss registry: every policy loss has one signature and registers by name.

What it does: `LossInputs` is one micro-batch's tensors; a policy loss is a function
(LossInputs, Aggregation, AlgoConfig) -> (loss, token-sum metrics) that its own module
registers with `@register_policy_loss(name, ...)`, declaring its aggregation mode, its extra
metric names and, for the covariance losses, the token selection it needs over the mini-batch.
`get_policy_loss(algo.policy_loss)` returns the registered `PolicyLoss`. Every module of this
package is imported with the package (`__init__.py`), so a loss module registers itself just
by being in it. What it does not: compute anything (the loss modules and surrogate.py do), add
KL / entropy terms (objective.py), or validate the config (config/algo.py lists the names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_qae.algorithm.aggregation import AGG_MODES, Aggregation
from megatron_qae.config.algo import AlgoConfig


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch's tensors, all [b, t] over positions (0 outside the response)."""

    logprobs: torch.Tensor
    """Current log-probs (with gradient)."""
    old_logprobs: torch.Tensor
    """Log-probs of the weights the mini-batch was sampled with (no gradient)."""
    advantages: torch.Tensor
    """Per-token advantage (the response's advantage on each of its tokens)."""
    mask: torch.Tensor
    """1.0 on response tokens."""
    rollout_logprobs: torch.Tensor | None = None
    """The rollout engine's log-probs; truncated importance sampling uses them when tis_cap is set."""
    entropy: torch.Tensor | None = None
    """Per-token entropy; with gradient when entropy_coef > 0."""
    ref_logprobs: torch.Tensor | None = None
    """Reference policy log-probs; needed when kl_coef > 0."""
    cov_selected: torch.Tensor | None = None
    """1.0 on the tokens the covariance selection picked; needed by Clip-Cov / KL-Cov."""


class PolicyLossFn(Protocol):
    """The one signature of a policy loss: one micro-batch's (loss, token-sum metrics)."""

    def __call__(self, x: LossInputs, agg: Aggregation,
                 algo: AlgoConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


TokenSelection = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AlgoConfig, torch.Generator], torch.Tensor]
"""(advantages, log-probs, old log-probs, algo, generator), flat [n] over the mini-batch's
response tokens -> bool [n] of the picked tokens."""


@dataclass(frozen=True)
class PolicyLoss:
    """A registered policy loss."""

    name: str
    """The algo.policy_loss value that selects it."""
    fn: PolicyLossFn
    """(LossInputs, Aggregation, AlgoConfig) -> (loss, token-sum metrics) of one micro-batch."""
    agg_mode: str
    """How the per-token loss is reduced over the mini-batch (aggregation.AGG_MODES)."""
    metrics: tuple[str, ...]
    """Metric names it returns beyond surrogate.COMMON_METRICS (token sums)."""
    selection: TokenSelection | None
    """The mini-batch-wide token selection it reads from LossInputs.cov_selected; None = none."""


_REGISTRY: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str, agg_mode: str = "token-mean", metrics: tuple[str, ...] = (),
                         selection: TokenSelection | None = None) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: register the decorated function as policy loss `name`; returns it unchanged."""
    if agg_mode not in AGG_MODES:
        raise ValueError(f"policy loss {name!r}: agg_mode={agg_mode!r} is not one of {AGG_MODES}")

    def register(fn: PolicyLossFn) -> PolicyLossFn:
        if name in _REGISTRY:
            raise ValueError(f"policy loss {name!r} is registered twice ({_REGISTRY[name].fn.__module__} "
                             f"and {fn.__module__}); give the new one its own name")
        _REGISTRY[name] = PolicyLoss(name, fn, agg_mode, metrics, selection)
        return fn

    return register


def policy_loss_names() -> tuple[str, ...]:
    """The registered names, sorted."""
    return tuple(sorted(_REGISTRY))


def get_policy_loss(name: str) -> PolicyLoss:
    """The policy loss registered as `name` (the value of algo.policy_loss)."""
    if name not in _REGISTRY:
        raise ValueError(f"algo.policy_loss={name!r} is not a registered policy loss; use one of "
                         f"{list(policy_loss_names())}, or add a module registering it to "
                         "megatron_qae/algorithm/losses/")
    return _REGISTRY[name]
