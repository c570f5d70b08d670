"""Covariance-based token selection of Clip-Cov and KL-Cov ("The Entropy Mechanism of RL for
Reasoning LMs"), over the response tokens of a whole global mini-batch.

What it does: for the n response tokens of a mini-batch, flattened in a fixed order (sample
index, then position), computes cov_t = (A_t - mean A) * (log p_t - mean log p) with the means
over all n tokens, and picks the tokens each method treats specially, with verl 0.9.1's rules
(`compute_policy_loss_clip_cov` / `compute_policy_loss_kl_cov`): Clip-Cov draws
max(1, int(clip_cov_ratio * n)) tokens at random among those with clip_cov_lb < cov < clip_cov_ub
that the PPO clip does not already clip; KL-Cov takes the max(1, int(kl_cov_ratio * n)) tokens
of largest covariance. verl selects within each micro-batch; here the whole mini-batch is one
selection (so the step does not depend on the micro-batch / DP split), which is verl's
selection when the mini-batch is one micro-batch. What it does not: gather the tokens from the
DP ranks (batch/token_selection.py) or apply the selection (losses/clip_cov.py, kl_cov.py).
"""

from __future__ import annotations

import torch

from megatron_qae.config.algo import AlgoConfig


def token_covariance(advantages: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """(A - mean A) * (log p - mean log p) over flat [n] response tokens."""
    return (advantages - advantages.mean()) * (logprobs - logprobs.mean())


def clip_cov_pick(
    advantages: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    algo: AlgoConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Bool [n]: the tokens whose gradient Clip-Cov drops. Inputs are flat [n], no gradient;
    `algo` has clip_low, clip_high, clip_cov_ratio, clip_cov_lb, clip_cov_ub. The random draw
    uses `generator` (every rank passes the same seed, so every rank picks the same tokens)."""
    n = advantages.numel()
    picked = torch.zeros(n, dtype=torch.bool, device=advantages.device)
    if n == 0:
        return picked
    ratio = (logprobs - old_logprobs).exp()
    clipped = -advantages * ratio.clamp(1.0 - algo.clip_low, 1.0 + algo.clip_high) > -advantages * ratio
    cov = token_covariance(advantages, logprobs)
    eligible = (cov > algo.clip_cov_lb) & (cov < algo.clip_cov_ub) & ~clipped
    candidates = torch.nonzero(eligible).flatten()
    count = max(int(algo.clip_cov_ratio * n), 1)
    order = torch.randperm(candidates.numel(), generator=generator).to(candidates.device)
    picked[candidates[order[:count]]] = True
    return picked


def kl_cov_pick(advantages: torch.Tensor, logprobs: torch.Tensor, algo: AlgoConfig) -> torch.Tensor:
    """Bool [n]: the tokens KL-Cov penalizes with kl_cov_coef * |log p - log p_old|, the
    max(1, int(kl_cov_ratio * n)) of largest covariance. Inputs flat [n], no gradient."""
    n = advantages.numel()
    picked = torch.zeros(n, dtype=torch.bool, device=advantages.device)
    if n == 0:
        return picked
    cov = token_covariance(advantages, logprobs)
    count = max(1, int(n * algo.kl_cov_ratio))
    picked[torch.topk(cov, count, largest=True).indices] = True
    return picked
