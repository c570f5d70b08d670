"""torchrun worker: every DP rank's advantages from its own TrainShard (the DP-aware reduction,
one all-gather) equal the single-process advantages of the whole batch, bit for bit."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_qae.algorithm.advantage import compute_group_advantages  # noqa: E402
from megatron_qae.batch.shard import build_shards, shard_advantages  # noqa: E402
from megatron_qae.config.algo import AlgoConfig  # noqa: E402
from testsupport.tiny import synthetic_batch  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    failures, checked = [], 0
    for seed in range(6):
        samples = synthetic_batch(prompts=5 + seed, n=4, prompt_tokens=3, max_response=12, seed=seed).samples
        per_mini = 4 * (1 + seed % 3)
        for algo in (AlgoConfig(), AlgoConfig(quantile_k=0.7), AlgoConfig(quantile_k=0.4, norm_adv_by_std=False)):
            scores = torch.tensor([s.reward for s in samples], dtype=torch.float32)
            gids = torch.tensor([s.group_id for s in samples], dtype=torch.int64)
            full, full_m = compute_group_advantages(scores, gids, quantile_k=algo.effective_quantile_k,
                                                    quantile_method=algo.quantile_method,
                                                    norm_by_std=algo.norm_adv_by_std, eps=algo.adv_eps)
            for skip in (False, True):
                mine = build_shards(samples, algo, per_mini, skip, world)[rank]
                adv, metrics = shard_advantages(mine, algo, dist.group.WORLD)
                at = (mine.mini_batch * per_mini + mine.index).tolist()
                if not torch.equal(adv, full[at]) or metrics != full_m:
                    failures.append((seed, algo.quantile_k, skip))
                checked += 1
    if failures:
        raise SystemExit(f"rank {rank}: shard advantages != single-process for {failures}")
    print(f"rank {rank}: {checked} shards equal")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
