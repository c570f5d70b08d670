"""torchrun worker: DP-aware advantages over random uneven splits vs the single-process result."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_qae.algorithm.advantage import compute_group_advantages  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    failures = []
    for trial in range(20):
        g = torch.Generator().manual_seed(trial)
        n = int(torch.randint(1, 80, (1,), generator=g))
        gids = torch.randint(0, 9, (n,), generator=g) * 3 + 100
        if trial % 2:
            scores = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1 - torch.rand(n, generator=g) * 0.4
        else:
            scores = torch.randn(n, generator=g)
        owner = torch.randint(0, world, (n,), generator=g)
        if trial == 3:
            owner[:] = 0  # one rank with no samples at all
        for k, method in [(0.4, "linear"), (0.4, "inverted_cdf"), (0.7, "linear"), (-1.0, "linear")]:
            full, full_m = compute_group_advantages(scores, gids, quantile_k=k, quantile_method=method)
            mine = owner == rank
            local, local_m = compute_group_advantages(scores[mine], gids[mine], quantile_k=k,
                                                      quantile_method=method, dp_group=dist.group.WORLD)
            if not torch.equal(local, full[mine]) or local_m != full_m:
                failures.append((trial, k, method))
    if failures:
        raise SystemExit(f"rank {rank}: distributed != single-process for {failures}")
    print(f"rank {rank}: 80 splits equal")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
