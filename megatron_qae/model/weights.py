"""Move weights between the sharded Megatron policy and full (HF-named) tensors.

What it does: loads full HF Qwen2 tensors into this rank's TP/PP shards, and iterates this
rank's parameters as full tensors (TP all-gathered) under global megatron names, which weight
sync and checkpoint export turn into HF tensors through `qwen2_mapping`. What it does not:
talk to engines or files, or move tensors between pipeline stages (callers do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_qae.model import qwen2_mapping as qm


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def global_named_parameters(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(global megatron name, parameter) of one model chunk; global = whole-model layer index."""
    model = unwrap(chunk)
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    offsets = {i: layer.layer_number - 1 - i for i, layer in enumerate(layers)}
    for name, param in model.named_parameters():
        if not qm.is_weight(name):
            continue
        local = name.split(".")[2] if name.startswith("decoder.layers.") else None
        offset = offsets[int(local)] if local is not None else 0
        yield qm.with_global_layer(name, offset), param


def load_full_weights(
    chunks: list[torch.nn.Module],
    get_full: Callable[[str], torch.Tensor],
    tp_rank: int,
    tp: int,
) -> None:
    """Copy full tensors (`get_full(global megatron name)`) into this rank's shards."""
    with torch.no_grad():
        for chunk in chunks:
            for name, param in global_named_parameters(chunk):
                full = get_full(name)
                shard = qm.tp_shard(name, full, tp_rank, tp)
                if shard.shape != param.shape:
                    raise ValueError(
                        f"tensor {name}: shard shape {tuple(shard.shape)} != parameter shape "
                        f"{tuple(param.shape)} (tp={tp}); does the checkpoint match model.path's "
                        "config.json?"
                    )
                param.copy_(shard.to(param.dtype))


def load_hf_state(policy, hf_state: Mapping[str, torch.Tensor]) -> None:
    """Load a full HF Qwen2 state dict (name -> tensor) into this rank's shards of the policy,
    and into its optimizer's main params."""
    hf = policy.hf_config
    load_full_weights(policy.chunks, lambda name: qm.hf_to_megatron(name, hf_state, hf),
                      policy.groups.tp_rank, policy.groups.dims.tp)
    # With bf16 params the optimizer holds fp32 main copies, cloned from the init when it was
    # built; re-read them, or the first step writes the init back over the loaded weights.
    policy.optimizer.reload_model_params()


def full_param_specs(
    chunks: list[torch.nn.Module], tp: int
) -> list[tuple[str, torch.Size, torch.dtype]]:
    """(global megatron name, full shape, dtype) of this rank's parameters, from the shard
    shapes alone: what `iter_full_params` will yield, known before anything is gathered."""
    specs = []
    for chunk in chunks:
        for name, param in global_named_parameters(chunk):
            shape, dim = list(param.shape), qm.tp_dim(name)
            if dim is not None:
                shape[dim] *= tp
            specs.append((name, torch.Size(shape), param.dtype))
    return specs


def iter_full_params(
    chunks: list[torch.nn.Module], tp_group: dist.ProcessGroup | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(global megatron name, full tensor) for this rank's parameters, TP shards all-gathered.

    Collective over the TP group: every TP rank must iterate in step.
    """
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    for chunk in chunks:
        for name, param in global_named_parameters(chunk):
            data = param.detach()
            if tp == 1 or qm.tp_dim(name) is None:
                yield name, data
                continue
            shards = [torch.empty_like(data) for _ in range(tp)]
            dist.all_gather(shards, data.contiguous(), group=tp_group)
            full = qm.tp_merge(name, shards)
            del shards  # only the merged tensor stays alive while the caller holds it
            yield name, full
            del full  # before the next gather: at most one gathered tensor per rank


def _open_hf_dir(model_dir: str | Path) -> Mapping[str, torch.Tensor] | None:
    """A lazy name -> tensor view of `<model_dir>/*.safetensors` (sharded or not); None when
    the directory has no weights."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    handles = {}
    where: dict[str, Path] = {}
    for f in files:
        handles[f] = safe_open(str(f), framework="pt")
        where.update({k: f for k in handles[f].keys()})

    class _Lazy(dict):
        def __contains__(self, key: object) -> bool:
            return key in where

        def __getitem__(self, key: str) -> torch.Tensor:
            return handles[where[key]].get_tensor(key)

    return _Lazy()


def load_hf_dir(policy, model_dir: str | Path) -> bool:
    """Load `<model_dir>/*.safetensors` (sharded or not) into the policy; False when the
    directory has no weights (the seeded random init is kept, e.g. the CPU demo)."""
    state = _open_hf_dir(model_dir)
    if state is None:
        return False
    load_hf_state(policy, state)
    return True


def load_hf_dir_into(chunks: list[torch.nn.Module], hf: dict, groups, model_dir: str | Path) -> bool:
    """Load `<model_dir>/*.safetensors` into bare model chunks (no optimizer: the frozen
    reference policy); False when the directory has no weights."""
    state = _open_hf_dir(model_dir)
    if state is None:
        return False
    load_full_weights(chunks, lambda name: qm.hf_to_megatron(name, state, hf), groups.tp_rank, groups.dims.tp)
    return True
