"""The one Megatron-Core <-> Hugging Face weight mapping of the Qwen2 and Qwen3 dense families
(pure tensor functions).

What it does: renames and re-lays-out tensors between megatron's GPTModel (local or
Transformer Engine spec, global layer numbering, TP=1 "full" tensors) and transformers'
Qwen2ForCausalLM / Qwen3ForCausalLM, and splits / merges tensor-parallel shards. The two
families differ only in attention: Qwen2 has a qkv bias; Qwen3 has none, and RMSNorms over
each query and key head (megatron's q_layernorm / k_layernorm, replicated under TP). Weight sync and
tools/convert_checkpoint both use it. What it does not: communicate, read files or know
about pipeline stages beyond the global layer index in a name.

Layouts: megatron's fused QKV stacks, per query group, that group's q heads then one k head
then one v head; its fused fc1 stacks [gate; up], and under TP each rank holds
[gate shard; up shard], so fc1 is split per half.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# TE fuses the pre-attention / pre-MLP norms into the following linear layer.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_QK_NORMS = {
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
_TOP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
# Dimension along which tensor parallelism splits a tensor; absent = replicated.
_TP_DIM = {
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc2.weight": 1,
}


def canonical_name(name: str) -> str:
    """Megatron name with TE's fused-norm names replaced by the local spec's."""
    for te_name, local in _TE_ALIASES.items():
        if name.endswith(te_name):
            return name[: -len(te_name)] + local
    return name


def is_weight(name: str) -> bool:
    """False for TE's `_extra_state` (fp8 scaling metadata), which is not a weight."""
    return not name.endswith("_extra_state")


def _split(name: str) -> tuple[int | None, str]:
    match = _LAYER.match(name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


def attention_dims(hf: Mapping[str, Any]) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head dim) of a Qwen2 / Qwen3 config.json (Qwen3
    states head_dim, which need not be hidden_size / heads)."""
    heads = hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads", heads)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return heads, groups, head_dim


def has_qkv_bias(hf: Mapping[str, Any]) -> bool:
    """Qwen2 always has a q/k/v bias (its config has no switch); Qwen3 says so in attention_bias."""
    return bool(hf.get("attention_bias", hf.get("model_type") == "qwen2"))


def has_qk_norm(hf: Mapping[str, Any]) -> bool:
    """Per-head RMSNorm of queries and keys: Qwen3's, not Qwen2's."""
    return hf.get("model_type") == "qwen3"


def megatron_to_hf(name: str, tensor: torch.Tensor, hf: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs of one full megatron tensor (global layer index in `name`)."""
    name = canonical_name(name)
    layer, rest = _split(name)
    if layer is None:
        if name not in _TOP:
            raise KeyError(f"no Qwen2 mapping for megatron tensor {name!r}")
        return [(_TOP[name], tensor)]
    prefix = f"model.layers.{layer}."
    if rest in _LAYER_SIMPLE:
        return [(prefix + _LAYER_SIMPLE[rest], tensor)]
    if rest in _QK_NORMS and has_qk_norm(hf):
        return [(prefix + _QK_NORMS[rest], tensor)]
    if rest == "mlp.linear_fc1.weight":
        gate, up = tensor.chunk(2, dim=0)
        return [(prefix + "mlp.gate_proj.weight", gate), (prefix + "mlp.up_proj.weight", up)]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        heads, groups, head_dim = attention_dims(hf)
        per_group = heads // groups
        grouped = tensor.reshape(groups, (per_group + 2) * head_dim, *tensor.shape[1:])
        q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
        flat = lambda t: t.reshape(-1, *tensor.shape[1:])  # noqa: E731
        return [
            (prefix + f"self_attn.q_proj.{kind}", flat(q)),
            (prefix + f"self_attn.k_proj.{kind}", flat(k)),
            (prefix + f"self_attn.v_proj.{kind}", flat(v)),
        ]
    raise KeyError(f"no {hf.get('model_type')} mapping for megatron tensor {name!r}")


def hf_names_of_layer(layer: int, hf: Mapping[str, Any]) -> dict[str, list[str]]:
    """Megatron layer-local name -> the HF names it is built from, for this model's family."""
    p = f"model.layers.{layer}."
    out = {rest: [p + name] for rest, name in _LAYER_SIMPLE.items()}
    out["mlp.linear_fc1.weight"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
    for kind in ("weight", "bias") if has_qkv_bias(hf) else ("weight",):
        out[f"self_attention.linear_qkv.{kind}"] = [
            p + f"self_attn.{x}_proj.{kind}" for x in ("q", "k", "v")
        ]
    if has_qk_norm(hf):
        out.update({rest: [p + name] for rest, name in _QK_NORMS.items()})
    return out


def hf_to_megatron(name: str, hf_state: Mapping[str, torch.Tensor], hf: Mapping[str, Any]) -> torch.Tensor:
    """The full megatron tensor `name` (canonical or TE name, global layer index) from HF tensors."""
    name = canonical_name(name)
    layer, rest = _split(name)
    if layer is None:
        if name not in _TOP:
            raise KeyError(f"no Qwen2 mapping for megatron tensor {name!r}")
        hf_name = _TOP[name]
        if hf_name == "lm_head.weight" and hf_name not in hf_state:
            hf_name = "model.embed_tokens.weight"  # tied checkpoints omit lm_head
        return _get(hf_state, hf_name)
    sources = hf_names_of_layer(layer, hf).get(rest)
    if sources is None:
        raise KeyError(f"no {hf.get('model_type')} mapping for megatron tensor {name!r}")
    parts = [_get(hf_state, s) for s in sources]
    if rest.startswith("self_attention.linear_qkv"):
        heads, groups, head_dim = attention_dims(hf)
        q, k, v = parts
        trailing = q.shape[1:]
        q = q.reshape(groups, (heads // groups) * head_dim, *trailing)
        k = k.reshape(groups, head_dim, *trailing)
        v = v.reshape(groups, head_dim, *trailing)
        return torch.cat([q, k, v], dim=1).reshape(-1, *trailing)
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def _get(hf_state: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in hf_state:
        raise KeyError(f"HF checkpoint lacks tensor {name!r}; is it a complete Qwen2 / Qwen3 checkpoint?")
    return hf_state[name]


def tp_dim(name: str) -> int | None:
    """Dimension tensor parallelism splits `name` along, or None when replicated."""
    _, rest = _split(canonical_name(name))
    return _TP_DIM.get(rest)


def tp_shard(name: str, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's shard of a full megatron tensor."""
    dim = tp_dim(name)
    if dim is None or tp == 1:
        return full
    if canonical_name(name).endswith("mlp.linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def tp_merge(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full megatron tensor from all TP ranks' shards (rank order)."""
    dim = tp_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if canonical_name(name).endswith("mlp.linear_fc1.weight"):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def with_global_layer(name: str, layer_offset: int) -> str:
    """Rename a chunk-local layer index to the global one."""
    layer, rest = _split(name)
    return name if layer is None else f"decoder.layers.{layer + layer_offset}.{rest}"


def megatron_names(hf: Mapping[str, Any]) -> Iterator[str]:
    """Every canonical full-model megatron weight name of a Qwen2 / Qwen3 config, in layer order."""
    yield "embedding.word_embeddings.weight"
    for layer in range(hf["num_hidden_layers"]):
        for rest in hf_names_of_layer(layer, hf):
            yield f"decoder.layers.{layer}.{rest}"
    yield "decoder.final_layernorm.weight"
    if not hf.get("tie_word_embeddings", False):
        yield "output_layer.weight"
