"""The micro-batch: the tensors one forward/backward of the train step takes.

What it does: `MicroBatch` holds a micro-batch's token ids, positions, targets, loss mask,
advantages and log-probs, padded (one row per sample) or packed (one row, `cu_seqlens`);
`with_old_logprobs` attaches the old log-probs. What it does not: decide which samples go
together (batching.py) or lay packed rows out (packing.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Samples = Sequence[Any] | Mapping[int, Any]
"""What micro-batches are built from, indexed by the sample's index in its mini-batch: a list
over the whole mini-batch, or a dict holding one DP rank's share only (shard.py). Items are
`rollout_sglang.types.Sample` or anything with its prompt_ids / response_ids /
rollout_logprobs / num_tokens (shard.ShareSample); advantages are floats."""


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch; all tensors [b, s] unless noted. Padded: one row per sample, s = the
    longest sample rounded up. Packed (`cu_seqlens` set): b = 1, the samples end to end.

    Frozen: the train step works on device copies, so anything computed from a micro-batch
    comes back as a return value (`with_old_logprobs` makes the new micro-batches)."""

    tokens: torch.Tensor
    """Prompt + response token ids, right-padded with 0 (int64)."""
    position_ids: torch.Tensor
    """0..s-1 per row (int64)."""
    targets: torch.Tensor
    """tokens shifted left by one (next-token targets, int64)."""
    loss_mask: torch.Tensor
    """1.0 where `targets` is a response token, else 0.0."""
    advantages: torch.Tensor
    """Sequence advantage broadcast to its response positions (float32)."""
    rollout_logprobs: torch.Tensor
    """Engine log-probs of the response tokens at their positions (float32)."""
    sample_index: list[int]
    """Index of each row in the list of samples the micro-batch was built from."""
    old_logprobs: torch.Tensor | None = None
    """Trainer log-probs before this rollout step's updates (`compute_logprobs`), 0 outside
    the response; None until `with_old_logprobs` attaches them."""
    ref_logprobs: torch.Tensor | None = None
    """Reference policy log-probs (KL penalty), 0 outside the response; None without KL."""
    cov_selected: torch.Tensor | None = None
    """1.0 on the tokens the Clip-Cov / KL-Cov selection picked (run/token_selection.py)."""
    cu_seqlens: torch.Tensor | None = None
    """Packed micro-batches only (packing.py; then b = 1): start offset of each packed
    sequence in the row plus the row length, [n + 1] int32; None for a padded micro-batch."""
    max_seqlen: int = 0
    """Packed micro-batches only: the longest packed sequence (tokens)."""

    @property
    def num_response_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    @property
    def padded_tokens(self) -> int:
        return self.tokens.numel()

    def sample_spans(self) -> list[tuple[int, int, slice]]:
        """(sample index, row, columns) of every sample: a whole row when padded, its
        `cu_seqlens` segment of row 0 when packed."""
        if self.cu_seqlens is None:
            return [(s, row, slice(None)) for row, s in enumerate(self.sample_index)]
        cu = self.cu_seqlens.tolist()
        return [(s, 0, slice(cu[i], cu[i + 1])) for i, s in enumerate(self.sample_index)]

    def per_sample(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """`x` [b, s] as one row per sample [n, longest] (zeros after each sample's end), the
        view the per-response losses take (GSPO's sequence ratio, sequence-mean): a padded
        micro-batch already is that; a packed row is cut at its `cu_seqlens`. Differentiable."""
        if x is None or self.cu_seqlens is None or not self.sample_index:
            return x  # padded already, or an empty (schedule-filling) micro-batch: nothing to cut
        spans = [cols for _, _, cols in self.sample_spans()]
        longest = max(c.stop - c.start for c in spans)
        return torch.stack([torch.nn.functional.pad(x[0, c], (0, longest - (c.stop - c.start))) for c in spans])

    def to(self, device: torch.device) -> MicroBatch:
        """A copy with every tensor on `device`; the same step on CPU and GPU (on CPU the
        tensors are shared, the micro-batch object is still a new one)."""
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True)
                 for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)


def with_old_logprobs(mbs: list[MicroBatch], old: list[torch.Tensor | None]) -> list[MicroBatch]:
    """New micro-batches carrying the old log-probs `compute_logprobs` returned for them
    (None on pipeline stages that do not compute log-probs)."""
    if len(mbs) != len(old):
        raise ValueError(f"{len(old)} old log-prob tensors for {len(mbs)} micro-batches")
    return [dataclasses.replace(mb, old_logprobs=lp) for mb, lp in zip(mbs, old)]


def with_ref_logprobs(mbs: list[MicroBatch], ref: list[torch.Tensor | None]) -> list[MicroBatch]:
    """New micro-batches carrying the reference policy's log-probs (KL penalty)."""
    if len(mbs) != len(ref):
        raise ValueError(f"{len(ref)} reference log-prob tensors for {len(mbs)} micro-batches")
    return [dataclasses.replace(mb, ref_logprobs=lp) for mb, lp in zip(mbs, ref)]


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


