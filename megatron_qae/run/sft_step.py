"""Supervised warm start: one cross-entropy optimizer step through the train step's machinery.

What it does: `sft_micro_batches` turns (prompt ids, target ids) pairs into this DP rank's
micro-batches with the RL batching code (targets in the response slot, so the same loss mask
picks them); `sft_step` runs them through megatron's schedule (`train_step.run_schedule`) with
the token-mean negative log-likelihood over every target token of the global batch (the same
global-token-mean denominator and 3-tuple loss contract as the RL loss), stops on a non-finite
loss before the optimizer, and steps optimizer + LR schedule. The CPU demo uses it to bring a
random init to a policy RL can improve, as real RL runs start from an SFT model. What it does
not: pick data, loop over steps or save (megatron_qae.sft does).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist

from megatron_qae.algorithm.logprobs import response_logprobs
from megatron_qae.model.policy import Policy
from megatron_qae.batch.batching import MicroBatch, rank_micro_batches
from megatron_qae.run.train_step import NonFiniteLossError, run_schedule
from rollout_sglang.types import Sample


def sft_micro_batches(pairs: list[tuple[tuple[int, ...], tuple[int, ...]]], dp_rank: int, dp: int,
                      max_tokens: int, seq_multiple: int = 1, count_multiple: int = 1) -> list[MicroBatch]:
    """This DP rank's micro-batches of (prompt ids, target ids) pairs; the loss mask is 1 at
    the positions that predict a target token."""
    samples = [Sample(i, tuple(p), tuple(t), (0.0,) * len(t), "stop", 0.0, 0.0, 0)
               for i, (p, t) in enumerate(pairs)]
    mbs, _ = rank_micro_batches(samples, [0.0] * len(samples), dp_rank, dp, max_tokens,
                                False, seq_multiple, count_multiple)
    return mbs


def _nll_loss(global_tokens: int, chunk_tokens: int, tp_group, mb: MicroBatch, logits: torch.Tensor):
    lp, _ = response_logprobs(logits, mb.targets, mb.loss_mask, tp_group, 1.0, chunk_tokens)
    # Divided by the global batch's target tokens here; megatron divides by nothing more
    # (calculate_per_token_loss), so any micro-batch / DP split gives the same gradient.
    loss = -lp.sum() / global_tokens
    correct = lp.detach().exp().sum()  # expected number of targets sampled right, token by token
    return loss, mb.loss_mask.sum().to(torch.int), {"sft/nll_sum": -lp.detach().sum(), "sft/p_target_sum": correct,
                                                    "sft/tokens": torch.tensor(float(lp.numel()))}


def sft_step(policy: Policy, mbs: list[MicroBatch], global_tokens: int, step: int,
             chunk_tokens: int = 4096) -> dict[str, float]:
    """One optimizer step of token-mean cross-entropy over this rank's micro-batches of a
    global batch with `global_tokens` target tokens; returns sft/nll and sft/p_target (the
    mean probability of the target token), the same on every rank."""
    for chunk in policy.chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    policy.optimizer.zero_grad()
    per_mb = run_schedule(policy, mbs, partial(_nll_loss, global_tokens, chunk_tokens, policy.groups.tp),
                          forward_only=False)
    sums = torch.zeros(3, dtype=torch.float64)
    for m in per_mb:
        sums += torch.stack([m[k].detach().double().cpu() for k in ("sft/nll_sum", "sft/p_target_sum", "sft/tokens")])
    groups = policy.groups
    dist.all_reduce(sums, group=groups.dp)
    if groups.dims.pp > 1:  # only the last stage saw logits
        dist.broadcast(sums, src=dist.get_global_rank(groups.pp, groups.dims.pp - 1), group=groups.pp)
    nll = float(sums[0] / sums[2].clamp(min=1.0))
    if not math.isfinite(nll):
        raise NonFiniteLossError(f"sft step {step}: loss is {nll}; the optimizer was not stepped")
    ok, grad_norm, _ = policy.optimizer.step()
    if not ok or grad_norm is None or not math.isfinite(grad_norm):
        raise NonFiniteLossError(f"sft step {step}: gradient norm is {grad_norm}; lower the learning rate")
    policy.scheduler.step(increment=1)
    return {"sft/nll": nll, "sft/p_target": float(sums[1] / sums[2].clamp(min=1.0)),
            "sft/grad_norm": float(grad_norm)}
