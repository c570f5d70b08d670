"""Group-relative advantages: the QAE K-quantile baseline (or the GRPO / DAPO mean), DP-aware.

What it does: for every group of samples, baseline = K-quantile of the group's scores
(`linear` = torch.quantile's default, as the paper's public code; `inverted_cdf` = the paper's
inf{x : F(x) >= K}), or the mean when K is outside (0, 1); advantage = (score - baseline) /
(unbiased std + eps), or score - baseline without std normalization. With a data-parallel
group each rank passes only its own samples; (group id, score) pairs are all-gathered and every
group is reduced over its full multiset in a canonical order, so every rank gets exactly what
one process computes on the whole batch, whatever the split. What it does not: broadcast to
tokens inside the loss, or choose K.

Regimes (metrics): a group is "hard" when its baseline equals its minimum score and some score
is above it (only the better responses get an advantage, all positive), "easy" when the
baseline equals its maximum and some score is below it (only the worse ones, all negative).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

QUANTILE_METHODS = ("linear", "inverted_cdf")


def _quantile(sorted_scores: torch.Tensor, k: float, method: str) -> torch.Tensor:
    if method == "linear":
        return torch.quantile(sorted_scores, k)
    # Paper definition: the ceil(K*G)-th smallest score (1-based).
    g = sorted_scores.numel()
    rank = min(max(math.ceil(k * g), 1), g)
    return sorted_scores[rank - 1]


def _gather_pairs(scores: torch.Tensor, group_ids: torch.Tensor, dp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """All (group id, score) pairs of the DP group, uneven counts per rank allowed."""
    world = dist.get_world_size(dp_group)
    count = torch.tensor([scores.numel()], dtype=torch.int64)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=dp_group)
    longest = int(max(c.item() for c in counts))
    padded_s = torch.zeros(longest, dtype=scores.dtype)
    padded_g = torch.zeros(longest, dtype=torch.int64)
    padded_s[: scores.numel()] = scores
    padded_g[: group_ids.numel()] = group_ids
    all_s = [torch.empty_like(padded_s) for _ in range(world)]
    all_g = [torch.empty_like(padded_g) for _ in range(world)]
    dist.all_gather(all_s, padded_s, group=dp_group)
    dist.all_gather(all_g, padded_g, group=dp_group)
    n = [int(c.item()) for c in counts]
    return (torch.cat([g[:k] for g, k in zip(all_g, n)]), torch.cat([s[:k] for s, k in zip(all_s, n)]))


def _check_finite(scores: torch.Tensor, group_ids: torch.Tensor) -> None:
    bad = ~torch.isfinite(scores)
    if bad.any():
        groups = sorted(set(group_ids[bad].tolist()))
        raise ValueError(
            f"non-finite scores {scores[bad].tolist()[:8]} in group(s) {groups[:8]}; the reward "
            "function must return finite numbers (check the reward for those prompts)"
        )


def group_statistics(
    scores: torch.Tensor, group_ids: torch.Tensor, quantile_k: float, quantile_method: str
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{group id: (baseline, std, min, max)} over the full multiset of each group."""
    use_quantile = 0.0 < quantile_k < 1.0
    stats = {}
    for gid in torch.unique(group_ids).tolist():
        # Sorted values make the reduction independent of the order samples arrived in.
        s = torch.sort(scores[group_ids == gid]).values
        if s.numel() == 1:
            baseline, std = torch.zeros((), dtype=s.dtype), torch.ones((), dtype=s.dtype)
        else:
            baseline = _quantile(s, quantile_k, quantile_method) if use_quantile else torch.mean(s)
            std = torch.std(s)
        stats[gid] = (baseline, std, s[0], s[-1])
    return stats


def compute_group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    quantile_k: float,
    quantile_method: str = "linear",
    norm_by_std: bool = True,
    eps: float = 1e-6,
    dp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages [N] of the local samples and global metrics.

    scores: float [N]; group_ids: int64 [N], any order, groups of any size (possibly split
    over DP ranks). quantile_k <= 0 or >= 1 means the mean baseline (GRPO / DAPO).
    """
    if quantile_method not in QUANTILE_METHODS:
        raise ValueError(f"quantile_method={quantile_method!r}; use one of {QUANTILE_METHODS}")
    scores = scores.detach().cpu().float()
    group_ids = group_ids.detach().cpu().to(torch.int64)
    if scores.shape != group_ids.shape or scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D")
    all_g, all_s = (group_ids, scores)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        all_g, all_s = _gather_pairs(scores, group_ids, dp_group)
    _check_finite(all_s, all_g)
    stats = group_statistics(all_s, all_g, quantile_k, quantile_method)
    adv = _apply(scores, group_ids, stats, norm_by_std, eps)
    all_adv = _apply(all_s, all_g, stats, norm_by_std, eps)
    return adv, _metrics(all_adv, stats)


def _apply(scores, group_ids, stats, norm_by_std: bool, eps: float) -> torch.Tensor:
    adv = torch.empty_like(scores)
    for i, gid in enumerate(group_ids.tolist()):
        baseline, std, _, _ = stats[gid]
        centered = scores[i] - baseline
        adv[i] = centered / (std + eps) if norm_by_std else centered
    return adv


def _metrics(all_adv: torch.Tensor, stats) -> dict[str, float]:
    n = max(all_adv.numel(), 1)
    groups = max(len(stats), 1)
    hard = sum(1 for b, _, lo, hi in stats.values() if b == lo and hi > lo)
    easy = sum(1 for b, _, lo, hi in stats.values() if b == hi and hi > lo)
    return {
        "adv/zero_frac": float((all_adv == 0).sum()) / n,
        "adv/pos_frac": float((all_adv > 0).sum()) / n,
        "adv/neg_frac": float((all_adv < 0).sum()) / n,
        "adv/hard_group_frac": hard / groups,
        "adv/easy_group_frac": easy / groups,
        "adv/baseline_mean": float(sum(float(b) for b, *_ in stats.values()) / groups),
        "adv/std_mean": float(sum(float(s) for _, s, *_ in stats.values()) / groups),
    }


def broadcast_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sequence advantages [B] -> token advantages [B, T], zero outside the response."""
    return advantages[:, None].to(response_mask.dtype) * response_mask
