"""The trainer's parallel layout: one validated value, built in one place.

What it does: `ParallelDims.from_config` turns the `parallel` config section (whose degrees
ParallelConfig already checked on their own) and the world size into the (tp, pp, cp, dp)
layout, the one check of a layout against the world. Light on purpose (no torch), so the
planner can use it. What it does not: start torch.distributed or build groups (parallel.py),
or check the layout against the model (config.loading.validate_against_model).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_qae.config.sections import ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    """A trainer layout checked against its world: world = tp * cp * pp * dp."""

    tp: int
    """Tensor-parallel degree."""
    pp: int
    """Pipeline-parallel degree."""
    dp: int
    """Data-parallel degree (what the world leaves after tp * pp * cp)."""
    cp: int = 1
    """Context-parallel degree."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (None: 1F1B schedule)."""

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int) -> ParallelDims:
        """The layout of `parallel` over `world_size` ranks."""
        mp = parallel.tp * parallel.pp * parallel.cp
        if world_size % mp:
            raise ValueError(f"world size {world_size} is not divisible by tp*pp*cp = {mp}; "
                             f"launch a multiple of {mp} processes or change parallel.*")
        return cls(tp=parallel.tp, pp=parallel.pp, dp=world_size // mp, cp=parallel.cp, vpp=parallel.vpp)
