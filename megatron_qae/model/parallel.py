"""The one place that sets up torch.distributed and megatron's groups for a trainer layout.

What it does: `init_distributed` builds the layout (`ParallelDims`, layout.py) from the
`parallel` config section and the world size, starts torch.distributed (gloo for CPU tensors
everywhere, plus nccl for device tensors on GPU: `process_group_backend` is the one rule) and
calls megatron's `initialize_model_parallel` exactly once; `ParallelGroups` hands the process
groups that code below needs explicitly, including the hand-off group over which rank 0 gives
the others what only it computed (`broadcast_from_driver`), whose wait is sized for rollouts.
What it does not: read environment variables other than the torchrun ones at the entry point,
or decide the layout (the config does).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_qae.config.sections import ParallelConfig
from megatron_qae.model import cpu_compat
from megatron_qae.model.layout import ParallelDims


@dataclass(frozen=True)
class ParallelGroups:
    """Process groups of this rank, handed explicitly to the code that communicates."""

    dims: ParallelDims
    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    dp: dist.ProcessGroup
    tp_rank: int
    pp_rank: int
    dp_rank: int
    driver: dist.ProcessGroup | None = None
    """All ranks, gloo, with the rollout wait as its timeout: what rank 0 hands to the others
    after work only it does (rollout, eval) goes over this group, so that wait is bounded by
    run.rollout_wait_timeout_s, not by the collective timeout (None: the default group)."""
    dp_rank_of: tuple[int, ...] = ()
    """The DP rank of every global rank (index = global rank): whom rank 0 sends which
    `TrainShard` in the hand-off (batch/shard.py); empty when made without `init_distributed`."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1


def process_group_backend(accelerator: str | None) -> str:
    """The backend of every process group: gloo carries CPU tensors on every machine, the
    accelerator's backend (nccl) carries device tensors where there is one.

    The rule: a collective may take CPU tensors or device tensors on any group. Megatron's
    groups inherit this backend (parallel_state.create_group passes backend=None), so small
    host-side reductions (token counts, metrics, flags, object collectives) never reach an
    NCCL-only group, and everything megatron does on device tensors still goes over NCCL.
    """
    return "gloo" if accelerator is None else f"cpu:gloo,cuda:{accelerator}"


def init_distributed(
    parallel: ParallelConfig,
    seed: int = 1234,
    collective_timeout_s: float = 1800.0,
    rollout_wait_timeout_s: float = 21600.0,
    accelerator_backend: str | None = None,
) -> ParallelGroups:
    """Start torch.distributed from torchrun's environment and build megatron's groups.

    The layout is `parallel` over the real world size (`ParallelDims.from_config`), checked
    before any group is made. Seeds megatron's model-parallel RNG tracker
    (same seed on every rank: weights are initialized on CPU in full, then sharded).
    `accelerator_backend` defaults to nccl where CUDA is present, none on CPU (tests name a
    CUDA-only stand-in to run the GPU's group rules on CPU).
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    on_cpu = cpu_compat.install()
    if accelerator_backend is None and not on_cpu:
        accelerator_backend = "nccl"
    if not dist.is_initialized():
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend=process_group_backend(accelerator_backend),
            timeout=datetime.timedelta(seconds=collective_timeout_s),
        )
    dims = ParallelDims.from_config(parallel, dist.get_world_size())
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=dims.tp,
            pipeline_model_parallel_size=dims.pp,
            virtual_pipeline_model_parallel_size=dims.vpp,
            context_parallel_size=dims.cp,
            distributed_timeout_minutes=collective_timeout_s / 60.0,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    driver = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=rollout_wait_timeout_s),
                            group_desc="QAE_DRIVER_HANDOFF")
    dp_rank_of = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(dp_rank_of, torch.tensor([mpu.get_data_parallel_rank()]), group=driver)
    return current_groups(dims, driver, tuple(int(t) for t in dp_rank_of))


def current_groups(dims: ParallelDims, driver: dist.ProcessGroup | None = None,
                   dp_rank_of: tuple[int, ...] = ()) -> ParallelGroups:
    """The groups megatron made for this rank (after `init_distributed`)."""
    from megatron.core import parallel_state as mpu

    return ParallelGroups(
        dp_rank_of=dp_rank_of,
        dims=dims,
        tp=mpu.get_tensor_model_parallel_group(),
        pp=mpu.get_pipeline_model_parallel_group(),
        dp=mpu.get_data_parallel_group(),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        driver=driver,
    )


def broadcast_from_driver(obj: object, groups: ParallelGroups) -> object:
    """Rank 0's `obj` on every rank, over the hand-off group: the other ranks may wait here
    for as long as rank 0's rollout takes (up to run.rollout_wait_timeout_s)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, group=groups.driver)
    return holder[0]


def destroy() -> None:
    """Tear down megatron's groups and torch.distributed (tests, clean exit)."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
