"""Free the trainer's gradient buffers and optimizer state while colocated engines generate.

What it does: `offload_train_state` releases every DDP chunk's gradient buffer with
megatron-core's own hook (`DistributedDataParallel.offload_grad_buffers`: the storage is
resized to 0, views stay valid; `restore_grad_buffers` reallocates and zeroes it) and moves the
optimizer's state (Adam moments, and fp32 main params where they are copies, not views of the
model's params) to host memory: each tensor is copied into its slice of one host buffer, a
`HostArena` the caller keeps for the whole run (the same bytes every offload), and its own
storage is resized to 0, so every reference the optimizer holds stays the same object.
`restore_train_state` brings the storages back and copies the bytes in, bit for bit. The same
copies and resizes run on CPU and GPU: on CPU the arena is a plain CPU tensor, and the released
storage really is freed.

Why one arena: a pinned buffer per tensor goes through torch's caching host allocator, which
rounds every request up to a power of two and keeps the blocks cached for the process's life
(torch 2.14.1 ATen/core/CachingHostAllocator.h:340-349): up to twice the optimizer state in
pinned memory per process, and more as sizes vary. The arena is allocated once at its exact
size in pageable memory and, where CUDA is present, pinned in place with cudaHostRegister (as
torch's own checkpoint stager pins its buffers: torch/distributed/_state_dict_utils.py:432),
so the host holds exactly the optimizer state's bytes, once.
What it does not: offload the model's params (weight sync and the next step read them), or
decide when to offload (sync/placement.py's `Colocated` does, around weight sync and generation).

megatron-core's `MegatronOptimizer.offload_to_cpu` is not used: it moves tensors with
`.cpu()` / `.cuda()` (megatron/core/optimizer/optimizer.py, offload_to_cpu / restore_from_cpu),
so on CPU it does nothing and its restore would move CPU training state to a GPU.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from megatron_qae.model import cpu_compat
from megatron_qae.model.policy import Policy


_ALIGN_BYTES = 512
"""Each tensor's slice of the arena starts on this boundary (aligned DMA copies)."""


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class HostArena:
    """One host buffer reused by every offload of a run; it grows only if the state does."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def take(self, nbytes: int) -> torch.Tensor:
        """The first `nbytes` of the buffer (allocated, and pinned where CUDA is, on first use)."""
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = None  # the old one's pinning ends with it (its finalizer)
            buffer = torch.empty(nbytes, dtype=torch.uint8, device="cpu")
            if cpu_compat.cuda_available() and nbytes > 0:
                error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0))
                if error != 0:
                    raise RuntimeError(f"cudaHostRegister of the {nbytes}-byte offload arena failed "
                                       f"(cudaError {error}); is the host short of lockable memory (ulimit -l)?")
                weakref.finalize(buffer, _unregister, buffer.data_ptr())
            self.buffer = buffer
        return self.buffer[:nbytes]


@dataclass
class OffloadedState:
    """What `offload_train_state` released, to be given back by `restore_train_state`."""

    tensors: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """(optimizer tensor whose storage is now empty, its bytes: a uint8 slice of the arena)."""
    grad_buffer_bytes: int = 0
    """Bytes of gradient buffers released (megatron reallocates and zeroes them)."""
    optimizer_bytes: int = 0
    """Bytes of optimizer state moved to host memory."""
    restored: bool = False
    """Whether `restore_train_state` has given everything back."""

    @property
    def freed_bytes(self) -> int:
        return self.grad_buffer_bytes + self.optimizer_bytes


def _inner_optimizers(optimizer) -> Iterator:
    """The torch optimizers inside megatron's (chained) optimizer."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if inner is not None:
            yield inner


def _optimizer_tensors(policy: Policy) -> list[torch.Tensor]:
    """Optimizer state and main params that own their storage: anything sharing storage with
    a model param or a gradient buffer (fp32 main params that are views of the model's) is
    left alone, or resizing it would free the model."""
    kept = {p.untyped_storage().data_ptr() for chunk in policy.chunks for p in chunk.parameters()}
    for chunk in policy.chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            if buffer.grad_data is not None:
                kept.add(buffer.grad_data.untyped_storage().data_ptr())
    found: dict[int, torch.Tensor] = {}
    for inner in _inner_optimizers(policy.optimizer):
        candidates = [p for g in inner.param_groups for p in g["params"]]
        candidates += [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        for t in candidates:
            ptr = t.untyped_storage().data_ptr()
            if t.untyped_storage().nbytes() > 0 and ptr not in kept:
                found.setdefault(ptr, t)
    return list(found.values())


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over all of `storage`'s bytes (on its device)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def offload_train_state(policy: Policy, arena: HostArena) -> OffloadedState:
    """Release gradient buffers and move optimizer state into `arena` (every trainer rank,
    between a weight sync and the next training step)."""
    cuda = cpu_compat.cuda_available()
    out = OffloadedState()
    for chunk in policy.chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            if buffer.grad_data is not None:
                out.grad_buffer_bytes += buffer.grad_data.untyped_storage().nbytes()
        # Device sync / cache release only where there is a device; the resize is the same.
        chunk.offload_grad_buffers(synchronize=cuda, empty_cache=False)
    tensors = _optimizer_tensors(policy)
    offsets, end = [], 0
    for t in tensors:
        start = -(-end // _ALIGN_BYTES) * _ALIGN_BYTES
        offsets.append(start)
        end = start + t.untyped_storage().nbytes()
    host_all = arena.take(end)
    for t, start in zip(tensors, offsets):
        storage = t.untyped_storage()
        host = host_all[start:start + storage.nbytes()]
        host.copy_(_bytes_of(storage), non_blocking=cuda)
        out.tensors.append((t, host))
        out.optimizer_bytes += storage.nbytes()
    if cuda:
        torch.cuda.synchronize()  # the copies must land before the device storages go
    for t, _ in out.tensors:
        t.untyped_storage().resize_(0)
    if cuda:
        torch.cuda.empty_cache()  # hand the freed blocks to the engine sharing this GPU
    return out


def restore_train_state(policy: Policy, state: OffloadedState) -> None:
    """Reallocate what `offload_train_state` released and copy the optimizer state back."""
    assert not state.restored, "restore_train_state called twice for one offload"
    cuda = cpu_compat.cuda_available()
    for chunk in policy.chunks:
        chunk.restore_grad_buffers(synchronize=False)
    for t, host in state.tensors:
        storage = t.untyped_storage()
        storage.resize_(host.numel())
        _bytes_of(storage).copy_(host, non_blocking=cuda)
    if cuda:
        torch.cuda.synchronize()  # training reads these next
    state.tensors.clear()
    state.restored = True
