"""Read the model weights of a megatron-core torch_dist checkpoint one tensor at a time, in
one process, with no model, process group or optimizer.

What it does: megatron's torch_dist backend is torch's distributed checkpoint (DCP) format: a
`.metadata` file naming every tensor with its global shape, dtype and the saved chunks
(`TensorStorageMetadata`), and `__<rank>_<i>.distcp` files holding the chunks. The model's
weights are stored in their global (TP-merged) layout under megatron's sharded keys, the
decoder layers stacked along a leading layer axis (`decoder.layers.<rest>` of shape
[num_layers, ...], megatron-core 0.19 `transformer_block.py` sharded_state_dict: each layer's
tensors offset by its global index). `ModelCheckpoint.read(name)` builds the full megatron
tensor `name` (global layer index in the name) from the chunks that overlap it, with torch's
own resharding helper (`create_read_items_for_chunk_list`) and `FileSystemReader.read_data`:
only that layer's slice is read and held, in the dtype it was saved in. What it does not:
load optimizer state, verify digests (checkpoint_verify.py), or map names to HF
(qwen2_mapping.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_qae.model import qwen2_mapping as qm

_LAYER_PREFIX = "decoder.layers."
# The checkpoint stores the pre-attention / pre-MLP norms under Transformer Engine's names
# whatever the layer spec (megatron's local spec maps its keys to them: gpt_layer_specs.py
# sharded_state_dict_keys_map), so one checkpoint loads into either spec.
_STORED_AS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


class _IntoTensors(LoadPlanner):
    """The smallest LoadPlanner: the read items are given, each lands in its destination
    tensor's slice (what DefaultLoadPlanner.resolve_tensor does, without a state dict)."""

    def __init__(self, dest: dict[str, torch.Tensor]) -> None:
        self.dest = dest

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:  # noqa: ARG002
        raise NotImplementedError  # the plan is built by ModelCheckpoint.read

    def create_local_plan(self) -> LoadPlan:
        raise NotImplementedError

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        raise NotImplementedError

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:  # noqa: ARG002
        raise AssertionError(f"{read_item.dest_index.fqn}: a tensor was expected, not bytes")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        out = self.dest[read_item.dest_index.fqn]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            out = out.narrow(dim, start, length)
        return out

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


def stored_key(name: str) -> tuple[str, int | None]:
    """(checkpoint key, layer index or None) of a canonical global megatron weight name."""
    if not name.startswith(_LAYER_PREFIX):
        return name, None
    layer, rest = name[len(_LAYER_PREFIX):].split(".", 1)
    return _LAYER_PREFIX + _STORED_AS.get(rest, rest), int(layer)


class ModelCheckpoint:
    """The model tensors of one torch_dist checkpoint directory, read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.reader = FileSystemReader(str(self.path))
        self.metadata: Metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)

    def _meta(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"checkpoint {self.path} has no model tensor {key!r}; was it saved for this "
                           "model (the --hf-config-dir config.json)?")
        return md

    def num_layers(self) -> int:
        """Length of the stacked layer axis (the decoder's layers)."""
        return int(self._meta(_LAYER_PREFIX + "self_attention.linear_proj.weight").size[0])

    def spec(self, name: str) -> tuple[torch.Size, torch.dtype]:
        """(full shape, stored dtype) of the megatron tensor `name` (one layer's, for a layer)."""
        key, layer = stored_key(qm.canonical_name(name))
        md = self._meta(key)
        return (md.size[1:] if layer is not None else md.size), md.properties.dtype

    def read(self, name: str) -> torch.Tensor:
        """The full megatron tensor `name` in its stored dtype: only its bytes are read."""
        key, layer = stored_key(qm.canonical_name(name))
        md = self._meta(key)
        if layer is None:
            offsets, sizes = [0] * len(md.size), list(md.size)
        else:
            if not 0 <= layer < md.size[0]:
                raise KeyError(f"checkpoint {self.path} has {md.size[0]} layers; {name!r} asks for layer {layer}")
            offsets, sizes = [layer] + [0] * (len(md.size) - 1), [1, *md.size[1:]]
        out = torch.empty(sizes, dtype=md.properties.dtype)
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, md, [chunk])
        covered = sum(int(torch.Size(i.lengths).numel()) for i in items)
        if covered != out.numel():
            raise ValueError(f"checkpoint {self.path}: the saved chunks of {key!r} cover {covered} of the "
                             f"{out.numel()} elements of {name!r}; the checkpoint is incomplete")
        self.reader.read_data(LoadPlan(items), _IntoTensors({key: out})).wait()
        return out[0] if layer is not None else out
