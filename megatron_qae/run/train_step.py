"""One optimizer step (and the forward-only log-prob pass) through megatron's schedule.

What it does: feeds micro-batches to `get_forward_backward_func` (which runs the micro-batch
and pipeline schedule), computes per-token log-probs on the last pipeline stage, applies the
objective (algorithm/objective.py, reading the `algo` config section) with the global token-
or sequence-mean denominator, stops
on a non-finite loss before the optimizer, clips gradients and steps optimizer + LR schedule.
What it does not: build batches (batching.py) or compute advantages (advantage.py).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_qae.model import cpu_compat
from megatron_qae.batch.micro_batch import MicroBatch
from megatron_qae.batch.packing import packed_seq_params
from megatron_qae.algorithm.aggregation import Aggregation
from megatron_qae.algorithm.losses.registry import LossInputs
from megatron_qae.algorithm.logprobs import response_logprobs
from megatron_qae.algorithm.objective import aggregation, metric_names, needs_selection, total_loss
from megatron_qae.config.algo import AlgoConfig
from megatron_qae.model.policy import Policy, finish_param_sync
from megatron_qae.model.reference import Reference
from megatron_qae.batch.token_selection import with_cov_selection


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm of a step was NaN or inf; the optimizer was not stepped."""


def run_schedule(policy: Policy | Reference, mbs: list[MicroBatch], loss_fn, forward_only: bool) -> list:
    """megatron's schedule over `mbs`; returns the loss functions' dicts, one per micro-batch
    in order, on the last pipeline stage (empty elsewhere)."""
    device = cpu_compat.default_device()
    # bf16 (Float16Module): keep the logits in bf16; the log-prob code upcasts what it uses.
    out_kwargs = {"fp32_output": False} if policy.config.bf16 else {}

    def forward_step(data_iterator, model):
        # Every micro-batch goes through the device copy, on CPU as on GPU; the loss function
        # sees the copy, and what it computes leaves through its return value only.
        mb = next(data_iterator).to(device)
        # No mask tensor: the layer specs' attention is AttnMaskType.causal, which builds its
        # own mask (local softmax) or ignores one (Transformer Engine); right padding is
        # never attended to by real tokens, so causal is exact. A packed micro-batch instead
        # carries its sequence boundaries in THD parameters (packing.py), on CPU as on GPU.
        output = model(mb.tokens, mb.position_ids, None, packed_seq_params=packed_seq_params(mb), **out_kwargs)
        return output, partial(loss_fn, mb)

    chunks = policy.chunks
    iters = [iter(mbs) for _ in chunks] if len(chunks) > 1 else iter(mbs)
    longest = max(mb.tokens.shape[1] for mb in mbs)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(mbs),
        seq_length=longest,
        micro_batch_size=max(mb.tokens.shape[0] for mb in mbs),
        forward_only=forward_only,
    )


@torch.no_grad()
def compute_logprobs(
    policy: Policy | Reference, mbs: list[MicroBatch], temperature: float = 1.0, chunk_tokens: int = 4096
) -> list[torch.Tensor | None]:
    """The policy's log-probs [b, s] of each micro-batch's targets (0 outside the response,
    on CPU), in the order of `mbs`; None for every micro-batch on ranks outside the last
    pipeline stage, which never see logits. Attach them with `batching.with_old_logprobs`.
    Computed over response tokens only, `chunk_tokens` at a time (train.logprob_chunk_tokens).
    With the frozen `Reference` these are the reference log-probs of the KL penalty."""
    tp_group = policy.groups.tp

    def loss_fn(mb: MicroBatch, logits: torch.Tensor):
        lp, _ = response_logprobs(logits, mb.targets, mb.loss_mask, tp_group, temperature, chunk_tokens)
        full = torch.zeros(mb.loss_mask.shape, dtype=torch.float32, device=lp.device)
        full[mb.loss_mask.bool()] = lp
        return torch.zeros((), device=logits.device), {"logprobs": full.cpu()}

    if isinstance(policy, Policy):
        finish_param_sync(policy)  # no training forward (and its param all-gather) precedes this one
    for chunk in policy.chunks:
        chunk.eval()
    out = run_schedule(policy, mbs, loss_fn, forward_only=True)
    if not policy.groups.is_last_stage:
        return [None] * len(mbs)
    assert len(out) == len(mbs), (len(out), len(mbs))
    return [d["logprobs"] for d in out]


def _loss_fn(algo: AlgoConfig, agg: Aggregation, temperature: float, chunk_tokens: int, tp_group,
             mb: MicroBatch, logits: torch.Tensor):
    if mb.old_logprobs is None:
        raise ValueError("a micro-batch reached the loss without old log-probs; pass the "
                         "micro-batches through compute_logprobs and with_old_logprobs first")
    pick = mb.loss_mask.bool()
    lp, entropy = response_logprobs(logits, mb.targets, mb.loss_mask, tp_group, temperature,
                                    chunk_tokens, with_entropy=True, entropy_grad=algo.entropy_coef > 0)

    def rows(flat: torch.Tensor) -> torch.Tensor:
        # Back to [b, s] (0 outside the response), differentiably: the losses work per response.
        return torch.zeros(pick.shape, dtype=flat.dtype, device=flat.device).masked_scatter(pick, flat)

    # One row per response whether padded or packed: the losses reduce per response.
    view = mb.per_sample
    loss, metrics = total_loss(LossInputs(
        view(rows(lp)), view(mb.old_logprobs), view(mb.advantages), view(mb.loss_mask),
        view(mb.rollout_logprobs), view(rows(entropy)), view(mb.ref_logprobs), view(mb.cov_selected)), agg, algo)
    rollout = mb.rollout_logprobs[pick]
    metrics["loss/entropy_sum"] = entropy.detach().sum()
    metrics["loss/logprob_gap_sum"] = (lp.detach() - rollout).abs().sum()
    metrics["loss/loss_sum"] = loss.detach()
    metrics["loss/tokens"] = pick.sum().to(lp.dtype)
    # 3-tuple + calculate_per_token_loss: megatron neither divides by micro-batch count
    # nor by tokens; the global mean is already in `loss`.
    num_tokens = pick.sum().to(torch.int)
    return loss, num_tokens, metrics


def _reduce_metrics(policy: Policy, per_mb: list[dict], algo: AlgoConfig) -> dict[str, float]:
    """Sum token-sum metrics over micro-batches and DP ranks; mean per trained response token
    (skipped zero-advantage samples are not in the forward pass, so not in these means)."""
    names = [*metric_names(algo), "loss/entropy_sum", "loss/logprob_gap_sum", "loss/loss_sum", "loss/tokens"]
    sums = torch.zeros(len(names), dtype=torch.float64)
    for m in per_mb:
        if m:
            sums += torch.stack([m[n].detach().double().cpu() for n in names])
    groups = policy.groups
    # Only the last pipeline stage computed losses; it sums over DP, then shares with the
    # other stages so every rank returns the same metrics.
    dist.all_reduce(sums, group=groups.dp)
    src = dist.get_global_rank(groups.pp, groups.dims.pp - 1) if groups.dims.pp > 1 else None
    if src is not None:
        dist.broadcast(sums, src=src, group=groups.pp)
    trained = float(sums[names.index("loss/tokens")])
    out = {n.replace("_sum", "").replace("_tokens", "_frac"): float(v) / max(trained, 1.0)
           for n, v in zip(names[:-2], sums.tolist())}
    out["loss/loss"] = float(sums[names.index("loss/loss_sum")])
    out["loss/trained_tokens"] = trained
    return out


def forward_backward(
    policy: Policy,
    mbs: list[MicroBatch],
    global_tokens: int,
    algo: AlgoConfig,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    global_samples: int = 0,
    step: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """Gradients of the global-mean loss over this rank's micro-batches (DP-reduced).

    `global_tokens` / `global_samples`: response tokens / responses of the whole mini-batch
    (samples only for GSPO's sequence-mean). Clip-Cov / KL-Cov first run a forward-only pass
    for the current log-probs their mini-batch-wide token selection needs (Clip-Cov's draw
    seeded by `seed`, the run's seed, and `step`)."""
    agg = aggregation(algo, global_tokens, global_samples)
    if needs_selection(algo):
        current = compute_logprobs(policy, mbs, temperature, chunk_tokens)
        if policy.groups.is_last_stage:
            mbs = with_cov_selection(mbs, current, algo, seed, step, policy.groups.dp)
    for chunk in policy.chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    policy.optimizer.zero_grad()
    loss_fn = partial(_loss_fn, algo, agg, temperature, chunk_tokens, policy.groups.tp)
    per_mb = run_schedule(policy, mbs, loss_fn, forward_only=False)
    return _reduce_metrics(policy, per_mb, algo)


def train_step(
    policy: Policy,
    mbs: list[MicroBatch],
    global_tokens: int,
    algo: AlgoConfig,
    step: int,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    global_samples: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches of a global mini-batch.

    `global_tokens` / `global_samples` are the response-token / response counts of the whole
    mini-batch over all DP ranks (skipped samples included); `seed` (run.seed) seeds
    Clip-Cov's token draw.
    Raises NonFiniteLossError (naming `step`) before the optimizer when the loss is not
    finite, and after it when the gradient norm is not (megatron then skips the update).
    """
    metrics = forward_backward(policy, mbs, global_tokens, algo, temperature, chunk_tokens,
                               global_samples, step, seed)
    if not math.isfinite(metrics["loss/loss"]):
        raise NonFiniteLossError(
            f"step {step}: loss is {metrics['loss/loss']}; the optimizer was not stepped. "
            "Check the rewards/advantages and the learning rate."
        )
    ok, grad_norm, _ = policy.optimizer.step()
    if not ok or grad_norm is None or not math.isfinite(grad_norm):
        raise NonFiniteLossError(
            f"step {step}: gradient norm is {grad_norm}. "
            "Lower optim.lr or check the data of this step."
        )
    policy.scheduler.step(increment=1)
    metrics["train/grad_norm"] = float(grad_norm)
    metrics["train/lr"] = float(policy.optimizer.param_groups[0]["lr"])
    return metrics


def logprob_gap(policy: Policy, mbs: list[MicroBatch]) -> float:
    """Mean |trainer - rollout| log-prob over the response tokens of `mbs` (all DP ranks),
    from the old log-probs `with_old_logprobs` attached (the weights the engines sampled
    with); every rank returns the last stage's value."""
    sums = torch.zeros(2, dtype=torch.float64)
    for mb in mbs:
        if mb.old_logprobs is not None:
            sums[0] += ((mb.old_logprobs - mb.rollout_logprobs).abs() * mb.loss_mask).sum().double()
            sums[1] += mb.loss_mask.sum().double()
    groups = policy.groups
    dist.all_reduce(sums, group=groups.dp)
    if groups.dims.pp > 1:
        dist.broadcast(sums, src=dist.get_global_rank(groups.pp, groups.dims.pp - 1), group=groups.pp)
    return float(sums[0] / sums[1].clamp(min=1.0))
