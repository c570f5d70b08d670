"""HF Qwen2 / Qwen3 safetensors <-> Megatron dist checkpoints: the converter's library half.

What it does: `hf_to_mcore` reads the safetensors shards tensor by tensor into a bare
GPTModel (no DDP, gradient buffer or optimizer) in the weights' own dtype and writes a model
dist checkpoint (torch_dist) that training loads in any layout; `mcore_to_hf` reads a
checkpoint (saved under any tp/pp/dp) straight from its files one tensor at a time in its stored
dtype (dist_ckpt_reader.py: no model, no process group), maps each with the same pure mapping
weight sync uses (qwen2_mapping.py), and appends it to its size-bounded safetensors shard as it
comes (hf_shards.py), then writes the index, config.json and the tokenizer files: its peak is a
few tensors, not the model; `policy_to_hf` does the same from a live policy (sft.py);
`export_fp8` quantizes an HF directory to FP8 with nvidia-modelopt, calibrating activation
scales on prompts (`calibration_ids`). Output goes to a temporary directory renamed at the
end, so a failure leaves nothing half-written. What it does not: parse arguments
(`python -m tools.convert_checkpoint` does) or convert optimizer state (HF has none).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from megatron_qae.config.sections import ParallelConfig
from megatron_qae.launch_env import single_process_env
from megatron_qae.model import parallel, qwen2_mapping as qm
from megatron_qae.model.dist_ckpt_reader import ModelCheckpoint
from megatron_qae.model.hf_shards import ShardWriter, TensorSpec, plan_shards

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _stored_dtype(files: dict[str, Path]) -> str:
    """"bfloat16" when the HF weights are stored in bf16, else "float32" (fp16 is widened
    exactly): the dtype the converted checkpoint keeps."""
    from safetensors import safe_open

    name, path = next(iter(files.items()))
    with safe_open(str(path), framework="pt") as f:
        return "bfloat16" if f.get_slice(name).get_dtype() == "BF16" else "float32"


def _bare_model(hf: dict, params_dtype: str) -> list[torch.nn.Module]:
    """The TP = PP = 1 GPTModel in `params_dtype`, uninitialized: no DDP, gradient buffer or
    optimizer (a checkpoint of the weights needs none of them)."""
    from megatron_qae.model.build import build_model_chunks, build_transformer_config

    groups = parallel.init_distributed(ParallelConfig())
    config = build_transformer_config(hf, groups.dims, params_dtype=params_dtype,
                                      overrides={"perform_initialization": False})
    return build_model_chunks(hf, config, "local")


def _safetensor_index(hf_dir: Path) -> dict[str, Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: hf_dir / f for name, f in weight_map.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    single = hf_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def hf_to_mcore(hf_dir: Path, out: Path) -> Path:
    """Write the HF weights as a Megatron checkpoint directory `out/step_0` (+ `latest`), in
    the dtype the HF weights are stored in (bf16 stays bf16; training loads it in any dtype)."""
    from safetensors import safe_open
    from tqdm import tqdm

    from megatron_qae.model import weights
    from megatron_qae.model.build import load_hf_config
    from megatron_qae.persistence import checkpoint

    single_process_env()
    hf = load_hf_config(hf_dir)
    files = _safetensor_index(hf_dir)
    chunks = _bare_model(hf, _stored_dtype(files))
    handles = {p: safe_open(str(p), framework="pt") for p in set(files.values())}

    class _Lazy(dict):
        def __contains__(self, key: object) -> bool:
            return key in files

        def __getitem__(self, key: str) -> torch.Tensor:
            return handles[files[key]].get_tensor(key)

    names = list(qm.megatron_names(hf))
    bar = tqdm(total=len(names), desc="hf -> mcore", unit="tensor")

    def get_full(name: str) -> torch.Tensor:
        bar.update(1)
        return qm.hf_to_megatron(name, _Lazy(), hf)

    weights.load_full_weights(chunks, get_full, 0, 1)
    bar.close()
    return checkpoint.save_model_checkpoint(out, 0, chunks, {"step": 0, "model_path": str(hf_dir.resolve())})


def _hf_specs(megatron_specs: list[tuple[str, torch.Size]], hf: dict, dtype: torch.dtype) -> list[TensorSpec]:
    """The HF tensors' (name, shape) the mapping makes of these megatron tensors, found by
    mapping empty meta tensors: the shard plan is known before any data is read."""
    return [TensorSpec(hf_name, tuple(t.shape), dtype)
            for name, shape in megatron_specs
            for hf_name, t in qm.megatron_to_hf(name, torch.empty(shape, device="meta"), hf)]


def _released(pieces: list[tuple[str, torch.Tensor]], dtype: torch.dtype):
    """Yield (HF name, tensor in `dtype`) and drop each reference once it is written, so the
    megatron tensor the pieces view is freed before the next one is read."""
    while pieces:
        hf_name, t = pieces.pop(0)
        t = t.to(dtype)
        yield hf_name, t
        del t


def _write_hf_dir(tmp: Path, tensors, specs: list[TensorSpec], hf_config_dir: Path, dtype: str,
                  max_shard_bytes: int) -> None:
    """Stream `tensors` ((HF name, tensor) in `specs` order) into shards, then the index,
    config.json and the tokenizer files."""
    writer = ShardWriter(tmp, plan_shards(specs, max_shard_bytes))
    for hf_name, t in tensors:
        writer.write(hf_name, t)
        del t  # not held while the next tensor is read
    weight_map = writer.close()
    total = sum(s.nbytes for s in specs)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config = json.loads((hf_config_dir / "config.json").read_text())
    config["torch_dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in TOKENIZER_FILES:
        if (hf_config_dir / f).is_file():
            shutil.copy2(hf_config_dir / f, tmp / f)


def mcore_to_hf(ckpt: Path, hf_config_dir: Path, out: Path, dtype: str | None, max_shard_bytes: int) -> Path:
    """Write an HF model directory from a Megatron checkpoint (saved in any layout), in one
    process on CPU: each tensor is read from the checkpoint's files in its stored dtype, mapped,
    cast to `dtype` (None: the stored dtype) and appended to its safetensors shard, so the peak
    is about one tensor, not the model. No model, process group or optimizer is built."""
    from tqdm import tqdm

    from megatron_qae.model.build import load_hf_config
    from megatron_qae.persistence.checkpoint import verified_marker

    if out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new directory")
    verified_marker(ckpt)
    hf = load_hf_config(hf_config_dir)
    model = ModelCheckpoint(ckpt)
    if model.num_layers() != hf["num_hidden_layers"]:
        raise ValueError(f"checkpoint {ckpt} has {model.num_layers()} layers, {hf_config_dir}/config.json "
                         f"num_hidden_layers={hf['num_hidden_layers']}; pass the model's own --hf-config-dir")
    names = list(qm.megatron_names(hf))
    stored = {name: model.spec(name) for name in names}
    dtype = dtype or _DTYPE_NAMES[next(iter(stored.values()))[1]]
    target = DTYPES[dtype]
    try:
        specs = _hf_specs([(n, shape) for n, (shape, _) in stored.items()], hf, target)
    except RuntimeError as exc:  # a reshape that does not fit: other heads / widths than config.json
        raise ValueError(f"checkpoint {ckpt} does not have the shapes of {hf_config_dir}/config.json ({exc}); "
                         "pass the model's own --hf-config-dir") from exc

    def tensors():
        for name in tqdm(names, desc="mcore -> hf", unit="tensor"):
            yield from _released(qm.megatron_to_hf(name, model.read(name), hf), target)

    with _atomic_dir(out) as tmp:
        _write_hf_dir(tmp, tensors(), specs, hf_config_dir, dtype, max_shard_bytes)
    return out


def policy_to_hf(policy, hf: dict, hf_config_dir: Path, out: Path, dtype: str,
                 max_shard_bytes: int = 5_000_000_000) -> Path:
    """Write a one-process policy's weights (TP = PP = 1) as an HF model directory, with
    config.json and the tokenizer files of `hf_config_dir`; written atomically."""
    from tqdm import tqdm

    from megatron_qae.model import weights

    if out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new directory")
    target = DTYPES[dtype]
    megatron_specs = [(name, shape) for name, shape, _ in weights.full_param_specs(policy.chunks, 1)]
    specs = _hf_specs(megatron_specs, hf, target)

    def tensors():
        for name, full in tqdm(weights.iter_full_params(policy.chunks, None), total=len(megatron_specs),
                               desc="mcore -> hf", unit="tensor"):
            yield from _released(qm.megatron_to_hf(name, full, hf), target)

    with _atomic_dir(out) as tmp:
        _write_hf_dir(tmp, tensors(), specs, hf_config_dir, dtype, max_shard_bytes)
    return out


@contextlib.contextmanager
def _atomic_dir(out: Path):
    """A temporary directory beside `out`, renamed to `out` when the block succeeds and
    removed when it fails, so nothing half-written ever stands at `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def calibration_ids(data_path: Path, hf_config_dir: Path, num_samples: int, max_tokens: int) -> list[list[int]]:
    """Token ids of the first `num_samples` prompts of a training data file (chat template
    applied, the same reader the rollout uses), each cut to `max_tokens`."""
    from transformers import AutoTokenizer

    from rollout_sglang.data import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(hf_config_dir)
    prompts = load_prompts(data_path, tokenizer)[:num_samples]
    return [list(p.prompt_ids[:max_tokens]) for p in prompts]


def export_fp8(hf_dir: Path, out: Path, calib: list[list[int]], device: str) -> Path:
    """FP8 (E4M3) export of the HF model in `hf_dir` with nvidia-modelopt: per-tensor weight
    scales and static per-tensor input scales calibrated on `calib`, in modelopt's HF format
    (`quantization_config` in config.json) that SGLang and vLLM load. Written atomically.

    The whole model is loaded (modelopt quantizes modules in place): size the machine for it.
    """
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        raise SystemExit(f"--fp8 needs nvidia-modelopt ({exc}); pip install 'megatron-qae[fp8]'") from exc
    from transformers import AutoModelForCausalLM

    if out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new directory")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(device).eval()

    def calibrate(m) -> None:
        with torch.no_grad():
            for ids in calib:
                m(torch.tensor([ids], device=device))

    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop=calibrate)
    with _atomic_dir(out) as tmp:
        export_hf_checkpoint(model, export_dir=tmp)
        for f in TOKENIZER_FILES:
            if (hf_dir / f).is_file() and not (tmp / f).exists():
                shutil.copy2(hf_dir / f, tmp / f)
    return out
