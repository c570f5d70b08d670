"""Cost of checkpoint verification: digesting a real megatron dist checkpoint of about 1 GB
(`file_digests` at save, `verify` at load) against writing and loading it with
dist_checkpointing in the same run.

    python -m benchmarks.bench_checkpoint_digest [--gb 1.0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor

from benchmarks.common import single_process_world
from megatron_qae.model import cpu_compat
from megatron_qae.persistence.checkpoint_verify import file_digests, verify


def _state(gb: float) -> dict:
    n_tensors = 16
    numel = int(gb * 2**30 / 4 / n_tensors)
    return {f"w{i}": ShardedTensor.from_rank_offsets(f"w{i}", torch.randn(numel), replica_id=0)
            for i in range(n_tensors)}


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gb", type=float, default=1.0)
    a = ap.parse_args()
    single_process_world()
    cpu_compat.install()  # dist_checkpointing synchronizes CUDA; a no-op where CUDA is present
    dist.init_process_group("gloo")
    state = _state(a.gb)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        path = Path(tmp)
        save_s = _seconds(lambda: dist_checkpointing.save(state, str(path)))
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        table = {}
        digest_s = _seconds(lambda: table.update(file_digests(path, exclude="complete.json")))
        verify_s = _seconds(lambda: verify(path, table))
        load_s = _seconds(lambda: dist_checkpointing.load(_state(a.gb), str(path)))
    dist.destroy_process_group()
    gb = size / 1e9
    print(f"checkpoint {gb:.2f} GB in {len(table)} files")
    print(f"save {save_s:.2f} s, digest at save {digest_s:.2f} s ({gb / digest_s:.2f} GB/s): "
          f"save + digest = {(save_s + digest_s) / save_s:.2f}x the save alone")
    print(f"load {load_s:.2f} s, verify at load {verify_s:.2f} s: "
          f"verify + load = {(load_s + verify_s) / load_s:.2f}x the load alone")


if __name__ == "__main__":
    main()
