"""The validation helpers every config section uses, trainer and rollout side alike.

What it does: raises the one ValueError shape of the run config, `section.field=value: fix`
(`fail`), and the two checks most fields need (`one_of`, `positive`). It lives here, on the
side every package may import (megatron_qae imports rollout_sglang, never the reverse). What it
does not: define sections, load files, or check across sections.
"""

from __future__ import annotations

from typing import Any


def fail(name: str, value: Any, fix: str) -> None:
    """Raise the config's ValueError: the dotted field `name`, its `value`, and the `fix`."""
    raise ValueError(f"{name}={value!r}: {fix}")


def one_of(name: str, value: Any, allowed: tuple) -> None:
    """`value` of field `name` must be one of `allowed`."""
    if value not in allowed:
        fail(name, value, f"use one of {list(allowed)}")


def positive(name: str, value: float, strict: bool = True) -> None:
    """`value` of field `name` must be > 0 (`strict`) or >= 0."""
    if value < 0 or (strict and value == 0):
        fail(name, value, "must be > 0" if strict else "must be >= 0")
