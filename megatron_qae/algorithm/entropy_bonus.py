"""Entropy bonus: minus coef times the aggregated policy entropy of the response tokens.

What it does: turns the per-token entropy (differentiable, from logprobs.token_entropy) into
the loss term -coef * agg(entropy), aggregated like the policy loss, as verl's actor subtracts
entropy_coeff * entropy_loss. Every response token has this gradient, zero-advantage ones
included, so zero-advantage skipping is off with a bonus. What it does not: compute the
entropy (logprobs.py) or report it (train_step.py logs loss/entropy either way).
"""

from __future__ import annotations

import torch

from megatron_qae.algorithm.aggregation import Aggregation


def entropy_term(entropy: torch.Tensor, mask: torch.Tensor, agg: Aggregation,
                 coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(-coef * aggregated entropy, {}); `entropy` and `mask` [b, t]. The entropy itself is
    already reported as loss/entropy by the train step."""
    return -coef * agg.reduce(entropy, mask), {}
