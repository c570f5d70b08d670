"""reward.name=math_verify: the final answer graded for mathematical equivalence by math-verify.

What it does: reads only the final answer of a response: the rest of the line after the last
'Answer:' anywhere in it (the same line rule as verl's DAPO grader, without its 300-character
window), else the content of the last \\boxed{}. A response that states neither gets -1 and
math-verify never sees it, so a response that merely mentions the right number earns nothing.
The answer is handed to math-verify as LaTeX math: inside \\boxed{} unless it already carries
a math delimiter ($...$, \\(...\\), \\[...\\], \\boxed{}), with currency signs ('\\$') dropped;
the ground truth is parsed as `$...$`. +1 when math-verify finds them equivalent ('0.5' and
'\\frac{1}{2}', '042' and '42', '\\text{42}' and '42'), else -1.

math-verify times itself out with signal.alarm, so this must run on a process's main thread:
reward_scoring's worker processes do that. What it does not: string matching the way the
paper's runs did (reward_dapo does), or decoding tokens.
"""

from __future__ import annotations

from math_verify import parse, verify

from rollout_sglang.rewards.dapo import answer_line, last_boxed_content
from rollout_sglang.rewards.registry import RewardResult

_MATH_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")


def final_answer(response_text: str) -> str | None:
    """The response's stated answer: the last 'Answer:' line, else the last \\boxed{} content."""
    line = answer_line(response_text)
    if line is not None and line.strip():
        return line.strip()
    boxed = last_boxed_content(response_text)
    return boxed.strip() if boxed is not None and boxed.strip() else None


def as_latex(answer: str) -> str:
    """`answer` as math-verify expects a prediction: LaTeX math inside a delimiter. A bare
    answer is boxed, so '\\frac12' or '2\\sqrt{3}' is parsed whole, not as its first number."""
    # An escaped dollar is a currency sign; left in, it breaks math-verify's $...$ matching.
    answer = answer.replace("\\$", "")
    if any(d in answer for d in _MATH_DELIMITERS):
        return answer
    return f"\\boxed{{{answer}}}"


def math_verify(response_text: str, ground_truth: str) -> RewardResult:
    """+1 when the final answer is mathematically equivalent to the ground truth, else -1."""
    answer = final_answer(response_text)
    if answer is None:
        return RewardResult(-1.0, 0.0, None)
    gold = parse(f"${ground_truth}$")
    pred = parse(as_latex(answer))
    ok = bool(gold) and bool(pred) and bool(verify(gold, pred))
    return RewardResult(1.0 if ok else -1.0, float(ok), answer)
