"""The validation helpers every config section uses, trainer and rollout side alike.

What it does: raises the one ValueError shape of the run config, `section.field=value: fix`
(`fail`); declares the values a numeric field may take (`Bound`, with the common ones named
here) and checks every numeric field of a section against its bound (`check_bounds`: NaN and
infinities are refused everywhere); `one_of`, `positive`, and `no_shadowing` (a pass-through
dict may not set what a first-class field sets). It lives here, on the side every package may
import (megatron_qae imports rollout_sglang, never the reverse). What it does not: define
sections, load files, or check across sections.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import threading
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Bound:
    """The values a numeric field may take: from `low` to `high` (each end included unless
    open), or one of `also`; always finite. `why` says where the range comes from."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    also: tuple[int, ...] = ()
    why: str = ""

    def contains(self, value: float) -> bool:
        if value in self.also:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """'> 0', '>= 1', 'in [0, 1)', '-1 or >= 1', 'a finite number'."""
        if self.low == -math.inf and self.high == math.inf:
            text = "a finite number"
        elif self.high == math.inf:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.low == -math.inf:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = (f"in {'(' if self.low_open else '['}{_num(self.low)}, "
                    f"{_num(self.high)}{')' if self.high_open else ']'}")
        return " or ".join([*(str(v) for v in self.also), text])


def _num(x: float) -> str:
    if isinstance(x, int) and x > 2**20 and (x + 1) & x == 0:
        return f"2**{(x + 1).bit_length() - 1} - 1"
    return str(int(x)) if float(x).is_integer() else repr(x)


FINITE = Bound()
POSITIVE = Bound(0, low_open=True)
NON_NEGATIVE = Bound(0)
AT_LEAST_ONE = Bound(1)
UNIT_OPEN = Bound(0, 1, low_open=True, high_open=True)
UNIT_HALF_OPEN = Bound(0, 1, low_open=True)
SECONDS = Bound(0, threading.TIMEOUT_MAX, low_open=True,
                why="the longest wait Python's threading accepts (threading.TIMEOUT_MAX)")
PORT = Bound(1, 65535, why="a TCP port")
SEED = Bound(0, 2**63 - 1, why="torch.manual_seed takes [0, 2**64 - 1]; megatron-core adds offsets "
                               "per rank (model_parallel_cuda_manual_seed), so the top half is kept free")


def _numeric_kind(annotation: str) -> tuple[str, bool] | None:
    """('int' | 'float', None allowed) for a numeric field's annotation, else None."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in text.split("|")]
    kinds = [p for p in parts if p != "None"]
    if len(kinds) == 1 and kinds[0] in ("int", "float"):
        return kinds[0], "None" in parts
    return None


def numeric_fields(cls: type) -> dict[str, tuple[str, bool]]:
    """{name: (kind, None allowed)} of the int / float fields of dataclass `cls`."""
    out = {}
    for f in dataclasses.fields(cls):
        kind = _numeric_kind(f.type)
        if kind is not None:
            out[f.name] = kind
    return out


def check_bounds(section: str, obj: Any, bounds: dict[str, Bound]) -> None:
    """Every int / float field of the dataclass `obj` against its entry in `bounds` (each such
    field must have one: a field added without a bound fails here, at the first load)."""
    for name, (kind, nullable) in numeric_fields(type(obj)).items():
        if name not in bounds:
            raise TypeError(f"{type(obj).__name__}.{name} has no entry in its BOUNDS")
        bound, value, full = bounds[name], getattr(obj, name), f"{section}.{name}"
        hint = f" ({bound.why})" if bound.why else ""
        if value is None:
            if not nullable:
                fail(full, value, f"must be {bound.describe()}{hint}; null is not allowed here")
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            fail(full, value, f"must be a number, {bound.describe()}{hint}")
        if not math.isfinite(value):
            rest = "" if bound.describe() == FINITE.describe() else f", {bound.describe()}"
            fail(full, value, f"must be a finite number{rest}{hint}")
        if kind == "int" and not float(value).is_integer():
            fail(full, value, f"must be an integer, {bound.describe()}{hint}")
        if not bound.contains(value):
            fail(full, value, f"must be {bound.describe()}{hint}")


def no_shadowing(name: str, overrides: dict[str, Any], shadowed: dict[str, str]) -> None:
    """Refuse a key of the pass-through dict `name` that a first-class field sets: `shadowed`
    maps each such key to the field to use instead (dashes and underscores are one)."""
    for key in overrides:
        first_class = shadowed.get(str(key).replace("-", "_"))
        if first_class is not None:
            fail(f"{name}.{key}", overrides[key], f"set by {first_class}; set that instead (the "
                 "pass-through would silently override it)")
