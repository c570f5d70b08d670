"""The parallel layout of the trainer and the one place that sets up megatron's groups.

What it does: `ParallelDims` validates a (tp, pp, cp, dp) layout against the world size;
`init_distributed` starts torch.distributed (gloo on CPU, nccl on GPU) and calls megatron's
`initialize_model_parallel` exactly once; `ParallelGroups` hands the process groups that code
below needs explicitly. What it does not: read environment variables other than the
torchrun ones at the entry point, or decide the layout (the config does).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_qae import cpu_compat


@dataclass(frozen=True)
class ParallelDims:
    """A validated trainer layout: world = tp * cp * pp * dp."""

    tp: int
    pp: int
    dp: int
    cp: int = 1
    vpp: int | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "cp"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"parallel.{name}={value} must be >= 1")
        if self.cp != 1:
            from megatron_qae.config_sections import CP_UNSUPPORTED

            raise ValueError(f"parallel.cp={self.cp}: {CP_UNSUPPORTED}")
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            raise ValueError(
                f"parallel.vpp={self.vpp} needs pp >= 2 and vpp >= 2 (pp={self.pp}); "
                "set parallel.vpp=null to disable interleaving"
            )

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @classmethod
    def from_world(
        cls, world_size: int, tp: int, pp: int, cp: int = 1, vpp: int | None = None
    ) -> ParallelDims:
        model_parallel = tp * pp * cp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = "
                f"{model_parallel}; launch a multiple of {model_parallel} processes or change "
                "parallel.tp / parallel.pp / parallel.cp"
            )
        return cls(tp=tp, pp=pp, dp=world_size // model_parallel, cp=cp, vpp=vpp)


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

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1


def init_distributed(dims_fn, seed: int = 1234, timeout_minutes: int = 30) -> ParallelGroups:
    """Start torch.distributed from torchrun's environment and build megatron's groups.

    `dims_fn(world_size) -> ParallelDims` lets the caller validate the layout against the
    real world size before any group is made. Seeds megatron's model-parallel RNG tracker
    (same seed on every rank: weights are initialized on CPU in full, then sharded).
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    backend = "gloo" if cpu_compat.install() else "nccl"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    dims = dims_fn(dist.get_world_size())
    if dims.world_size != dist.get_world_size():
        raise ValueError(f"layout {dims} needs {dims.world_size} ranks, got {dist.get_world_size()}")
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=dims.tp,
            pipeline_model_parallel_size=dims.pp,
            virtual_pipeline_model_parallel_size=dims.vpp,
            context_parallel_size=dims.cp,
            distributed_timeout_minutes=timeout_minutes,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return current_groups(dims)


def current_groups(dims: ParallelDims) -> ParallelGroups:
    """The groups megatron made for this rank (after `init_distributed`)."""
    from megatron.core import parallel_state as mpu

    return ParallelGroups(
        dims=dims,
        tp=mpu.get_tensor_model_parallel_group(),
        pp=mpu.get_pipeline_model_parallel_group(),
        dp=mpu.get_data_parallel_group(),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
    )


def destroy() -> None:
    """Tear down megatron's groups and torch.distributed (tests, clean exit)."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def single_process_env() -> None:
    """Set torchrun's variables for a world of one when a plain `python -m ...` entry point
    (trainer, planner, converter, benchmarks) was not started by torchrun."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
