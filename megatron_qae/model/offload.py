"""Free the trainer's gradient buffers and optimizer state while colocated engines generate.

What it does: `offload_train_state` releases every DDP chunk's gradient buffer with
megatron-core's own hook (`DistributedDataParallel.offload_grad_buffers`: the storage is
resized to 0, views stay valid; `restore_grad_buffers` reallocates and zeroes it) and moves the
optimizer's state (Adam moments, and fp32 main params where they are copies, not views of the
model's params) to host memory: each tensor is copied into a host buffer (pinned when CUDA is
present, so the copies are DMA) and its own storage is resized to 0, so every reference the
optimizer holds stays the same object. `restore_train_state` brings the storages back and
copies the bytes in, bit for bit. The same copies and resizes run on CPU and GPU: on CPU the
host buffer is a second CPU tensor, and the released storage really is freed.
What it does not: offload the model's params (weight sync and the next step read them), or
decide when to offload (sync/placement.py's `Colocated` does, around weight sync and generation).

megatron-core's `MegatronOptimizer.offload_to_cpu` is not used: it moves tensors with
`.cpu()` / `.cuda()` (megatron/core/optimizer/optimizer.py, offload_to_cpu / restore_from_cpu),
so on CPU it does nothing and its restore would move CPU training state to a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from megatron_qae.model import cpu_compat
from megatron_qae.model.policy import Policy


@dataclass
class OffloadedState:
    """What `offload_train_state` released, to be given back by `restore_train_state`."""

    tensors: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """(optimizer tensor whose storage is now empty, host copy of its bytes)."""
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


def offload_train_state(policy: Policy) -> OffloadedState:
    """Release gradient buffers and move optimizer state to host memory (every trainer rank,
    between a weight sync and the next training step)."""
    cuda = cpu_compat.cuda_available()
    out = OffloadedState()
    for chunk in policy.chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            if buffer.grad_data is not None:
                out.grad_buffer_bytes += buffer.grad_data.untyped_storage().nbytes()
        # Device sync / cache release only where there is a device; the resize is the same.
        chunk.offload_grad_buffers(synchronize=cuda, empty_cache=False)
    for t in _optimizer_tensors(policy):
        storage = t.untyped_storage()
        host = torch.empty(storage.nbytes(), dtype=torch.uint8, device="cpu", pin_memory=cuda)
        host.untyped_storage().copy_(storage, non_blocking=cuda)
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
        t.untyped_storage().resize_(host.numel())
        t.untyped_storage().copy_(host.untyped_storage(), non_blocking=cuda)
    if cuda:
        torch.cuda.synchronize()  # training reads these next
    state.tensors.clear()
    state.restored = True
