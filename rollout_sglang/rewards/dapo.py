"""The DAPO math reward, behaving exactly as verl's `math_dapo.compute_score` (verl 0.9.1).

What it does: grades a decoded response against a ground-truth string the way the paper's
runs were graded. Only the last 300 characters of the response are read. The default path
takes the last 'Answer:' line there (case-insensitive, the rest of that line), normalizes it
and the ground truth with the Minerva/Hendrycks rules (drop units and filler words, unwrap
\\text / \\boxed / $...$, expand \\frac12 and \\sqrt2 shorthand, drop thousands commas of
integers) and compares the two strings: +1 when equal, else -1. When the tail has no answer
line, the last \\boxed{} in its last 100 characters decides instead, compared unnormalized
with the ground truth. The strict-box variant uses only that box check. `pred` is the answer
as compared ('[INVALID]' when none was found; None in the strict-box variant).

This is our own implementation of that behaviour; tests/rollout/rewards/test_reward_dapo.py holds it to
verl's real function on a few hundred generated responses. The rules are verl's, quirks
included (e.g. 'a ' and 'an ' are deleted anywhere, '042' != '42', '0.5' != '\\frac{1}{2}'):
a reproduction must not fix them. What it does not: equivalence checking (reward_math_verify
does that), the overlong penalty (rewards.apply_overlong_penalty), or decoding tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rollout_sglang.rewards.registry import RewardResult

TAIL_CHARS = 300
"""verl reads only this many trailing characters of a response (an efficiency cut)."""
STRICT_BOX_TAIL_CHARS = 100
"""The strict-box variant looks for the box in this many trailing characters of the tail."""
INVALID = "[INVALID]"
"""The prediction verl reports when a response states no answer."""

# The rest of the line after the last "Answer:" (any case, spaces allowed around the colon;
# the whitespace after the colon may cross a line break, as in verl).
_ANSWER_LINE = re.compile(r"answer\s*:\s*([^\n]+)", re.IGNORECASE)

# Literal rewrites, in order: filler articles, currency and spacing, \mbox and "and" in lists.
_REWRITES: tuple[tuple[str, str], ...] = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""),
    ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
# Literal deletions, in order: unit and count words, degree marks, TeX spacing and dots.
_DELETIONS: tuple[str, ...] = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds",
    "meters", "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}",
    "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
    "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)
# Regex rewrites, in order. No pattern may cross a line break ('.' in verl's patterns).
_INLINE_MATH = re.compile(r"[^\n]*?\$([^\n]*?)\$[^\n]*")  # keep the first $...$ of a line
_UNWRAP = tuple(re.compile(p) for p in (r"\\text\{([^\n]*?)\}", r"\\textbf\{([^\n]*?)\}",
                                        r"\\overline\{([^\n]*?)\}"))  # to the first '}'
_BOXED = re.compile(r"\\boxed\{([^\n]*)\}")  # to the last '}' of the line
_FRAC_SHORTHAND = re.compile(r"frac([^{])([^\n])")  # \frac12 -> \frac{1}{2}
_SQRT_SHORTHAND = re.compile(r"sqrt([^{])")  # \sqrt2 -> \sqrt{2}


def normalize_answer(answer: str) -> str:
    """The canonical string verl compares: right of the last '=', units and TeX wrappers off."""
    text = answer.split("=")[-1]
    for old, new in _REWRITES:
        text = text.replace(old, new)
    for junk in _DELETIONS:
        text = text.replace(junk, "")
    text = _INLINE_MATH.sub(r"$\1$", text)
    for wrapper in _UNWRAP:
        text = wrapper.sub(r"\1", text)
    text = _BOXED.sub(r"\1", text)
    text = _FRAC_SHORTHAND.sub(r"frac{\1}{\2}", text)
    text = _SQRT_SHORTHAND.sub(r"sqrt{\1}", text)
    text = text.replace("$", "")
    # Thousands separators go only when the whole answer is an integer ("1,000" but not "(1,2)").
    if text.replace(",", "").isdigit():
        text = text.replace(",", "")
    return text.strip()


def last_boxed_content(text: str) -> str | None:
    """What the last '\\boxed{' of `text` encloses, braces balanced; None if none is closed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    first = start + len("\\boxed{")
    depth = 1
    for i in range(first, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[first:i]
    return None


def answer_line(text: str) -> str | None:
    """The rest of the line after the last 'Answer:' in `text`, None when there is none."""
    found = _ANSWER_LINE.findall(text)
    return found[-1] if found else None


def _strict_box_region(tail: str, pause_tokens_index: Sequence[int] | None) -> str:
    if pause_tokens_index is None:
        return tail[-STRICT_BOX_TAIL_CHARS:]
    if len(pause_tokens_index) != 4:
        raise ValueError(f"pause_tokens_index={list(pause_tokens_index)!r}: verl's strict-box check "
                         "takes exactly 4 pause-token positions; pass 4 or None")
    # As verl: Python slicing semantics, so a position under 100 counts from the end.
    return tail[pause_tokens_index[-1] - STRICT_BOX_TAIL_CHARS:]


def _strict_box(tail: str, ground_truth: str, pause_tokens_index: Sequence[int] | None) -> tuple[bool, str | None]:
    """verl's strict-box check: the last \\boxed{} near the end, compared unnormalized."""
    boxed = last_boxed_content(_strict_box_region(tail, pause_tokens_index))
    return boxed == ground_truth, boxed


def dapo_math_score(response_text: str, ground_truth: str, strict_box: bool = False,
                    pause_tokens_index: Sequence[int] | None = None) -> RewardResult:
    """+1 / -1 and the compared prediction, as verl's math_dapo.compute_score.

    Default: the normalized 'Answer:' line; when the tail has none, the strict-box check
    decides if it finds a box, else the prediction is '[INVALID]'. strict_box=True: only the
    strict-box check (the prediction is None when there is no box).
    """
    tail = response_text[-TAIL_CHARS:]
    if strict_box:
        correct, pred = _strict_box(tail, ground_truth, pause_tokens_index)
    else:
        line = answer_line(tail)
        pred = normalize_answer(INVALID if line is None else line)
        correct = pred == normalize_answer(ground_truth)
        if pred == INVALID:  # compared after normalization, as verl does
            box_correct, boxed = _strict_box(tail, ground_truth, pause_tokens_index)
            if boxed is not None:
                correct, pred = box_correct, boxed
    return RewardResult(1.0 if correct else -1.0, float(correct), pred)


def dapo_math(response_text: str, ground_truth: str) -> RewardResult:
    """reward.name=dapo_math: verl's default DAPO-Math-17k / AIME grading ('Answer:' line,
    else a box at the very end)."""
    return dapo_math_score(response_text, ground_truth)


def dapo_math_strict_box(response_text: str, ground_truth: str) -> RewardResult:
    """reward.name=dapo_math_strict_box: verl's strict-box variant (last \\boxed{}, exact)."""
    return dapo_math_score(response_text, ground_truth, strict_box=True)
