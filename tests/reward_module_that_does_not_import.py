"""A reward module whose import fails, as one with a missing dependency does (tests only)."""

import a_dependency_that_is_not_installed  # noqa: F401


def reward(response_text: str, ground_truth: str) -> float:
    return 0.0
