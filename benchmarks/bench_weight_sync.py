"""Full weight sync through the project's paths vs a plain copy of the same bytes.

Broadcast: the trainer gathers its weights, maps them to HF names and broadcasts them in
buckets over the weight-update group to a rollout server (our CPU server on CPU; on a GPU
machine the same path to a CUDA server), which loads them. Colocated: the same tensors packed
per bucket and passed by memory handle (`/update_weights_from_tensor`). Baseline: one plain
tensor copy of the same number of bytes on the same machine. Prints GB/s of each and the
ratios, and the peak extra memory of one broadcast sync as a multiple of the bucket (torch's
CPU allocator; pipeline stages are measured by tests/sync/test_weight_sync.py at pp=2).

    python -m benchmarks.bench_weight_sync [--hidden 512 --layers 8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import bench_hf_config, single_process_world, timed
from testsupport.measure import peak_allocated_bytes
from testsupport.cpu_server import CpuServer, write_model_dir
from megatron_qae.model import parallel, weights
from megatron_qae.config.sections import ParallelConfig
from megatron_qae.sync import weight_sync
from megatron_qae.sync.colocated_sync import ColocatedSync
from megatron_qae.model.policy import build_policy
from testsupport.tiny import run_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--bucket-mb", type=int, default=64)
    a = ap.parse_args()
    single_process_world()
    groups = parallel.init_distributed(ParallelConfig())
    hf = bench_hf_config(a.hidden, a.layers, vocab=8192)
    policy = build_policy(run_config(), hf, groups, total_steps=1)
    total = sum(p.numel() * p.element_size() for _, p in weights.global_named_parameters(policy.chunks[0]))
    with tempfile.TemporaryDirectory() as tmp, CpuServer(write_model_dir(Path(tmp) / "m", hf)) as url:
        link = weight_sync.connect_engines([(url, 1)], "127.0.0.1", "gloo", 300.0)
        last = {}

        def sync() -> None:
            last["t"] = weight_sync.push_weights(policy, link, 1, a.bucket_mb << 20)[0]

        t_sync = timed(sync, repeats=2)
        peak = peak_allocated_bytes(sync)
        weight_sync.disconnect(link)
        colocated = ColocatedSync(1, 1, 300.0)

        def push_by_handle() -> None:
            last["h"] = colocated.push(policy, [url], 2, a.bucket_mb << 20)[0]

        t_handle = timed(push_by_handle, repeats=2)
    src = torch.empty(total // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), repeats=5)
    phases = last["t"].metrics()
    print(f"weights: {total / 1e6:.1f} MB ({len(list(weights.global_named_parameters(policy.chunks[0])))} tensors)")
    print(f"weight sync: {t_sync:.3f} s = {total / t_sync / 1e9:.3f} GB/s "
          f"(gather {phases['sync/gather_s']:.3f} s, transfer {phases['sync/transfer_s']:.3f} s, "
          f"engine load {phases['sync/engine_load_s']:.3f} s)")
    handle = last["h"].metrics()
    print(f"colocated sync by handle: {t_handle:.3f} s = {total / t_handle / 1e9:.3f} GB/s "
          f"(gather {handle['sync/gather_s']:.3f} s, pack + serialize {handle['sync/transfer_s']:.3f} s, "
          f"engine load {handle['sync/engine_load_s']:.3f} s)")
    print(f"peak extra memory of one sync: {peak / 1e6:.1f} MB = {peak / (a.bucket_mb << 20):.2f} x the "
          f"{a.bucket_mb} MiB bucket = {peak / total:.3f} x the weights")
    print(f"plain copy of the same bytes: {t_copy:.4f} s = {total / t_copy / 1e9:.2f} GB/s")
    print(f"ratio (sync GB/s / copy GB/s): {t_copy / t_sync:.4f}")
    print(f"ratio (colocated GB/s / copy GB/s): {t_copy / t_handle:.4f}")
    print(f"ratio (colocated GB/s / broadcast GB/s): {t_sync / t_handle:.2f}")
    parallel.destroy()


if __name__ == "__main__":
    main()
