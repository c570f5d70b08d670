"""Write an HF model's safetensors shards as the tensors arrive, holding one tensor at a time.

What it does: `plan_shards` splits the tensors' specs (name, shape, dtype: known before any
data, from the checkpoint's metadata or the model's shapes) into size-bounded shards, so each
file's safetensors header can be written first; `ShardWriter.write` then appends each
tensor's bytes to its file in plan order, and `close` returns the index's weight map. The
file format is safetensors' own: an 8-byte little-endian header length, a JSON header (dtype,
shape, data_offsets per tensor, `__metadata__`), padded with spaces to 8 bytes, then the
tensors' bytes back to back (https://github.com/huggingface/safetensors, "Format"). What it
does not: map names (qwen2_mapping.py), read checkpoints, or write the index / config.json
(hf_convert.py).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@dataclass(frozen=True)
class TensorSpec:
    """One HF tensor before its data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive specs in shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    if max_shard_bytes < 1:
        raise ValueError(f"--max-shard-bytes={max_shard_bytes} must be positive; the default is 5000000000")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s]


def _header(shard: list[TensorSpec]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in shard:
        if s.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {s.name}: dtype {s.dtype} cannot be written; use one of {sorted(map(str, _DTYPE_NAMES))}")
        entries[s.name] = {"dtype": _DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes the planned shards under `out` as `model-0000i-of-0000N.safetensors`; tensors
    must come in plan order, each with its planned shape and dtype."""

    def __init__(self, out: Path, shards: list[list[TensorSpec]]) -> None:
        self.out, self.shards = out, shards
        self.files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        self.order = [(i, s) for i, shard in enumerate(shards) for s in shard]
        self.next = 0
        self.handle: BinaryIO | None = None
        self.handle_index = -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.order):
            raise AssertionError(f"tensor {name} arrived after every planned tensor was written")
        index, spec = self.order[self.next]
        if (name, tuple(tensor.shape), tensor.dtype) != (spec.name, spec.shape, spec.dtype):
            raise AssertionError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} arrived where "
                                 f"{spec.name} {spec.shape} {spec.dtype} was planned")
        if index != self.handle_index:
            self._open(index)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self.handle.write(memoryview(data.numpy()))
        self.next += 1

    def _open(self, index: int) -> None:
        if self.handle is not None:
            self.handle.close()
        self.handle = open(self.out / self.files[index], "wb")
        self.handle.write(_header(self.shards[index]))
        self.handle_index = index

    def close(self) -> dict[str, str]:
        """Finish the last file; the weight map (HF name -> file) of every tensor."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.next != len(self.order):
            missing = [s.name for _, s in self.order[self.next:]][:5]
            raise AssertionError(f"{len(self.order) - self.next} planned tensors were not written: {missing}")
        return {s.name: self.files[i] for i, s in self.order}
