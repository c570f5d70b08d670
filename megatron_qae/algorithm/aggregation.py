"""How a per-token loss becomes one scalar: the global token-mean or the global sequence-mean.

What it does: reduces a [b, t] per-token loss over the response mask of one micro-batch,
dividing by counts of the whole global mini-batch (all micro-batches, all DP ranks, skipped
zero-advantage samples included), so summing the micro-batches' values gives the same loss and
gradient however the mini-batch is split. 'token-mean' divides the token sum by the global
token count (DAPO); 'seq-mean-token-mean' averages each response over its own tokens and
divides by the global response count (GSPO, verl's loss_agg_mode of that name). What it does
not: choose the mode (each policy loss registers its own, losses/registry.py) or count the
tokens (batching.py does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean")


@dataclass(frozen=True)
class Aggregation:
    """The reduction of one global mini-batch."""

    mode: str
    """'token-mean' or 'seq-mean-token-mean'."""
    global_tokens: int
    """Response tokens of the whole mini-batch (every DP rank, skipped samples included)."""
    global_samples: int = 0
    """Responses of the whole mini-batch (every DP rank, skipped samples included); needed by
    'seq-mean-token-mean'."""

    def __post_init__(self) -> None:
        if self.mode not in AGG_MODES:
            raise ValueError(f"aggregation mode {self.mode!r} is not one of {AGG_MODES}")
        if self.mode == "seq-mean-token-mean" and self.global_samples <= 0:
            raise ValueError(f"global_samples={self.global_samples}: 'seq-mean-token-mean' needs the "
                             "mini-batch's response count (> 0); pass it to the train step")

    def reduce(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the mini-batch loss; per_token and mask are [b, t]."""
        keep = mask.bool()
        # where, not a product: a non-finite value outside the mask must not reach the sum.
        masked = torch.where(keep, per_token, torch.zeros_like(per_token))
        if self.mode == "token-mean":
            return masked.sum() / self.global_tokens
        lengths = keep.sum(-1).clamp(min=1).to(per_token.dtype)
        return (masked.sum(-1) / lengths).sum() / self.global_samples
