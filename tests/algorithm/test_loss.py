"""The DAPO loss against a per-token scalar re-derivation."""

from __future__ import annotations

import math

import torch

from megatron_qae.algorithm.aggregation import Aggregation
from megatron_qae.algorithm.losses.registry import LossInputs, get_policy_loss
from megatron_qae.config.algo import AlgoConfig


def policy_loss(lp, old, adv, mask, agg: Aggregation, cfg: AlgoConfig, rollout_logprobs=None):
    """The registered DAPO loss on these tensors."""
    return get_policy_loss("dapo").fn(LossInputs(lp, old, adv, mask, rollout_logprobs), agg, cfg)


def _scalar_loss(lp, old, adv, cfg: AlgoConfig) -> float:
    ratio = math.exp(lp - old)
    clipped_ratio = min(max(ratio, 1 - cfg.clip_low), 1 + cfg.clip_high)
    loss = max(-adv * ratio, -adv * clipped_ratio)
    if adv < 0 and cfg.clip_c is not None:
        loss = min(loss, -adv * cfg.clip_c)
    return loss


def test_policy_loss_matches_scalar_formula_and_global_token_mean():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 6, generator=g) * 3
    old = lp + (torch.rand(3, 6, generator=g) - 0.5) * 3  # ratios far outside the clip range
    adv = torch.tensor([[1.5] * 6, [-0.8] * 6, [-3.0] * 6])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    cfg = AlgoConfig(clip_c=3.0)
    loss, m = policy_loss(lp, old, adv, mask, Aggregation("token-mean", 40), cfg)
    expect = sum(_scalar_loss(lp[i, j].item(), old[i, j].item(), adv[i, j].item(), cfg)
                 for i in range(3) for j in range(6) if mask[i, j]) / 40
    assert abs(loss.item() - expect) < 1e-6
    assert m["loss/dual_clip_tokens"].item() > 0 and m["loss/pg_clip_tokens"].item() > 0


def test_zero_advantage_tokens_have_exactly_zero_gradient():
    lp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.3, -1.0, -0.1]])
    loss, _ = policy_loss(lp, old, torch.tensor([[0.0, 0.0, 2.0]]), torch.ones(1, 3), Aggregation("token-mean", 3),
                          AlgoConfig())
    loss.backward()
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[0, 1].item() == 0.0 and lp.grad[0, 2].item() != 0.0


def test_truncated_importance_sampling_caps_the_weight():
    lp = torch.tensor([[-1.0]])
    cfg = AlgoConfig(tis_cap=2.0)
    base, _ = policy_loss(lp, lp, torch.tensor([[1.0]]), torch.ones(1, 1), Aggregation("token-mean", 1), AlgoConfig())
    capped, _ = policy_loss(lp, lp, torch.tensor([[1.0]]), torch.ones(1, 1), Aggregation("token-mean", 1), cfg,
                            rollout_logprobs=torch.tensor([[-5.0]]))  # exp(4) > cap
    assert abs(capped.item() - 2.0 * base.item()) < 1e-6
