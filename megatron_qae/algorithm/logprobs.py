"""Per-token log-probs and entropy from vocab-parallel logits (correct under tensor parallel).

What it does: turns the last pipeline stage's logits [b, s, vocab/tp] into the log-prob of
each next token and the policy entropy at each position, reducing over the TP group;
`response_logprobs` does it over the response positions only, a chunk of rows at a time, so
the fp32 [tokens, vocab/tp] temporaries are chunk-sized (in backward too: each chunk is
recomputed there); the entropy is differentiable too (for the entropy bonus). What it does
not: aggregate or build a loss (algorithm/objective.py does).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from torch.utils.checkpoint import checkpoint


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(targets) [b, s] from vocab-parallel logits [b, s, v/tp]; differentiable.

    Works on a fresh fp32 copy (megatron's vocab-parallel cross-entropy subtracts the max in
    place), so `logits` is left as it was.
    """
    scaled = logits.to(torch.float32, copy=True)
    if temperature != 1.0:
        scaled.div_(temperature)
    return -vocab_parallel_cross_entropy(scaled, targets, tp_group=tp_group)


def token_entropy(
    logits: torch.Tensor, tp_group: dist.ProcessGroup | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution [b, s] from vocab-parallel logits;
    differentiable (the entropy bonus), and cheap to call under no_grad as a metric."""
    x = logits.float() / temperature
    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    # The max only keeps exp finite; H does not depend on it, so it carries no gradient.
    local_max = x.detach().max(dim=-1).values
    if tp > 1:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = x - local_max.unsqueeze(-1)
    exp = shifted.exp()
    sums = torch.stack([exp.sum(dim=-1), (exp * shifted).sum(dim=-1)])
    if tp > 1:
        # Forward: sum over the vocab shards; backward: identity (each TP rank holds the same
        # loss, so its gradient must not be summed again).
        sums = reduce_from_tensor_model_parallel_region(sums, tp_group)
    # H = log Z - E[x], with x shifted by the max so that Z is finite.
    return sums[0].log() - sums[1] / sums[0]


def response_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    temperature: float,
    chunk_tokens: int,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(target) [n], entropy [n] or None) at the n positions where `mask` [b, s] is
    set, in row-major order; logits [b, s, v/tp], targets [b, s]. The entropy carries a
    gradient only with `entropy_grad` (the entropy bonus); otherwise it is a metric.

    Prompt and padding positions never reach the fp32 code, and `chunk_tokens` rows are
    handled at a time. With grad, each chunk runs under activation checkpointing: backward
    keeps only the bf16 rows and recomputes one chunk's fp32 softmax at a time. Every TP rank
    has the same mask, so the chunks' TP reductions line up.
    """
    pick = mask.bool()
    rows, tgt = logits[pick], targets[pick]
    if rows.shape[0] == 0:
        # Nothing to score; an empty result still tied to the logits keeps backward valid.
        empty = rows.float().sum(-1)
        return empty, (empty.detach() if with_entropy else None)
    lps, ents = [], []
    for lo in range(0, rows.shape[0], chunk_tokens):
        part, part_tgt = rows[lo: lo + chunk_tokens], tgt[lo: lo + chunk_tokens]
        if with_entropy and entropy_grad and part.requires_grad:
            ents.append(checkpoint(token_entropy, part, tp_group, temperature, use_reentrant=False))
        elif with_entropy:
            with torch.no_grad():
                ents.append(token_entropy(part, tp_group, temperature))
        if part.requires_grad:
            lps.append(checkpoint(token_logprobs, part, part_tgt, tp_group, temperature, use_reentrant=False))
        else:
            lps.append(token_logprobs(part, part_tgt, tp_group, temperature))
    return torch.cat(lps), (torch.cat(ents) if with_entropy else None)
