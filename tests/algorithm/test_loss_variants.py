"""Each loss variant against verl 0.9.1's function of the same name (its own code, loaded by
tests/verl_oracle.py) on random inputs: loss value and gradient within 1e-6; and which losses
give a zero-advantage response a gradient (then zero-advantage skipping must be off)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from megatron_qae.algorithm.aggregation import Aggregation
from megatron_qae.algorithm.cov_selection import clip_cov_pick, kl_cov_pick
from megatron_qae.algorithm.entropy_bonus import entropy_term
from megatron_qae.algorithm.kl_penalty import kl_estimate, kl_term
from megatron_qae.algorithm.logprobs import token_entropy
from megatron_qae.algorithm.losses.registry import LossInputs
from megatron_qae.algorithm.objective import aggregation, needs_selection, total_loss, zero_advantage_gradient
from megatron_qae.config.algo import AlgoConfig
from megatron_qae.config.loading import load_config
from megatron_qae.run import loop
from tests.verl_oracle import ActorConfig, load_verl_core_algos

VERL = load_verl_core_algos()
B, T = 6, 12
GLOBAL_TOKENS, GLOBAL_SAMPLES = 97, 9  # the mini-batch is larger than this micro-batch


def _inputs(seed: int, zero_rows: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + (torch.rand(B, T, generator=g) - 0.5) * 0.8  # ratios inside and outside the clips
    adv = (torch.randn(B, 1, generator=g) * 1.5).expand(B, T).clone()
    adv[list(zero_rows)] = 0.0
    rollout = old + (torch.rand(B, T, generator=g) - 0.5) * 0.4
    return {"logp": logp, "old": old, "adv": adv, "mask": mask, "rollout": rollout}


def _verl_config(cfg: AlgoConfig) -> ActorConfig:
    info = {"dp_size": 1, "batch_num_tokens": GLOBAL_TOKENS, "global_batch_size": GLOBAL_SAMPLES}
    # verl's GSPO reads the same clip fields as PPO; ours has its own pair.
    low, high = (cfg.gspo_clip_low, cfg.gspo_clip_high) if cfg.policy_loss == "gspo" else (cfg.clip_low, cfg.clip_high)
    return ActorConfig(clip_ratio=low, clip_ratio_low=low, clip_ratio_high=high,
                       clip_ratio_c=cfg.clip_c, global_batch_info=info, policy_loss=ActorConfig(
                           clip_cov_ratio=cfg.clip_cov_ratio, clip_cov_lb=cfg.clip_cov_lb,
                           clip_cov_ub=cfg.clip_cov_ub, kl_cov_ratio=cfg.kl_cov_ratio, ppo_kl_coef=cfg.kl_cov_coef))


def _ours(x: dict, cfg: AlgoConfig, selected: torch.Tensor | None, tis: bool) -> tuple[float, torch.Tensor]:
    logp = x["logp"].clone().requires_grad_(True)
    inputs = LossInputs(logp, x["old"], x["adv"], x["mask"], x["rollout"] if tis else None, cov_selected=selected)
    loss, _ = total_loss(inputs, aggregation(cfg, GLOBAL_TOKENS, GLOBAL_SAMPLES), cfg)
    loss.backward()
    return loss.item(), logp.grad


def _verl(fn, x: dict, cfg: AlgoConfig, tis: bool) -> tuple[float, torch.Tensor]:
    logp = x["logp"].clone().requires_grad_(True)
    weights = (x["old"] - x["rollout"]).exp().clamp(max=cfg.tis_cap) if tis else None
    loss, _ = fn(x["old"], logp, x["adv"], x["mask"], aggregation(cfg, GLOBAL_TOKENS, GLOBAL_SAMPLES).mode,
                 _verl_config(cfg), weights)
    loss.backward()
    return loss.item(), logp.grad


def _flat_selection(x: dict, cfg: AlgoConfig, seed: int) -> torch.Tensor:
    """Our selection over this batch as the whole mini-batch, back in [b, t]."""
    pick = x["mask"].bool()
    adv, lp, old = x["adv"][pick], x["logp"][pick], x["old"][pick]
    if cfg.policy_loss == "clip_cov":
        flat = clip_cov_pick(adv, lp, old, cfg, torch.Generator().manual_seed(seed))
    else:
        flat = kl_cov_pick(adv, lp, cfg)
    out = torch.zeros_like(x["mask"])
    out[pick] = flat.float()
    return out


CASES = {
    "dapo": (AlgoConfig(clip_c=3.0), "compute_policy_loss_vanilla"),
    "gspo": (AlgoConfig(policy_loss="gspo", gspo_clip_low=0.05, gspo_clip_high=0.08), "compute_policy_loss_gspo"),
    "clip_cov": (AlgoConfig(policy_loss="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=0.05, clip_cov_ub=3.0),
                 "compute_policy_loss_clip_cov"),
    "kl_cov": (AlgoConfig(policy_loss="kl_cov", kl_cov_ratio=0.1, kl_cov_coef=2.0), "compute_policy_loss_kl_cov"),
}


@pytest.mark.parametrize("tis", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_policy_loss_equals_verl(name, tis):
    base, verl_name = CASES[name]
    cfg = dataclasses.replace(base, tis_cap=1.5)
    for seed in range(5):
        x = _inputs(seed)
        selected = _flat_selection(x, cfg, seed) if needs_selection(cfg) else None
        torch.manual_seed(seed)  # verl's Clip-Cov draws from the default generator
        theirs, their_grad = _verl(getattr(VERL, verl_name), x, cfg, tis)
        ours, our_grad = _ours(x, cfg, selected, tis)
        assert abs(ours - theirs) < 1e-6, (seed, ours, theirs)
        assert (our_grad - their_grad).abs().max().item() < 1e-6
        if selected is not None:
            assert selected.sum() >= 2  # the selection really acts on these inputs


def test_clip_cov_draw_is_random_among_more_candidates_than_it_keeps():
    cfg = CASES["clip_cov"][0]
    x = _inputs(0)
    picks = {tuple(_flat_selection(x, cfg, seed).nonzero().flatten().tolist()) for seed in range(6)}
    assert len(picks) > 1


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_penalty_equals_verl(estimator):
    x = _inputs(3)
    ref = x["old"] + (torch.rand(B, T, generator=torch.Generator().manual_seed(9)) - 0.5)
    logp = x["logp"].clone().requires_grad_(True)
    assert (kl_estimate(logp, ref, estimator) - VERL.kl_penalty(logp, ref, estimator)).abs().max() < 1e-6
    ours, _ = kl_term(logp, ref, x["mask"], Aggregation("token-mean", GLOBAL_TOKENS), estimator, 0.3)
    (our_grad,) = torch.autograd.grad(ours, logp)
    logp2 = x["logp"].clone().requires_grad_(True)
    theirs = 0.3 * VERL.agg_loss(VERL.kl_penalty(logp2, ref, estimator), x["mask"], "token-mean",
                                 batch_num_tokens=GLOBAL_TOKENS)
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert (our_grad - logp2.grad).abs().max() < 1e-6


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_entropy_bonus_equals_verl(mode):
    x = _inputs(4)
    logits = torch.randn(B, T, 50, generator=torch.Generator().manual_seed(5)) * 3
    ours_in, theirs_in = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    agg = Aggregation(mode, int(x["mask"].sum()), B)
    ours, _ = entropy_term(token_entropy(ours_in), x["mask"], agg, 0.01)
    ours.backward()
    theirs = -0.01 * VERL.compute_entropy_loss(theirs_in, x["mask"], mode)
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert (ours_in.grad - theirs_in.grad).abs().max() < 1e-6


def _grads(cfg: AlgoConfig, x: dict, seed: int) -> torch.Tensor:
    logp = x["logp"].clone().requires_grad_(True)
    ref = x["old"] - 0.3
    entropy = logp * -0.5  # any entropy that depends on the parameters
    selected = _flat_selection(x, cfg, seed) if needs_selection(cfg) else None
    agg = aggregation(cfg, GLOBAL_TOKENS, GLOBAL_SAMPLES)
    loss, _ = total_loss(LossInputs(logp, x["old"], x["adv"], x["mask"], None, entropy, ref, selected), agg, cfg)
    loss.backward()
    return logp.grad


@pytest.mark.parametrize("cfg,has_reason", [
    (AlgoConfig(), False), (AlgoConfig(policy_loss="gspo"), False),
    (AlgoConfig(kl_coef=0.1), True), (AlgoConfig(entropy_coef=0.01), True),
    (CASES["clip_cov"][0], True), (CASES["kl_cov"][0], True),
])
def test_zero_advantage_responses_get_a_gradient_exactly_when_skipping_is_off(cfg, has_reason):
    zero = (1, 4)
    x = _inputs(7, zero_rows=zero)
    full = _grads(cfg, x, seed=0)
    # The same mini-batch without the zero-advantage rows (what skipping feeds the loss).
    keep = [r for r in range(B) if r not in zero]
    x_kept = {k: v[keep] for k, v in x.items()}
    kept = _grads(cfg, x_kept, seed=0)
    own_gradient = full[list(zero)].abs().max().item() > 0
    others_change = (full[keep] - kept).abs().max().item() > 1e-7
    assert (zero_advantage_gradient(cfg) is not None) == has_reason
    assert (own_gradient or others_change) == has_reason, (own_gradient, others_change)


def test_skipping_is_switched_off_with_one_log_line(caplog):
    assert loop.skips_zero_advantage(load_config(None, []).algo)
    assert loop.skips_zero_advantage(load_config(None, ["algo.policy_loss=gspo"]).algo)
    for override in ["algo.kl_coef=0.01", "algo.entropy_coef=0.001", "algo.policy_loss=clip_cov",
                     "algo.policy_loss=kl_cov"]:
        cfg = load_config(None, [override])
        assert not loop.skips_zero_advantage(cfg.algo)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="megatron_qae.run.loop"):
            loop._log_zero_advantage_skip(cfg.algo, is_driver=True)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "algo.skip_zero_advantage is off" in lines[0], lines
        assert override.split("=")[1] in lines[0]
