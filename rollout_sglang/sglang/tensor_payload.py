"""The payload of SGLang's `/update_weights_from_tensor`: named tensors passed by handle.

What it does: turns a list of (HF name, tensor) into the string SGLang's
`MultiprocessingSerializer.serialize(obj, output_str=True)` produces (base64 of a
`multiprocessing` ForkingPickler dump, in which torch replaces each tensor by a handle to its
memory: a CUDA IPC handle on GPU, a shared-memory file on CPU), and back, with an unpickler
that admits only the opcodes and the exact torch globals such a CPU dump uses (docs/reliability.md,
"What crosses a process boundary"). The request carries one such string per engine TP rank.
On GPU, when SGLang is importable, its own serializer is used with its CUDA reductions patch
(device indices rewritten to UUIDs, so the engine finds the trainer's GPU under its own
CUDA_VISIBLE_DEVICES); the patch is process-wide and breaks the pickling of CPU tensors
(IndexError in sglang's patch_torch), so it is applied only when a payload of CUDA tensors is
serialized, never for CPU tensors.
What it does not: copy tensor data (only handles travel; the sender keeps the tensors alive
until the engine has loaded them) or send anything over HTTP (the client does).
"""

from __future__ import annotations

import base64
import io
import pickle
import pickletools
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing

NamedTensors = list[tuple[str, torch.Tensor]]


def _sglang_serializer():
    """SGLang's serializer with its CUDA reductions patch applied (device by UUID, as the
    engine's deserializer expects), or None without SGLang."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except Exception:  # noqa: BLE001 - sglang is a GPU-only extra; absent (or broken) on CPU
        return None
    for module in ("sglang.srt.patch_torch", "sglang.srt.utils.patch_torch"):
        try:
            patch = __import__(module, fromlist=["monkey_patch_torch_reductions"])
        except Exception:  # noqa: BLE001 - moved between SGLang releases
            continue
        patch.monkey_patch_torch_reductions()
        break
    return MultiprocessingSerializer


def serialize_named_tensors(named: NamedTensors) -> str:
    """base64 text of `named` with tensors by handle (SGLang's wire format, load_format=None)."""
    if any(not t.is_cuda for _, t in named):
        # Unrelated processes cannot receive file descriptors; shared-memory files by name
        # they can. Process-wide, but only changes how CPU tensors are shared.
        torch.multiprocessing.set_sharing_strategy("file_system")
    sglang = _sglang_serializer() if named and all(t.is_cuda for _, t in named) else None
    if sglang is not None:
        return sglang.serialize(named, output_str=True)
    buf = io.BytesIO()
    ForkingPickler(buf).dump(named)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# Exactly the globals torch's ForkingPickler writes for CPU tensors under the file_system
# sharing strategy (torch/multiprocessing/reductions.py: reduce_tensor -> rebuild_tensor,
# reduce_storage -> rebuild_storage_filename / rebuild_storage_empty, reduce_typed_storage ->
# rebuild_typed_storage), each resolved once here. A name is looked up as one exact
# (module, name) pair: protocol 4's dotted names (`_rebuild_tensor.__builtins__.get`), which
# the stock find_class resolves by walking attributes, can never match.
_REDUCTIONS = torch.multiprocessing.reductions
_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("torch", "Tensor"): torch.Tensor,
    ("torch", "Size"): torch.Size,
    ("torch.storage", "UntypedStorage"): torch.storage.UntypedStorage,
    **{("torch.multiprocessing.reductions", name): getattr(_REDUCTIONS, name) for name in (
        "rebuild_tensor", "rebuild_typed_storage", "rebuild_storage_filename", "rebuild_storage_empty")},
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
}

# The opcodes such a dump uses (protocol 2-5: lists, tuples, str / bytes / int / bool / None,
# the memo, STACK_GLOBAL and REDUCE). Everything else is refused before a byte is unpickled:
# BUILD / NEWOBJ / INST / OBJ (construct or set state on an object), GLOBAL (protocol 0-3
# names), EXT* (copyreg's extension registry), PERSID / BINPERSID, dicts, sets, buffers.
_ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "EMPTY_LIST", "APPEND", "APPENDS",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "MEMOIZE", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
    "BININT", "BININT1", "BININT2", "LONG1", "NONE", "NEWTRUE", "NEWFALSE",
    "STACK_GLOBAL", "REDUCE",
})


def _check_opcodes(raw: bytes) -> None:
    """Raise UnpicklingError unless `raw` is one pickle made only of `_ALLOWED_OPCODES`."""
    end = 0
    try:
        for op, _, pos in pickletools.genops(raw):
            if op.name not in _ALLOWED_OPCODES:
                raise pickle.UnpicklingError(
                    f"refused opcode {op.name} at byte {pos} in a weight payload: only lists and "
                    "tuples of torch tensors are accepted")
            end = pos + 1
    except ValueError as exc:  # pickletools' word for a malformed stream
        raise pickle.UnpicklingError(f"malformed pickle: {exc}") from None
    if end != len(raw):
        raise pickle.UnpicklingError(f"{len(raw) - end} bytes after the pickle's STOP")


class _TorchOnlyUnpickler(pickle.Unpickler):
    """Rebuilds CPU tensors by shared-memory handle; refuses every global but the exact
    (module, name) pairs of `_ALLOWED_GLOBALS`, so a payload cannot name a function to run."""

    def find_class(self, module: str, name: str):
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"refused {module}.{name} in a weight payload: only torch tensors are accepted")
        return found


def deserialize_named_tensors(text: str) -> NamedTensors:
    """Inverse of `serialize_named_tensors`; raises ValueError on anything but [(str, Tensor)]."""
    try:
        raw = base64.b64decode(text, validate=True)
        _check_opcodes(raw)
        named = _TorchOnlyUnpickler(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, ValueError, EOFError, RuntimeError, TypeError) as exc:
        raise ValueError(f"serialized_named_tensors entry is not a weight payload: {exc}") from None
    if not isinstance(named, list) or not all(
            isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor) for item in named):
        raise ValueError("serialized_named_tensors entry must decode to a list of (name, tensor) "
                         "pairs (load_format=None)")
    return named


def pack_bucket(named: NamedTensors, pool: dict[torch.dtype, torch.Tensor] | None = None) -> NamedTensors:
    """The same tensors as views into one contiguous buffer per dtype.

    One buffer means one memory handle per dtype instead of one per tensor, and the copy keeps
    the payload independent of the live parameters while the engine reads it. With `pool`, CPU
    buffers are allocated once in shared memory and reused by later buckets (the engine has
    loaded a bucket before the next is packed), which saves a copy and the page faults of fresh
    shared memory; CUDA buffers come from the caching allocator each time.
    """
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        by_dtype.setdefault(t.dtype, []).append((name, t))
    out: dict[str, torch.Tensor] = {}
    for dtype, items in by_dtype.items():
        total = sum(t.numel() for _, t in items)
        flat = _buffer(dtype, total, items[0][1].device, pool)
        offset = 0
        for name, t in items:
            view = flat[offset: offset + t.numel()].view(t.shape)
            view.copy_(t)
            out[name] = view
            offset += t.numel()
    return [(name, out[name]) for name, _ in named]


def _buffer(dtype: torch.dtype, numel: int, device: torch.device,
            pool: dict[torch.dtype, torch.Tensor] | None) -> torch.Tensor:
    if pool is None or device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    held = pool.get(dtype)
    if held is None or held.numel() < numel:
        held = pool[dtype] = torch.empty(numel, dtype=dtype).share_memory_()
    return held[:numel]
