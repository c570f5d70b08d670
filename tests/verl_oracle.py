"""verl's real DAPO math grader, loaded from the installed verl package without importing verl.

verl 0.9.1 is a test-only dependency installed with `pip install --no-deps verl==0.9.1` (the
Makefile's setup does that): its package __init__ imports torch, tensordict and Ray helpers
that a reward does not need, and tensordict is not installed here. So the grader's module file
(`verl/utils/reward_score/math_dapo.py`, which imports only `re` and `typing`) is located with
importlib.util.find_spec (which does not run verl/__init__.py) and executed on its own: the
function under test is verl's own code, byte for byte.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType

VERL_VERSION = "0.9.1"


def load_verl_math_dapo() -> ModuleType:
    """verl's `verl.utils.reward_score.math_dapo` module; AssertionError when verl is missing
    or not the pinned version (install it with `pip install --no-deps verl==0.9.1`)."""
    spec = importlib.util.find_spec("verl")
    assert spec is not None and spec.submodule_search_locations, (
        f"verl is not installed; run `.venv/bin/pip install --no-deps verl=={VERL_VERSION}` (make setup does)")
    version = importlib.metadata.version("verl")
    assert version == VERL_VERSION, f"verl {version} is installed; the oracle is verl=={VERL_VERSION}"
    path = Path(spec.submodule_search_locations[0]) / "utils" / "reward_score" / "math_dapo.py"
    module_spec = importlib.util.spec_from_file_location("verl_math_dapo_oracle", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
