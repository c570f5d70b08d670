"""reward.name=dapo_math against verl's real math_dapo.compute_score (verl 0.9.1): exact
agreement on score, accuracy and the compared prediction over a generated set of responses
(answer formats, LaTeX, units, trailing text, missing answer lines, answers outside the last
300 characters, very long responses, the strict-box variant), plus the cases of issue 13
with hand-derived values."""

from __future__ import annotations

import random

import pytest

from rollout_sglang.rewards.dapo import dapo_math, dapo_math_score, normalize_answer
from tests.verl_oracle import load_verl_math_dapo

VERL = load_verl_math_dapo()

# (ground truth, spellings of a right answer, spellings of a wrong one)
ANSWERS: list[tuple[str, list[str], list[str]]] = [
    ("42", ["42", "$42$", "\\boxed{42}", "\\text{42}", "42 dollars", "\\$42", "42 cm", "42^\\circ",
            "x = 42", "$x=42$.", "42.", "\\textbf{42}", "42 \\text{ units}", "**42**", " 42 "],
     ["042", "42.0", "41", "4 2", "forty-two", "42/1", "\\$ 42.00", "-42", "6*7"]),
    ("1000", ["1000", "1,000", "1{,}000", "\\$1,000", "1000 meters", "1,000 \\text{ feet}"],
     ["1.000", "10^3", "1 000 000", "1,0000"]),
    ("\\frac{1}{2}", ["\\frac{1}{2}", "\\frac12", "$\\frac{1}{2}$", "\\boxed{\\frac{1}{2}}"],
     ["0.5", "1/2", "\\dfrac{1}{2}", "\\tfrac12", "\\frac{2}{4}"]),
    ("2\\sqrt{3}", ["2\\sqrt{3}", "2\\sqrt3", "$2\\sqrt{3}$", "2 \\sqrt{3}"],
     ["2", "\\sqrt{12}", "2\\sqrt{3}\\text{ cm}^2", "2*sqrt(3)"]),
    ("\\pi", ["\\pi", "$\\pi$", "\\boxed{\\pi}"], ["pi", "3.14159", "\\pi/1"]),
    ("(1,2)", ["(1,2)", "(1, 2)", "$(1,2)$"], ["(2,1)", "1,2", "\\{1,2\\}"]),
    ("5", ["5", "an 5", "a 5", "5 ways", "5 students", "\\mbox{5}", "5\\%"],
     ["five", "5.5", "55", "\\overline{5}1"]),
    ("90^\\circ", ["90^\\circ", "90", "90 degrees", "90^{\\circ}"], ["\\frac{\\pi}{2}", "90 radians"]),
    ("3, 4", ["3, 4", "3 \\text{and} 4", "3,\\text{and} 4", "3,4"], ["3; 4", "4, 3"]),
]
LEADS = ["Answer: ", "answer: ", "ANSWER : ", "Final Answer: ", "**Answer:** ", "The answer is: ",
         "Answer:\n", "Answer:  \n\n", "Answer:\t"]
TRAILS = ["", "\n", "\n\nCheck: 6 * 7 = 42.", "\nI hope this helps!", "  \n", "<|im_end|>",
          "\nAnswer:", "\n(The check line: Answer: 41)"]
REASONING = "Let me think step by step. We add the numbers, compare cases and simplify the fraction. "


def _filler(rng: random.Random, chars: int) -> str:
    text = (REASONING * (chars // len(REASONING) + 1))[:chars]
    return text if rng.random() < 0.5 else text.replace(". ", ".\n")


def generated_responses(seed: int = 0, n: int = 480) -> list[tuple[str, str]]:
    """(response, ground truth) pairs drawn over answer formats, placements and lengths."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        gt, right, wrong = rng.choice(ANSWERS)
        answer = rng.choice(right if rng.random() < 0.6 else wrong)
        before = _filler(rng, rng.choice([0, 40, 250, 290, 299, 310, 600, 5000, 30000]))
        after_chars = rng.choice([0, 0, 0, 0, 0, 0, 30, 120, 280, 305, 400])
        shape = rng.random()
        if shape < 0.7:  # an answer line, maybe followed by text
            body = rng.choice(LEADS) + answer + rng.choice(TRAILS)
        elif shape < 0.8:  # no answer line: the number is only mentioned, or boxed
            body = rng.choice([f"so it is {answer}", f"\\boxed{{{answer}}}", f"{answer}"])
        elif shape < 0.9:  # two answer lines, the last one wins
            other = rng.choice(right + wrong)
            body = f"Answer: {other}\nWait, let me redo it.\nAnswer: {answer}"
        else:  # boxed inside the answer line, nested braces
            body = f"Answer: $\\boxed{{{answer}}}$" + rng.choice(TRAILS)
        cases.append((before + body + "\n" + _filler(rng, after_chars).rstrip() * (after_chars > 0), gt))
    return cases


def _agree(ours, theirs: dict) -> None:
    assert (ours.score, ours.accuracy, ours.pred) == (theirs["score"], float(theirs["acc"]), theirs["pred"])
    assert isinstance(theirs["acc"], bool)


def test_exact_agreement_with_verl_on_the_generated_set():
    cases = generated_responses()
    outcomes = {1.0: 0, -1.0: 0}
    for text, gt in cases:
        ours, theirs = dapo_math(text, gt), VERL.compute_score(text, gt)
        assert (ours.score, ours.accuracy, ours.pred) == (theirs["score"], float(theirs["acc"]), theirs["pred"]), (
            f"response {text[-320:]!r}, ground truth {gt!r}: ours {ours}, verl {theirs}")
        outcomes[ours.score] += 1
    # The set must exercise both outcomes in earnest, not agree on a wall of -1.
    assert len(cases) >= 400 and min(outcomes.values()) >= 100, outcomes


def test_exact_agreement_with_verl_strict_box_variant():
    rng = random.Random(1)
    cases = []
    for text, gt in generated_responses(seed=2, n=300):
        if rng.random() < 0.7:  # put a box near the end, sometimes unclosed or nested
            inner = rng.choice([gt, gt, gt, "42", "\\frac{1}{2}", "{4}2", "x^{2}"])
            after = "x" * rng.randrange(0, 130)  # the box lands on both sides of the 100-char window
            text += rng.choice([f"\\boxed{{{inner}}}", f"\\boxed{{{inner}", f"\\boxed{{{inner}}}.\n" + after])
        index = rng.choice([None, None, [0, 10, 20, 30], [1, 2, 3, 150], [5, 6, 7, 280]])
        cases.append((text, gt, index))
    boxed_right = 0
    for text, gt, index in cases:
        ours = dapo_math_score(text, gt, strict_box=True, pause_tokens_index=index)
        theirs = VERL.compute_score(text, gt, strict_box_verify=True, pause_tokens_index=index)
        assert (ours.score, ours.accuracy, ours.pred) == (theirs["score"], float(theirs["acc"]), theirs["pred"]), (
            f"response {text[-320:]!r}, ground truth {gt!r}, pause index {index}: ours {ours}, verl {theirs}")
        boxed_right += ours.score > 0
    assert boxed_right >= 30
    with pytest.raises(ValueError, match="exactly 4 pause-token positions"):
        dapo_math_score("\\boxed{1}", "1", strict_box=True, pause_tokens_index=[1, 2])


@pytest.mark.parametrize("raw", [a for _, right, wrong in ANSWERS for a in right + wrong]
                         + ["\\text{\ns}1", "$1$ and $2$", "1 = 2 = 3", "\\fracab", "\\sqrtab", "²", "\\frac1\n2",
                            # Multi-line strings: verl's '.' stops at line breaks, so must ours.
                            "x $1$ y\nz $2$ w", "\\boxed{1}\n\\boxed{2}}", "\\text{a\nb}", "$1\n$2$"])
def test_normalization_equals_verls_on_every_spelling(raw):
    assert normalize_answer(raw) == VERL.normalize_final_answer(raw)


@pytest.mark.parametrize("text,gt,expected_score", [
    # Issue 13's cases, values derived by hand from verl's rules.
    ("Let me compute: 6 * 7 = 42, so the result is 42", "42", -1.0),  # no 'Answer:' line
    ("Answer: 41\nCheck: 6 * 7 = 42", "42", -1.0),  # the check line is not the answer
    ("Answer: 42\nCheck: 41 + 1 = 42, and 40 is wrong", "42", 1.0),
    ("Answer: \\text{42}", "42", 1.0),
    ("Answer: 042", "42", -1.0),
    ("Answer: 42.0", "42", -1.0),
    ("Answer: 0.5", "\\frac{1}{2}", -1.0),
    ("Answer: \\frac12", "\\frac{1}{2}", 1.0),
    ("Answer: 2\\sqrt{3}", "2", -1.0),
    ("Answer: 42\n" + "x" * 300, "42", -1.0),  # the answer is outside the last 300 characters
])
def test_issue_cases_by_hand(text, gt, expected_score):
    assert dapo_math(text, gt).score == expected_score
    _agree(dapo_math(text, gt), VERL.compute_score(text, gt))
