"""Checkpoint integrity: a sha256 digest and size of every file, written at save, checked at load.

What it does: `file_digests` (collective) hashes a checkpoint directory's files, each rank the
data files it wrote itself (hot in its page cache) with a few threads, and returns the whole
table on every rank; `verify` (collective) checks a directory
against that table and returns the same list of problems (file and reason) on every rank, so
all ranks take the same decision. The table lives in the checkpoint's completion marker, which
is written last; a checkpoint without a table (saved before digests existed) is reported as
unverifiable, not as damaged. What it does not: decide what to do about damage (checkpoint.py
and the loop do), or repair anything.
"""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

_CHUNK_BYTES = 1 << 24


@dataclass(frozen=True)
class FileRecord:
    """What a checkpoint file must be."""

    size_bytes: int
    """Length of the file."""
    sha256: str
    """Hex sha256 of its bytes."""


class CheckpointDamaged(RuntimeError):
    """A checkpoint whose files are missing, truncated, altered, or that its loader rejects."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"checkpoint {path} is damaged: " + "; ".join(problems))


def _digest(path: Path) -> FileRecord:
    with open(path, "rb") as f:
        return FileRecord(path.stat().st_size, hashlib.file_digest(f, "sha256").hexdigest())


def _listing(directory: Path, exclude: str) -> list[str]:
    """Rank 0's sorted list of files, broadcast so that every rank splits the same list."""
    names = [None]
    if dist.get_rank() == 0:
        names = [sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                        if p.is_file() and p.name != exclude)]
    dist.broadcast_object_list(names, src=0)
    return names[0]


def _gather(part):
    # Objects are pickled over the default group, which always has a CPU-capable backend.
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return parts


_WRITER = re.compile(r"^__(\d+)_\d+\.distcp$")
"""torch_dist's data files are named by the global rank that wrote them (megatron-core
dist_checkpointing/strategies/filesystem_async.py: the `__<rank>_` storage prefix)."""
_DIGEST_THREADS = 4


def _share(names: list[str], rank: int, world: int) -> list[str]:
    """This rank's files to digest: the data files it wrote itself (still in its node's page
    cache, never read back over a shared file system from another node), and a round-robin
    share of the rest (metadata, or files of ranks that are not in this world)."""
    own, rest = [], []
    for n in names:
        m = _WRITER.match(Path(n).name)
        writer = int(m.group(1)) if m else None
        if writer == rank:
            own.append(n)
        elif writer is None or writer >= world:
            rest.append(n)
    return own + rest[rank::world]


def file_digests(directory: Path, exclude: str) -> dict[str, FileRecord]:
    """Collective. Digest of every file under `directory` except `exclude`: each rank digests
    the files it wrote (a 32B checkpoint with optimizer state is hundreds of GB), several at a
    time (hashlib releases the GIL while it hashes)."""
    names = _listing(directory, exclude)
    mine_names = _share(names, dist.get_rank(), dist.get_world_size())
    with ThreadPoolExecutor(max_workers=_DIGEST_THREADS) as pool:
        mine = dict(zip(mine_names, pool.map(lambda n: _digest(directory / n), mine_names)))
    table: dict[str, FileRecord] = {}
    for part in _gather(mine):
        table.update(part)
    return table


def _check(directory: Path, name: str, want: FileRecord) -> str | None:
    path = directory / name
    if not path.is_file():
        return f"{name}: missing"
    size = path.stat().st_size
    if size != want.size_bytes:
        return f"{name}: {size} bytes, {want.size_bytes} were written (truncated or overwritten)"
    if _digest(path).sha256 != want.sha256:
        return f"{name}: contents differ from what was written (sha256 mismatch)"
    return None


def verify_files(directory: Path, table: dict[str, FileRecord]) -> list[str]:
    """One process: every problem found (empty when every file is as written)."""
    return sorted(p for n in sorted(table) if (p := _check(directory, n, table[n])) is not None)


def verify(directory: Path, table: dict[str, FileRecord]) -> list[str]:
    """Collective. Problems found (empty when every file is as written), the same on every rank."""
    names = sorted(table)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = [p for n in names[rank::world] if (p := _check(directory, n, table[n])) is not None]
    return sorted(p for part in _gather(mine) for p in part)


def table_to_json(table: dict[str, FileRecord]) -> dict[str, dict]:
    return {n: {"size_bytes": r.size_bytes, "sha256": r.sha256} for n, r in sorted(table.items())}


def table_from_json(raw: dict[str, dict]) -> dict[str, FileRecord]:
    return {n: FileRecord(int(r["size_bytes"]), str(r["sha256"])) for n, r in raw.items()}
