"""Build the Megatron-Core policy from a Hugging Face Qwen2 / Qwen3 `config.json`.

What it does: reads and checks an HF Qwen2 / Qwen2.5 / Qwen3 (dense) config, derives
megatron-core's TransformerConfig from it (RMSNorm, SwiGLU, GQA, qkv bias or per-head q/k
RMSNorm, explicit head dim, RoPE base, tied or untied embeddings), picks the layer spec (local on CPU, Transformer Engine on GPU when importable)
and builds one GPTModel chunk per virtual pipeline stage. What it does not: wrap the model in
DDP, build the optimizer (train_step.py), or load weights (qwen2_mapping.py / checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from megatron_qae.model import cpu_compat

cpu_compat.install()

from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402

from megatron_qae.model.packed_attention import PackedDotProductAttention  # noqa: E402
from megatron_qae.model.layout import ParallelDims  # noqa: E402
from megatron_qae.model.qwen2_mapping import attention_dims, has_qk_norm, has_qkv_bias  # noqa: E402

_ARCHS = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_REQUIRED_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


@cache
def transformer_engine_available() -> bool:
    """True when Transformer Engine imports. Its prebuilt core raises RuntimeError (not
    ImportError) on machines without CUDA, hence the broad catch."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def load_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """Read `<model_dir>/config.json` and check it describes a Qwen2 / Qwen3 dense model."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"model.path={str(model_dir)!r} has no config.json; point model.path at a Hugging "
            "Face Qwen2 / Qwen2.5 / Qwen3 model directory"
        )
    hf = json.loads(path.read_text())
    archs = set(hf.get("architectures") or [])
    arch = _ARCHS.get(hf.get("model_type"))
    if arch is None or (archs and arch not in archs):
        raise ValueError(
            f"{path}: model_type={hf.get('model_type')!r}, architectures={sorted(archs)}; supported: "
            "Qwen2ForCausalLM (model_type 'qwen2': Qwen2 / Qwen2.5) and Qwen3ForCausalLM "
            "(model_type 'qwen3': dense Qwen3)"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in hf]
    if missing:
        raise ValueError(f"{path} lacks {missing}; is this a complete {arch} config.json?")
    return hf


def check_layout(hf: dict[str, Any], dims: ParallelDims) -> None:
    """Raise when the parallel layout cannot split this model."""
    heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    kv_heads = hf.get("num_key_value_heads", heads)
    checks = [
        (heads % dims.tp == 0, f"num_attention_heads={heads}"),
        (kv_heads % dims.tp == 0, f"num_key_value_heads={kv_heads}"),
        (hf["vocab_size"] % dims.tp == 0, f"vocab_size={hf['vocab_size']}"),
    ]
    for ok, what in checks:
        if not ok:
            raise ValueError(f"parallel.tp={dims.tp} does not divide {what}; choose a tp that does")
    stages = dims.pp * (dims.vpp or 1)
    if layers % stages:
        raise ValueError(
            f"num_hidden_layers={layers} is not divisible by pp*vpp={stages}; "
            "change parallel.pp or parallel.vpp"
        )


def build_transformer_config(
    hf: dict[str, Any],
    dims: ParallelDims,
    *,
    params_dtype: str = "float32",
    fp8: str | None = None,
    fp8_recipe: str = "tensorwise",
    sequence_parallel: bool = False,
    recompute_granularity: str | None = None,
    recompute_method: str | None = None,
    recompute_num_layers: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> TransformerConfig:
    """TransformerConfig of a Qwen2 / Qwen3 model under the given layout."""
    check_layout(hf, dims)
    on_gpu = cpu_compat.cuda_available()
    # megatron's fused kernels (bias-SwiGLU, RoPE, softmax, bias-dropout, and the weight-
    # gradient accumulation into main_grad) are CUDA / Transformer Engine code: on where both
    # are present, off on CPU, where the unfused paths compute the same functions.
    fused = on_gpu and transformer_engine_available()
    # The output layer is megatron's own ColumnParallelLinear even with the TE spec; its fused
    # wgrad accumulation needs Apex's extension (megatron-core 0.19 tensor_parallel/layers.py
    # raises RuntimeError at construction without it).
    wgrad_fused = fused and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    if fp8 and not (on_gpu and transformer_engine_available()):
        raise ValueError(
            f"model.fp8={fp8!r} needs a CUDA GPU with Transformer Engine installed "
            "(pip install 'megatron-qae[gpu]'); set model.fp8=null on this machine"
        )
    if sequence_parallel and not transformer_engine_available():
        raise ValueError("parallel.sequence_parallel=true needs Transformer Engine; set it false")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[params_dtype]
    heads, kv_heads, head_dim = attention_dims(hf)
    kwargs: dict[str, Any] = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=head_dim,
        ffn_hidden_size=hf["intermediate_size"],
        normalization="RMSNorm",
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=has_qkv_bias(hf),
        qk_layernorm=has_qk_norm(hf),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=hf.get("initializer_range", 0.02),
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=dims.vpp,
        context_parallel_size=dims.cp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # the only one megatron allows with variable lengths
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=wgrad_fused,
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        persist_layer_norm=False,  # Apex's persistent LayerNorm; RMSNorm comes from TE / torch
        apply_rope_fusion=fused,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
    )
    if fp8:
        kwargs.update(fp8=fp8, fp8_recipe=fp8_recipe)
    unknown = set(overrides or {}) - {f.name for f in dataclasses.fields(TransformerConfig)}
    if unknown:
        raise ValueError(
            f"model.transformer_overrides has keys {sorted(unknown)} that TransformerConfig "
            "does not have; see megatron.core.transformer.TransformerConfig"
        )
    kwargs.update(overrides or {})
    return TransformerConfig(**kwargs)


def layer_spec(config: TransformerConfig, transformer_impl: str = "auto"):
    """Local spec on CPU; Transformer Engine spec on GPU when TE imports (or when asked).
    Both take packed micro-batches (`PackedSeqParams`, qkv_format='thd')."""
    use_te = transformer_impl == "transformer_engine" or (
        transformer_impl == "auto"
        and cpu_compat.cuda_available()
        and transformer_engine_available()
    )
    if use_te:
        if not transformer_engine_available():
            raise ValueError(
                "model.transformer_impl='transformer_engine' but Transformer Engine does not "
                "import; install megatron-qae[gpu] or use 'local'"
            )
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=config.qk_layernorm)
    # The local attention refuses packed (THD) micro-batches; ours takes them through a
    # attending per sequence (length buckets of causal batches) and is the parent class otherwise
    # (packed_attention.py).
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return spec


def build_model_chunks(
    hf: dict[str, Any], config: TransformerConfig, transformer_impl: str = "auto"
) -> list[torch.nn.Module]:
    """One GPTModel per virtual pipeline stage of this rank (one chunk without VPP), inside
    megatron's Float16Module with bf16 params."""
    from megatron.core import parallel_state as mpu

    spec = layer_spec(config, transformer_impl)
    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        pre = mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=hf["vocab_size"],
            max_sequence_length=hf.get("max_position_embeddings", 4096),
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
            position_embedding_type="rope",
            rotary_base=int(hf.get("rope_theta", 10000)),
            vp_stage=vp_stage if config.virtual_pipeline_model_parallel_size else None,
        )
        model.to(cpu_compat.default_device())
        # As megatron's own training does: every parameter in bf16 (norms included, whatever
        # the layer spec created them in), inputs cast on the first stage, fp32 logits out.
        chunks.append(Float16Module(config, model) if config.bf16 else model)
    return chunks

