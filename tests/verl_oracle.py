"""verl's real DAPO math grader and policy losses, loaded from the installed verl package
without importing verl.

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
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

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


class ActorConfig(SimpleNamespace):
    """Stands in for verl's ActorConfig inside the loaded core_algos: the attributes its
    policy losses read (clip_ratio*, policy_loss.*, global_batch_info) and `.get`."""

    def get(self, key: str, default=None):
        return getattr(self, key, default)


class _AlgoConfig:
    """Stands in for verl's AlgoConfig: the losses only assert that the config is not one."""


def _stub(name: str, **attrs) -> ModuleType:
    module = ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _module_from(path: Path, name: str) -> ModuleType:
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def load_verl_core_algos() -> ModuleType:
    """verl's `verl.trainer.ppo.core_algos` module (policy losses, agg_loss, kl_penalty,
    compute_entropy_loss) and `verl.utils.torch_functional` (masked_mean ...), both verl's own
    files executed as they are. verl's package __init__ and its config / device / tensordict
    imports need dependencies that are not installed (verl is installed --no-deps): those
    names are stand-ins while the two files execute (`ActorConfig` above is verl's actor
    config as the losses read it), and sys.modules is restored afterwards."""
    spec = importlib.util.find_spec("verl")
    assert spec is not None and spec.submodule_search_locations, (
        f"verl is not installed; run `.venv/bin/pip install --no-deps verl=={VERL_VERSION}` (make setup does)")
    assert importlib.metadata.version("verl") == VERL_VERSION
    root = Path(spec.submodule_search_locations[0])
    saved = dict(sys.modules)
    try:
        pkg = _stub("verl", __path__=[str(root)])
        sys.modules.update({
            "verl": pkg, "verl.utils": _stub("verl.utils", __path__=[str(root / "utils")],
                                             as_torch_index=None, group_mean_std=None),
            "verl.utils.device": _stub("verl.utils.device", get_device_name=lambda: "cpu",
                                       get_torch_device=lambda: torch.cpu),
            "verl.trainer": _stub("verl.trainer", __path__=[]),
            "verl.trainer.ppo": _stub("verl.trainer.ppo", __path__=[]),
            "verl.trainer.config": _stub("verl.trainer.config", AlgoConfig=_AlgoConfig),
            "verl.workers": _stub("verl.workers", __path__=[]),
            "verl.workers.config": _stub("verl.workers.config", ActorConfig=ActorConfig),
        })
        if importlib.util.find_spec("tensordict") is None:
            sys.modules["tensordict"] = _stub("tensordict", TensorDict=dict)
        _module_from(root / "utils" / "import_utils.py", "verl.utils.import_utils")
        _module_from(root / "utils" / "torch_functional.py", "verl.utils.torch_functional")
        return _module_from(root / "trainer" / "ppo" / "core_algos.py", "verl_core_algos_oracle")
    finally:
        sys.modules.clear()
        sys.modules.update(saved)
