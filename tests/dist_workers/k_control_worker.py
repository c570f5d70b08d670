"""torchrun worker: the K controller on every DP rank, fed by what each rank sees (its shard's
adv/* metrics through the DP all-gather, an entropy all-reduced from per-rank token sums as the
train step reduces it), holds the same K on every rank, step after step, and that K sequence
equals the one a single process computes from the whole batch."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_qae.algorithm import k_control  # noqa: E402
from megatron_qae.algorithm.k_control import KState  # noqa: E402
from megatron_qae.batch.shard import build_shards, shard_advantages  # noqa: E402
from megatron_qae.config.algo import AlgoConfig, KControlConfig  # noqa: E402
from testsupport.tiny import synthetic_batch  # noqa: E402

STEPS, PER_MINI = 12, 8


def _step_metrics(shard, algo: AlgoConfig, group) -> dict[str, float]:
    """adv/* as shard_advantages returns them; 'loss/entropy' = sum over trained tokens of a
    per-group stand-in entropy / trained tokens, summed over ranks (train_step's reduction)."""
    _, metrics = shard_advantages(shard, algo, group)
    h = 0.5 + 0.1 * (shard.group_ids % 5).double()
    sums = torch.stack([(h * shard.response_tokens.double()).sum(), shard.response_tokens.double().sum()])
    if group is not None:
        dist.all_reduce(sums, group=group)
    return {**metrics, "loss/entropy": float(sums[0] / sums[1])}


def _sequence(kc: KControlConfig, rank: int | None, world: int) -> list[float]:
    algo = AlgoConfig(k_control=kc)
    state, ks = KState(algo.quantile_k), []
    for step in range(STEPS):
        samples = synthetic_batch(prompts=6, n=4, prompt_tokens=3, max_response=12, seed=step).samples
        step_algo = k_control.algo_at(algo, state)
        shards = build_shards(samples, step_algo, PER_MINI, True, world)
        mine = shards[rank] if rank is not None else shards[0]
        state, _ = k_control.update(algo, state, _step_metrics(mine, step_algo, dist.group.WORLD if rank is not None else None))
        ks.append(state.k)
    return ks


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for kc in (KControlConfig(enabled=True, low=0.68, high=0.72, step=0.05, window=1),
               KControlConfig(enabled=True, target="nonzero_adv_frac", low=0.45, high=0.55, step=0.1, window=2)):
        mine = _sequence(kc, rank, world)
        every = [None] * world
        dist.all_gather_object(every, mine)
        single = _sequence(kc, None, 1)
        if any(ks != mine for ks in every) or mine != single:
            raise SystemExit(f"rank {rank} {kc.target}: K per rank {every}, single process {single}")
        if len(set(mine)) < 2:
            raise SystemExit(f"rank {rank} {kc.target}: K never moved {mine}; the test would not see a difference")
        print(f"rank {rank}: {kc.target} K equal on {world} ranks: {mine}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
