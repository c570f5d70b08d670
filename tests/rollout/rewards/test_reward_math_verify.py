"""reward.name=math_verify: only the final answer is graded, as LaTeX math; no answer, no credit.

Expected values are derived by hand (what a grader of mathematical equivalence must say);
the dapo_math column is verl's string rule, checked against verl in test_reward_dapo.py. The
same rows are the side-by-side table of docs/rewards.md, which this test keeps current.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rollout_sglang.rewards.dapo import dapo_math
from rollout_sglang.rewards.math_verify_grader import as_latex, final_answer, math_verify

# (response, ground truth, dapo_math score, math_verify score)
SIDE_BY_SIDE = [
    ("So 6 * 7 = 42, and the area is 42", "42", -1, -1),
    ("Answer: 41\nCheck: 6 * 7 = 42", "42", -1, -1),
    ("Answer: 42\nCheck: 41 + 1 = 42", "42", 1, 1),
    ("Answer: $42$", "42", 1, 1),
    ("Answer: \\text{42}", "42", 1, 1),
    ("Answer: 042", "42", -1, 1),
    ("Answer: 42.0", "42", -1, 1),
    ("Answer: 0.5", "\\frac{1}{2}", -1, 1),
    ("Answer: \\frac12", "\\frac{1}{2}", 1, 1),
    ("Answer: \\dfrac{1}{2}", "\\frac{1}{2}", -1, 1),
    ("Answer: 2\\sqrt{3}", "2", -1, -1),
    ("Answer: \\sqrt{12}", "2\\sqrt{3}", -1, 1),
    ("Answer: \\$1,000", "1000", 1, 1),
    ("Answer: 42 dollars", "42", 1, -1),
    ("Answer: x = 5", "5", 1, 1),
    ("Answer: 3 and 4", "3, 4", -1, 1),
    ("Answer: 41 = 42", "42", 1, 1),
    ("... so the result is \\boxed{42}", "42", 1, 1),
    ("... so the result is \\boxed{042}", "42", -1, 1),
    ("Answer: 42\n" + "Let me double-check this by another route. " * 8, "42", -1, 1),
]


@pytest.mark.parametrize("text,gt,dapo,mv", SIDE_BY_SIDE)
def test_side_by_side(text, gt, dapo, mv):
    assert dapo_math(text, gt).score == dapo
    result = math_verify(text, gt)
    assert (result.score, result.accuracy) == (mv, float(mv > 0))


def test_docs_table_shows_these_rows():
    doc = (Path(__file__).parents[3] / "docs" / "rewards.md").read_text()
    rows = re.findall(r"^\| `(.+?)` \| `(.+?)` \| ([+-]1) \| ([+-]1) \|", doc, re.MULTILINE)
    shown = [(t.replace("\\n", "\n"), g, int(a), int(b)) for t, g, a, b in rows]
    expected = [(t if len(t) < 100 else "Answer: 42\n(300 more characters)", g, a, b) for t, g, a, b in SIDE_BY_SIDE]
    assert shown == expected


def test_only_the_final_answer_is_read():
    assert final_answer("Answer: 7\nmore text\nanswer:  8 (sure)\nThe end.") == "8 (sure)"
    assert final_answer("no line, but \\boxed{\\frac{1}{2}} and later \\boxed{3}") == "3"
    assert final_answer("Answer:   ") is None and final_answer("the result is 42") is None
    assert math_verify("the result is 42", "42").pred is None  # never handed to math-verify


def test_answers_are_wrapped_as_latex_math():
    assert as_latex("2\\sqrt{3}") == "\\boxed{2\\sqrt{3}}"
    assert as_latex("$\\frac{1}{2}$.") == "$\\frac{1}{2}$."
    assert as_latex("\\$42") == "\\boxed{42}"
