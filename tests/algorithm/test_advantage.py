"""QAE golden cases (hand-derived), GRPO equivalence with a verl-style loop, edge cases."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from megatron_qae.algorithm.advantage import broadcast_to_tokens, compute_group_advantages


def _adv(scores, gids=None, **kw):
    scores = torch.tensor(scores, dtype=torch.float32)
    gids = torch.zeros(len(scores), dtype=torch.int64) if gids is None else torch.tensor(gids)
    return compute_group_advantages(scores, gids, **kw)


def test_g16_k04_binary_hard_prompt_only_successes_get_advantage():
    # 3 successes out of 16 (p = 0.1875 <= 1-K): the 0.4-quantile is 0 -> baseline 0.
    scores = [1.0] * 3 + [0.0] * 13
    adv, m = _adv(scores, quantile_k=0.4)
    std = torch.tensor(scores).std().item()  # unbiased: sqrt(3*13/16/15)
    assert abs(std - math.sqrt(3 * 13 / 16 / 15)) < 1e-7
    assert torch.allclose(adv[:3], torch.full((3,), 1.0 / (std + 1e-6)))
    assert (adv[3:] == 0).all()
    assert m["adv/zero_frac"] == 13 / 16 and m["adv/hard_group_frac"] == 1.0


def test_g16_k04_binary_easy_prompt_only_failures_get_advantage():
    # 12 successes out of 16 (p = 0.75 > 0.6): sorted position (16-1)*0.4 = 6 is a 1 -> baseline 1.
    scores = [1.0] * 12 + [0.0] * 4
    adv, m = _adv(scores, quantile_k=0.4)
    assert (adv[:12] == 0).all() and (adv[12:] < 0).all()
    assert m["adv/easy_group_frac"] == 1.0 and m["adv/neg_frac"] == 4 / 16


def test_g8_k04_three_failures_linear_vs_inverted_cdf():
    scores = [0.0] * 3 + [1.0] * 5
    std = torch.tensor(scores).std()
    lin, m = _adv(scores, quantile_k=0.4, quantile_method="linear")
    inv, _ = _adv(scores, quantile_k=0.4, quantile_method="inverted_cdf")
    # linear: position 7*0.4 = 2.8 between sorted[2]=0 and sorted[3]=1 -> 0.8.
    assert abs(m["adv/baseline_mean"] - 0.8) < 1e-6
    assert torch.allclose(lin, (torch.tensor(scores) - 0.8) / (std + 1e-6))
    # inverted_cdf: ceil(0.4*8) = 4th smallest = 1.
    assert torch.equal(inv, (torch.tensor(scores) - 1.0) / (std + 1e-6))


def test_groups_of_size_one_get_baseline_zero_std_one():
    adv, _ = _adv([0.7, -1.0, 3.0], gids=[4, 9, 2], quantile_k=0.4)
    assert torch.allclose(adv, torch.tensor([0.7, -1.0, 3.0]) / (1 + 1e-6))


def test_all_equal_groups_get_zero_advantage_without_nan():
    adv, m = _adv([1.0] * 4 + [-1.0] * 4, gids=[0] * 4 + [1] * 4, quantile_k=0.4)
    assert torch.equal(adv, torch.zeros(8)) and m["adv/zero_frac"] == 1.0
    assert m["adv/hard_group_frac"] == 0.0 and m["adv/easy_group_frac"] == 0.0


def test_dapo_scores_with_overlong_penalties():
    scores = [1.0, 1.0 - 0.25, -1.0, -1.0 - 0.5, -1.0, 1.0]
    s = torch.tensor(scores)
    adv, _ = _adv(scores, quantile_k=0.4)
    base = torch.quantile(s, 0.4)  # sorted [-1.5,-1,-1,0.75,1,1], position 2 -> -1.0
    assert abs(base.item() + 1.0) < 1e-6  # torch.quantile lerps: -0.99999994 in fp32
    assert torch.equal(adv, (s - base) / (s.std() + 1e-6))
    raw, _ = _adv(scores, quantile_k=0.4, norm_by_std=False)
    assert torch.equal(raw, s - base)


def _verl_grpo(scores: torch.Tensor, index: list[int], eps: float = 1e-6) -> torch.Tensor:
    """A re-implementation of verl's compute_grpo_outcome_advantage loop (mean baseline)."""
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(len(scores)):
        id2score[index[i]].append(scores[i])
    for idx in id2score:
        if len(id2score[idx]) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            t = torch.stack(id2score[idx])
            id2mean[idx], id2std[idx] = torch.mean(t), torch.std(t)
    out = scores.clone()
    for i in range(len(scores)):
        out[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
    return out


@pytest.mark.parametrize("k", [0.0, -1.0, 1.0, 1.5])
def test_k_outside_unit_interval_is_grpo_mean_baseline(k):
    g = torch.Generator().manual_seed(3)
    index = torch.randint(0, 6, (40,), generator=g)
    binary = torch.randint(0, 2, (40,), generator=g).float() * 2 - 1
    ours, _ = compute_group_advantages(binary, index, quantile_k=k)
    assert torch.equal(ours, _verl_grpo(binary, index.tolist()))  # exact for +-1 scores
    shaped = binary - torch.rand(40, generator=g) * 0.3
    ours, _ = compute_group_advantages(shaped, index, quantile_k=k)
    assert torch.allclose(ours, _verl_grpo(shaped, index.tolist()), atol=1e-6, rtol=0)


def test_order_of_samples_does_not_change_any_advantage():
    g = torch.Generator().manual_seed(5)
    scores, gids = torch.randn(50, generator=g), torch.randint(0, 7, (50,), generator=g)
    adv, _ = compute_group_advantages(scores, gids, quantile_k=0.4)
    perm = torch.randperm(50, generator=g)
    adv_p, _ = compute_group_advantages(scores[perm], gids[perm], quantile_k=0.4)
    assert torch.equal(adv_p, adv[perm])


def test_nan_score_raises_naming_the_group():
    with pytest.raises(ValueError, match=r"group\(s\) \[7\]"):
        _adv([1.0, float("nan"), 0.0], gids=[3, 7, 3], quantile_k=0.4)


def test_broadcast_to_tokens_masks_outside_the_response():
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[0, 1, 1], [1, 0, 0]]).float())
    assert out.tolist() == [[0.0, 2.0, 2.0], [-1.0, 0.0, 0.0]]
