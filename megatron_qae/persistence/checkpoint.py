"""Atomic, layout-independent checkpoints with megatron-core dist_checkpointing.

What it does: saves model, optimizer (the distributed optimizer in megatron-core's
'dp_reshardable' format by default: each rank writes its own shard with no gather and no host
copies, and the checkpoint resumes under the same tp / pp and any dp; 'fully_reshardable',
run.checkpoint_optimizer_format, gathers it into model space so it loads into any (tp, pp, dp)
layout; the marker records which, and a load under another tp / pp is refused naming the fix;
the model's weights load into any layout either way), LR schedule, RNG states and the loop's own
state into `<run_dir>/checkpoints/tmp.step_<k>.<id>`, renames it to `step_<k>` once complete,
then points `latest` at it (written last, atomically); keeps the newest N. A run killed during
a save leaves the previous checkpoint intact and loadable. The completion marker holds a sha256
digest and size of every file; a resume verifies them and falls back to the newest intact
checkpoint, with a warning, when one is damaged (or refuses, in the strict mode). SIGTERM sets a flag the loop checks
(it saves and exits; nothing runs inside the handler). What it does not: convert to HF
(model/hf_convert.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException

from megatron_qae.persistence.checkpoint_verify import (CheckpointDamaged, file_digests, table_from_json,
                                                        table_to_json, verify, verify_files)

from megatron_qae.model.policy import Policy
from megatron_qae.model.weights import unwrap

log = logging.getLogger(__name__)
_DONE = "complete.json"
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")
_OLD_FORMAT = "fully_reshardable"
"""What a checkpoint whose marker names no format holds (every save before the choice existed)."""


def _ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _model_state(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    return {"model" if len(chunks) == 1 else f"model{i}": unwrap(chunk).sharded_state_dict()
            for i, chunk in enumerate(chunks)}


def _sharded_state(policy: Policy, is_loading: bool, with_optimizer: bool = True,
                   optimizer_format: str = "dp_reshardable") -> dict[str, Any]:
    state = _model_state(policy.chunks)
    if with_optimizer:
        # Read by megatron's DistributedOptimizer (distrib_optimizer.py sharded_state_dict);
        # other optimizers save in model space whatever it says.
        state["optimizer"] = policy.optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": optimizer_format})
    return state


def _distributed_optimizer(policy: Policy) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])
    return any(isinstance(p, DistributedOptimizer) for p in parts)


def _layout(policy: Policy) -> dict[str, int | None]:
    dims = policy.groups.dims
    return {"tp": dims.tp, "pp": dims.pp, "vpp": dims.vpp}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(run_dir: str | Path, step: int, policy: Policy, loop_state: dict[str, Any],
                    keep_last: int = 2, with_optimizer: bool = True,
                    optimizer_format: str = "dp_reshardable") -> Path:
    """Collective: every trainer rank calls it. Returns the final checkpoint directory.

    `with_optimizer=False` writes model weights only; `optimizer_format` is
    run.checkpoint_optimizer_format (what the distributed optimizer writes)."""
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer_format={optimizer_format!r}: one of {OPTIMIZER_FORMATS}")
    state = _sharded_state(policy, is_loading=False, with_optimizer=with_optimizer, optimizer_format=optimizer_format)
    state["scheduler"] = policy.scheduler.state_dict()
    marker = {"optimizer_format": optimizer_format, "distributed_optimizer": _distributed_optimizer(policy),
              "layout": _layout(policy)} if with_optimizer else {}
    return _save(run_dir, step, state, loop_state, keep_last, with_optimizer, marker)


def save_model_checkpoint(run_dir: str | Path, step: int, chunks: list[torch.nn.Module],
                          loop_state: dict[str, Any]) -> Path:
    """Collective. A model-only checkpoint of bare model chunks (no DDP, optimizer or LR
    schedule: conversion from HF); it loads like `save_checkpoint(with_optimizer=False)`'s."""
    state = _model_state(chunks)
    state["scheduler"] = None
    return _save(run_dir, step, state, loop_state, 2, with_optimizer=False)


def _save(run_dir: str | Path, step: int, state: dict[str, Any], loop_state: dict[str, Any],
          keep_last: int, with_optimizer: bool, marker: dict[str, Any] | None = None) -> Path:
    root = _ckpt_root(run_dir)
    name = [f"tmp.step_{step}.{uuid.uuid4().hex[:8]}"]
    dist.broadcast_object_list(name, src=0)
    tmp = root / name[0]
    if dist.get_rank() == 0:
        tmp.mkdir(parents=True, exist_ok=False)
    dist.barrier()
    state["rng"] = _rng_state()
    state["loop"] = loop_state
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    digests = table_to_json(file_digests(tmp, exclude=_DONE))
    final = root / f"step_{step}"
    if dist.get_rank() == 0:
        (tmp / _DONE).write_text(json.dumps({"step": step, "with_optimizer": with_optimizer,
                                             "model_path": loop_state.get("model_path"),
                                             **(marker or {}), "files": digests}))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _fsync_dir(path: Path) -> None:
    for p in [*path.rglob("*"), path]:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f"latest.tmp.{uuid.uuid4().hex[:8]}"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


def _complete(path: Path) -> bool:
    return path.is_dir() and (path / _DONE).is_file()


def _steps(root: Path) -> list[Path]:
    done = [p for p in root.glob("step_*") if _complete(p)]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def _prune(root: Path, keep_last: int) -> None:
    for old in _steps(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("tmp.step_*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` points at, or the newest complete one if the pointer is stale."""
    root = _ckpt_root(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if _complete(target):
            return target
        log.warning("%s points at %s, which is incomplete; using the newest complete checkpoint",
                    pointer, target)
    steps = _steps(root) if root.is_dir() else []
    return steps[-1] if steps else None


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints to resume from, best first: `latest`'s target, then newest to oldest."""
    root = _ckpt_root(run_dir)
    steps = list(reversed(_steps(root))) if root.is_dir() else []
    first = latest_checkpoint(run_dir)
    return ([first] if first is not None else []) + [p for p in steps if p != first]


def load_latest(run_dir: str | Path, policy: Policy, on_damaged: str) -> tuple[Path, dict[str, Any]] | None:
    """Collective. Load the newest intact checkpoint of the run; None when there is none at all.

    A damaged one is skipped with a warning naming the file and the reason
    (`on_damaged="fallback"`) or stops the run (`"fail"`); all damaged is always an error."""
    damaged: list[CheckpointDamaged] = []
    for path in resume_candidates(run_dir):
        try:
            return path, load_checkpoint(path, policy)
        except CheckpointDamaged as exc:
            if on_damaged == "fail":
                raise RuntimeError(f"{exc}. run.resume_from_damaged=fail: not resuming. Set "
                                   "run.resume_from_damaged=fallback to resume from the newest intact "
                                   f"checkpoint, or move {path} out of {path.parent}") from exc
            log.warning("%s; falling back to an older checkpoint", exc)
            damaged.append(exc)
    if damaged:
        raise RuntimeError(f"no intact checkpoint under {_ckpt_root(run_dir)}: "
                           + " | ".join(str(d) for d in damaged)
                           + ". Move the damaged step_* directories away to start this run from scratch")
    return None


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / _DONE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointDamaged(path, [f"{_DONE}: unreadable ({exc})"]) from exc


def verified_marker(path: str | Path) -> dict[str, Any]:
    """One process, no collective: the completion marker of a complete checkpoint whose files
    all match their digests (FileNotFoundError when incomplete, CheckpointDamaged when not)."""
    path = Path(path)
    if not _complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {_DONE}); "
                                "point at a step_<k> directory written by save_checkpoint")
    marker = _read_marker(path)
    if "files" not in marker:
        log.warning("%s has no file digests (saved by an older version): reading it unverified", path)
        return marker
    problems = verify_files(path, table_from_json(marker["files"]))
    if problems:
        raise CheckpointDamaged(path, problems)
    return marker


def _verify(path: Path, marker: dict[str, Any]) -> None:
    if "files" not in marker:
        log.warning("%s has no file digests (saved by an older version): loading it unverified", path)
        return
    problems = verify(path, table_from_json(marker["files"]))
    if problems:
        raise CheckpointDamaged(path, problems)


def load_checkpoint(path: str | Path, policy: Policy, model_only: bool = False) -> dict[str, Any]:
    """Collective. Load a checkpoint into the policy (any layout); returns the loop state.

    Every file is verified against the digests written at save first (CheckpointDamaged names
    the file and the reason). Model-only checkpoints (from HF conversion), or
    `model_only=True`, leave the optimizer, LR schedule and RNG as they are."""
    path = Path(path)
    if not _complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {_DONE}); "
                                "point at a step_<k> directory written by save_checkpoint")
    marker = _read_marker(path)
    _verify(path, marker)
    model_only = model_only or not marker.get("with_optimizer", True)
    optimizer_format = marker.get("optimizer_format", _OLD_FORMAT)
    if not model_only:
        _check_optimizer_layout(path, marker, optimizer_format, policy)
    added_steps = [] if model_only else _init_optimizer_state(policy.optimizer)
    template = _sharded_state(policy, is_loading=True, with_optimizer=not model_only, optimizer_format=optimizer_format)
    template.update(scheduler=None, rng=None, loop=None)
    try:
        loaded = dist_checkpointing.load(template, str(path))
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        if "files" not in marker:  # unverified: damage is the likely cause
            raise CheckpointDamaged(path, [f"the loader failed: {type(exc).__name__}: {exc}"]) from exc
        raise ValueError(f"cannot load checkpoint {path} (its files are intact): {exc}. Was it saved "
                         "for the same model (model.path's config.json)?") from exc
    chunks = policy.chunks
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])
    if model_only:
        # The optimizer keeps its own (fp32) main params with bf16 weights: re-read them.
        policy.optimizer.reload_model_params()
        return loaded["loop"]
    for state in added_steps:
        del state["step"]
    _patch_reshardable_load_without_te()
    # megatron-core 0.19.2's dp_reshardable loader copies into the main params without
    # no_grad (distrib_optimizer.py:2061, unlike its model-space loader at :2095): with fp32
    # params those are views of leaves that require grad, and the copy raises.
    with torch.no_grad():
        policy.optimizer.load_state_dict(loaded["optimizer"])
    _unshare_adam_steps(policy.optimizer)
    policy.scheduler.load_state_dict(loaded["scheduler"])
    rng = loaded["rng"]
    torch.set_rng_state(rng["torch"])
    get_cuda_rng_tracker().set_states(rng["tracker"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return loaded["loop"]


def _check_optimizer_layout(path: Path, marker: dict[str, Any], optimizer_format: str, policy: Policy) -> None:
    """A 'dp_reshardable' distributed-optimizer state follows the saving ranks' buffers: it
    loads only under the tp / pp (and vpp) it was saved with."""
    if optimizer_format != "dp_reshardable" or not marker.get("distributed_optimizer", False):
        return
    saved, now = marker.get("layout"), _layout(policy)
    if saved != now:
        raise ValueError(f"checkpoint {path} holds the distributed optimizer's state as 'dp_reshardable', saved "
                         f"under {saved}; it loads only under the same tp / pp / vpp, and this run has {now}. "
                         f"Resume once under {saved} and save with run.checkpoint_optimizer_format="
                         "fully_reshardable, then change the layout")


def _patch_reshardable_load_without_te() -> None:
    """megatron-core 0.19 without Apex/TE keeps Adam's `step` as a tensor in the optimizer
    state, and its fully-reshardable loader then looks for a `step` shard that the format
    stores separately (KeyError). Hide `step` while the shards are copied; the step itself is
    restored by megatron from the param groups. Does nothing when TE or Apex is present."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    if getattr(dopt, "HAVE_APEX_OR_TE", True) or getattr(dopt, "_qae_patched", False):
        return
    original = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    def without_step(self, model_param, tensors):
        held = {id(st): st.pop("step") for st in self.optimizer.state.values() if "step" in st}
        try:
            original(self, model_param, tensors)
        finally:
            for st in self.optimizer.state.values():
                if id(st) in held:
                    st["step"] = held[id(st)]

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = without_step
    dopt._qae_patched = True


def _unshare_adam_steps(optimizer) -> None:
    """megatron's no-Apex/TE loader gives every parameter the same `step` tensor; torch's Adam
    increments each parameter's step in place, so a shared one would advance once per
    parameter per optimizer step (wrong bias correction after a resume). Give each its own."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _init_optimizer_state(optimizer) -> list[dict]:
    """Give a fresh optimizer its (zero) Adam state, so its sharded state dict can describe
    what to load (megatron's DistributedOptimizer expects one step count per parameter while
    building it, and none while loading). Returns the states given a temporary step."""
    added = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if not inner.state and getattr(opt, "init_state_fn", None) is not None:
            opt.init_state_fn(inner, opt.config)
            for state in inner.state.values():
                state["step"] = torch.zeros((), dtype=torch.float32)
                added.append(state)
    return added


@dataclass
class StopFlag:
    """Set by SIGTERM; the loop saves and exits at the next step boundary."""

    requested: bool = False


def install_sigterm_save() -> StopFlag:
    flag = StopFlag()

    def handler(signum, frame) -> None:  # noqa: ARG001
        flag.requested = True

    signal.signal(signal.SIGTERM, handler)
    return flag
