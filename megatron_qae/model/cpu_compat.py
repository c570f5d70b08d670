"""Make megatron-core train on a CPU-only machine (gloo backend).

What it does: when CUDA is absent, `install()` redirects the handful of CUDA-only calls that
megatron-core makes unconditionally (current device, RNG state, streams, `device="cuda"`
factories, `.cuda()`, `Tensor.type()` checks of the optimizers) to their CPU equivalents.
What it does not: change numerics, or do anything at all when CUDA is available. It must be
imported before `megatron.core` builds models or optimizers; `megatron_qae.model.build` does that.

The redirect is a TorchFunctionMode: it rewrites device arguments of tensor factories and the
`Tensor.cuda()` / `Tensor.type()` methods only. torch keeps mode stacks per thread, so
`install()` pushes it on the calling thread (the patches of `torch.cuda` are process-wide and
made once): the training entry point imports megatron-core on a thread while Ray starts, and
the main thread that then builds the model must get the mode too.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_THREAD = threading.local()
"""`.mode_on`: the redirect mode is pushed on this thread."""
_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The optimizers accept only 'torch.cuda.*Tensor' parameter types.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> None:
        return None

    def synchronize(self) -> None:
        pass


def _set_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(state)


def _get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.get_rng_state = _get_rng_state
    cuda.set_rng_state = _set_rng_state
    cuda.manual_seed = _manual_seed
    cuda.manual_seed_all = _manual_seed


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _get_rng_state
    mrandom._set_cuda_rng_state = _set_rng_state


def cuda_available() -> bool:
    """True when a CUDA device can be used (then this module does nothing)."""
    return torch.cuda.is_available()


def install() -> bool:
    """Install the CPU redirects (patches once per process, the mode once per calling
    thread). Returns True when they are active."""
    global _INSTALLED
    if cuda_available():
        return False
    if not _INSTALLED:
        _patch_torch_cuda()
        _patch_megatron_rng()
        _INSTALLED = True
    if not getattr(_THREAD, "mode_on", False):
        _CudaToCpuMode().__enter__()
        _THREAD.mode_on = True
    return True


def is_installed() -> bool:
    """True when the CPU redirects are active in this process."""
    return _INSTALLED


@functools.cache
def default_device() -> torch.device:
    """The device the trainer computes on: the local CUDA device, else CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return _CPU
