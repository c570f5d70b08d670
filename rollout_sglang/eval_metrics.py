"""Evaluation estimators as the paper reports them: avg@n, pass@k and maj@k, per data source.

What it does: from the n scored samples of each validation prompt, computes
- avg@n: the mean accuracy of all samples;
- pass@k: the unbiased estimator of "at least one of k samples is correct",
  1 - C(n-c, k) / C(n, k) per prompt (c correct of n), averaged over prompts;
- maj@k: the expected accuracy of a majority vote over k samples drawn without replacement
  from the n, exactly (not by bootstrap): for every answer, the number of k-subsets in which
  it has the most votes, a tie among t answers counting 1/t (a uniformly random tie break).
  Samples whose grader read no answer (`pred` None) take no part in the vote; a subset with
  no answer at all counts as wrong. An answer is right when its samples' accuracy is 1.
`summarize` groups prompts by `data_source` and returns flat {"eval/<source>/<metric>"} and
overall {"eval/<metric>"} metrics; `eval_summary` does so for scored groups. What it does not:
generate or score (the rollout manager does), or choose k (callers pass the ks; `default_ks`
gives powers of two below n, and n).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

from rollout_sglang.types import Group


@dataclass(frozen=True)
class GradedSample:
    """What the estimators need of one sample."""

    accuracy: float
    """0/1 correctness."""
    pred: str | None
    """The answer the grader read, None when it read none."""


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... below n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with c correct samples of n (Chen et al., 2021)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n (got n={n}, c={c}, k={k})")
    return 1.0 - comb(n - c, k) / comb(n, k)


def _ways_all_below(counts: list[int], cap: int, picks: int) -> list[list[int]]:
    """ways[m][t]: the number of ways to pick m samples from answers with `counts` so that every
    answer gets at most `cap` votes and exactly t of them get `cap`; m <= picks."""
    ways = [[0] * (len(counts) + 1) for _ in range(picks + 1)]
    ways[0][0] = 1
    for c in counts:
        nxt = [[0] * (len(counts) + 1) for _ in range(picks + 1)]
        for m in range(picks + 1):
            for t in range(len(counts) + 1):
                if ways[m][t]:
                    for j in range(0, min(c, cap, picks - m) + 1):
                        nxt[m + j][t + (j == cap)] += ways[m][t] * comb(c, j)
        ways = nxt
    return ways


def maj_at_k(samples: Sequence[GradedSample], k: int) -> float:
    """Expected majority-vote accuracy over all k-subsets of one prompt's samples."""
    n = len(samples)
    if not 0 < k <= n:
        raise ValueError(f"maj@k needs 0 < k <= n (got n={n}, k={k})")
    votes = Counter(s.pred for s in samples if s.pred is not None)
    right = {s.pred for s in samples if s.pred is not None and s.accuracy > 0}
    silent = n - sum(votes.values())
    answers = list(votes)
    credit = 0.0
    for a in answers:
        if a not in right:
            continue
        others = [votes[b] for b in answers if b != a]
        for j in range(1, min(votes[a], k) + 1):  # a gets j votes and the most of any answer
            ways = _ways_all_below(others, j, k - j)
            for m in range(k - j + 1):
                for t, w in enumerate(ways[m]):
                    if w:
                        credit += comb(votes[a], j) * w * comb(silent, k - j - m) / (t + 1)
    return credit / comb(n, k)


def prompt_metrics(samples: Sequence[GradedSample], ks: Sequence[int]) -> dict[str, float]:
    """avg@n, pass@k and maj@k of one prompt (ks above n are left out)."""
    n = len(samples)
    c = sum(1 for s in samples if s.accuracy > 0)
    out = {f"avg@{n}": c / n}
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = pass_at_k(n, c, k)
            out[f"maj@{k}"] = maj_at_k(samples, k)
    return out


def summarize(prompts: Sequence[tuple[str, Sequence[GradedSample]]], ks: Sequence[int]) -> dict[str, float]:
    """Per-source and overall means over prompts of `prompt_metrics`; each entry of `prompts`
    is (data_source, that prompt's samples)."""
    if not prompts:
        raise ValueError("no prompts to evaluate; check the validation data file")
    by_source: dict[str, list[dict[str, float]]] = defaultdict(list)
    for source, samples in prompts:
        by_source[source].append(prompt_metrics(samples, ks))
    every = [m for rows in by_source.values() for m in rows]
    out = {f"eval/{name}": value for name, value in _mean(every).items()}
    for source, rows in sorted(by_source.items()):
        out.update({f"eval/{source}/{name}": value for name, value in _mean(rows).items()})
        out[f"eval/{source}/prompts"] = float(len(rows))
    out["eval/prompts"] = float(len(every))
    return out


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    names = list(dict.fromkeys(name for r in rows for name in r))
    # Prompts with fewer samples than k have no value for it: the mean is over those that do.
    return {name: sum(r[name] for r in rows if name in r) / sum(1 for r in rows if name in r)
            for name in names}


def eval_summary(groups: Sequence[Group], ks: Sequence[int], reward_errors: int = 0) -> dict[str, float]:
    """`summarize` over scored groups, with the mean response length and the reward failures."""
    prompts = [(g.prompt.data_source, [GradedSample(s.accuracy, s.pred) for s in g.samples]) for g in groups]
    lengths = [len(s.response_ids) for g in groups for s in g.samples]
    return {**summarize(prompts, ks), "eval/response_len_mean": sum(lengths) / max(len(lengths), 1),
            "eval/reward_errors": float(reward_errors)}
