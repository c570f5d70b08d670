"""The Clip-Cov / KL-Cov token selection of one mini-batch, over all its DP ranks.

What it does: given this rank's micro-batches and their current log-probs (a forward-only pass
with the weights of this optimizer step), gathers every response token's (advantage, log-prob,
old log-prob) from the DP ranks in sample order, runs the pure selection of
algorithm/cov_selection.py on the whole mini-batch (every rank computes the same picks: same
inputs, same seeded generator), and returns micro-batches carrying their tokens' picks as
`cov_selected`. So the step does not depend on how the mini-batch is split into micro-batches
or DP ranks. Cost: one forward-only pass per optimizer step and an all-gather of three floats
per response token of the mini-batch over the DP group. What it does not: run the forward pass
(run/train_step.py) or apply the selection (algorithm/losses/clip_cov.py / kl_cov.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from megatron_qae.algorithm.losses.registry import get_policy_loss
from megatron_qae.batch.batching import MicroBatch
from megatron_qae.config.algo import AlgoConfig


def _rows(mbs: list[MicroBatch], current: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """sample index -> [3, r] (advantage, current log-prob, old log-prob) of its response."""
    out = {}
    for mb, lp in zip(mbs, current):
        for sample, row, cols in mb.sample_spans():
            pick = mb.loss_mask[row, cols].bool()
            out[sample] = torch.stack([mb.advantages[row, cols][pick], lp[row, cols][pick],
                                       mb.old_logprobs[row, cols][pick]])
    return out


def selection_generator(seed: int, step: int) -> torch.Generator:
    """Clip-Cov's draw for optimizer step `step`: the same on every rank, new every step
    (wrapped into torch's seed range, [0, 2**64))."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**64)


def with_cov_selection(mbs: list[MicroBatch], current: list[torch.Tensor | None], algo: AlgoConfig,
                       seed: int, step: int, dp_group: dist.ProcessGroup | None) -> list[MicroBatch]:
    """`mbs` with `cov_selected` attached, picked by the selection algo.policy_loss registered
    (its draw seeded by `seed`, the run's seed, and `step`). Collective over `dp_group`; call on
    the last pipeline stage only (`current` is None elsewhere, and no loss is computed there)."""
    mine = _rows(mbs, current)
    shares: list = [None] * (dist.get_world_size(dp_group) if dp_group is not None else 1)
    if len(shares) > 1:
        dist.all_gather_object(shares, mine, group=dp_group)
    else:
        shares = [mine]
    every = {k: v for share in shares for k, v in share.items()}
    order = sorted(every)
    flat = torch.cat([every[k] for k in order], dim=1) if order else torch.zeros(3, 0)
    adv, lp, old = flat[0], flat[1], flat[2]
    select = get_policy_loss(algo.policy_loss).selection
    assert select is not None, f"{algo.policy_loss} has no token selection; the train step asks first"
    picked = select(adv, lp, old, algo, selection_generator(seed, step))
    starts, offset = {}, 0
    for k in order:
        starts[k] = offset
        offset += every[k].shape[1]
    out = []
    for mb in mbs:
        sel = torch.zeros_like(mb.loss_mask)
        for sample, row, cols in mb.sample_spans():
            pick = mb.loss_mask[row, cols].bool()
            n = int(pick.sum())
            sel[row, cols][pick] = picked[starts[sample]: starts[sample] + n].to(sel.dtype)
        out.append(dataclasses.replace(mb, cov_selected=sel))
    return out
