"""Per-token log-probs and entropy from vocab-parallel logits (correct under tensor parallel).

What it does: turns the last pipeline stage's logits [b, s, vocab/tp] into the log-prob of
each next token and the policy entropy at each position, reducing over the TP group.
What it does not: mask, aggregate or build a loss (loss.py does).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(targets) [b, s] from vocab-parallel logits [b, s, v/tp]; differentiable.

    megatron's vocab-parallel cross-entropy subtracts the max in place, so callers that also
    need the entropy compute it first.
    """
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    return -vocab_parallel_cross_entropy(scaled, targets, tp_group=tp_group)


@torch.no_grad()
def token_entropy(
    logits: torch.Tensor, tp_group: dist.ProcessGroup | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution [b, s] from vocab-parallel logits.

    A metric only: the DAPO loss has no entropy term, so no gradient flows through it.
    """
    x = logits.float() / temperature
    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    local_max = x.max(dim=-1).values
    if tp > 1:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = x - local_max.unsqueeze(-1)
    exp = shifted.exp()
    sum_exp = exp.sum(dim=-1)
    sum_exp_logit = (exp * shifted).sum(dim=-1)
    if tp > 1:
        stacked = torch.stack([sum_exp, sum_exp_logit])
        dist.all_reduce(stacked, group=tp_group)
        sum_exp, sum_exp_logit = stacked[0], stacked[1]
    # H = log Z - E[x], with x shifted by the max so that Z is finite.
    return sum_exp.log() - sum_exp_logit / sum_exp
