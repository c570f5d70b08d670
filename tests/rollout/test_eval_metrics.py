"""The evaluation estimators against brute-force enumeration of every k-subset of samples."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from rollout_sglang.eval_metrics import GradedSample, default_ks, maj_at_k, pass_at_k, summarize


def _subsets(samples, k):
    return list(itertools.combinations(samples, k))


def _brute_pass(samples, k):
    subsets = _subsets(samples, k)
    return sum(any(s.accuracy > 0 for s in sub) for sub in subsets) / len(subsets)


def _brute_maj(samples, k):
    total = 0.0
    subsets = _subsets(samples, k)
    for sub in subsets:
        votes = Counter(s.pred for s in sub if s.pred is not None)
        if not votes:
            continue
        top = max(votes.values())
        winners = [a for a, v in votes.items() if v == top]
        right = {s.pred for s in sub if s.accuracy > 0}
        total += sum(a in right for a in winners) / len(winners)  # uniform random tie break
    return total / len(subsets)


def _random_prompt(rng: random.Random, n: int) -> list[GradedSample]:
    answers = ["7", "07", "8", "12"][: rng.randint(1, 4)]
    out = []
    for _ in range(n):
        pred = rng.choice(answers + [None])
        out.append(GradedSample(float(pred == "7"), pred))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_pass_and_maj_equal_enumeration_over_subsets(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    samples = _random_prompt(rng, n)
    for k in range(1, n + 1):
        c = sum(s.accuracy > 0 for s in samples)
        assert pass_at_k(n, c, k) == pytest.approx(_brute_pass(samples, k), abs=1e-12)
        assert maj_at_k(samples, k) == pytest.approx(_brute_maj(samples, k), abs=1e-12)


def test_two_right_spellings_and_ties_by_hand():
    # 2 x "1/2" right, 2 x "0.5" right, 2 x "3" wrong: every vote among 3 answers.
    s = [GradedSample(1.0, "1/2")] * 2 + [GradedSample(1.0, "0.5")] * 2 + [GradedSample(0.0, "3")] * 2
    assert maj_at_k(s, 6) == pytest.approx(2 / 3)  # three-way tie at 2 votes each
    assert maj_at_k(s, 6) == pytest.approx(_brute_maj(s, 6))
    # No answer read in any sample: the vote is always wrong, pass@k is 0.
    assert maj_at_k([GradedSample(0.0, None)] * 3, 2) == 0.0
    assert pass_at_k(3, 0, 2) == 0.0 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 1, 1) == 0.25


def test_summary_per_source_and_overall_and_bad_k():
    a = [GradedSample(1.0, "1"), GradedSample(0.0, "2"), GradedSample(0.0, "2"), GradedSample(1.0, "1")]
    b = [GradedSample(0.0, "5")] * 4
    m = summarize([("x", a), ("y", b), ("x", b)], default_ks(4))
    assert default_ks(4) == [1, 2, 4] and default_ks(5) == [1, 2, 4, 5]
    assert m["eval/x/avg@4"] == 0.25 and m["eval/y/avg@4"] == 0.0 and m["eval/avg@4"] == pytest.approx(1 / 6)
    assert m["eval/x/pass@2"] == pytest.approx((1 - 1 / 6) / 2) and m["eval/x/prompts"] == 2.0
    assert m["eval/x/maj@4"] == pytest.approx(0.25)  # a: 2-2 tie, half credit; b: wrong
    assert m["eval/prompts"] == 3.0
    with pytest.raises(ValueError, match="0 < k <= n"):
        pass_at_k(4, 1, 5)
