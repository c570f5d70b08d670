"""Bytes rank 0 sends per rollout step: the whole batch pickled to every rank vs the lean hand-off.

Runs under torchrun (gloo, no model): rank 0 holds a synthetic rollout batch (G responses per
prompt, responses spread over a range of lengths, binary rewards: QAE advantages with many exact zeros),
then (a) the baseline: `broadcast_from_driver` of the whole RolloutBatch (pickled, sent to
every other rank); (b) the lean hand-off (batch/shard.py `scatter_shards`): each DP rank's
TrainShard as tensors, in one scatter. Prints the bytes of both, the advantage all-gather's
bytes (the same in both), their ratio and rank 0's wall times (median and min of --repeats
hand-offs each way, interleaved).

    python -m torch.distributed.run --nproc_per_node=4 -m benchmarks.bench_handoff --tp 2
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time

import torch
import torch.distributed as dist

from megatron_qae.model import parallel
from megatron_qae.batch import shard as sh
from megatron_qae.config.algo import AlgoConfig
from megatron_qae.config.sections import ParallelConfig
from testsupport.tiny import synthetic_batch


def advantage_gather_bytes(n: int, dp: int) -> int:
    """What the advantage all-gather moves (each DP rank's (group id int64, score float32)
    pairs, padded to the longest share, plus its count, to every other DP rank), the same
    before and after."""
    return (8 + -(-n // dp) * 12) * dp * (dp - 1)


def _spread(seconds: list[float]) -> str:
    """Rank 0's wall time: median (min) over the repeats."""
    return f"{statistics.median(seconds):.3f} s median ({min(seconds):.3f} s min) of {len(seconds)}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-response", type=int, default=2048)
    ap.add_argument("--mini-batch-prompts", type=int, default=8)
    ap.add_argument("--no-skip", action="store_true", help="train zero-advantage samples too (a loss with KL)")
    ap.add_argument("--repeats", type=int, default=7, help="hand-offs timed, each way (median and min printed)")
    a = ap.parse_args()
    groups = parallel.init_distributed(ParallelConfig(tp=a.tp))
    batch = synthetic_batch(a.prompts, a.n, a.prompt_tokens, a.max_response) if dist.get_rank() == 0 else None
    world = dist.get_world_size()

    algo = AlgoConfig()  # QAE, K = 0.4: binary rewards give many exact zero advantages
    before_s, after_s = [], []
    for _ in range(a.repeats):  # interleaved, so both see the same load
        dist.barrier()
        t0 = time.perf_counter()
        whole = parallel.broadcast_from_driver(batch, groups)
        before_s.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        sent = sh.HandoffBytes()
        shard = sh.scatter_shards(batch, algo, a.mini_batch_prompts * a.n, not a.no_skip, groups, sent)
        after_s.append(time.perf_counter() - t0)
    before = len(pickle.dumps(batch)) * (world - 1) if batch is not None else 0
    samples = whole.samples
    received = shard.scores.numel()
    counts = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([float(received)]))
    if dist.get_rank() == 0:
        adv = advantage_gather_bytes(len(samples), groups.dims.dp)
        tokens = sum(s.num_tokens for s in samples)
        skipped = sum(x.skipped_scores.numel() for x in sh.build_shards(samples, algo, a.mini_batch_prompts * a.n,
                                                                         True, groups.dims.dp))
        zero = skipped / len(samples)
        print(f"world {world} (tp {a.tp}, dp {groups.dims.dp}); {len(samples)} samples, {tokens:,} tokens, "
              f"{zero:.0%} zero advantages ({'trained' if a.no_skip else 'skipped'}); "
              f"samples received per rank {[int(c) for c in counts]}")
        print(f"before: whole batch pickled to every rank {before:,} B (+ advantage all-gather {adv:,} B), "
              f"{_spread(before_s)}")
        print(f"after:  lean hand-off {sent.sent:,} B {sent.by_part} (+ advantage all-gather {adv:,} B), "
              f"{_spread(after_s)}")
        print(f"bytes ratio before/after (hand-off + all-gather): {(before + adv) / (sent.sent + adv):.2f}x")
    parallel.destroy()


if __name__ == "__main__":
    main()
