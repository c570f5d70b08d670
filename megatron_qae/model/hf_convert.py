"""HF Qwen2 / Qwen3 safetensors <-> Megatron dist checkpoints: the converter's library half.

What it does: `hf_to_mcore` reads the safetensors shards tensor by tensor and writes a model
dist checkpoint (torch_dist) that training loads in any layout; `mcore_to_hf` loads a
checkpoint (saved under any tp/pp/dp), maps tensor by tensor with the same pure mapping weight
sync uses (qwen2_mapping.py), and writes size-bounded safetensors shards, the index,
config.json and the tokenizer files; `policy_to_hf` does the same from a live policy (sft.py);
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


from megatron_qae.launch_env import single_process_env
from megatron_qae.model import parallel, qwen2_mapping as qm
from megatron_qae.config.sections import ParallelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _policy(hf_dir: Path):
    """A TP=PP=1 model + optimizer skeleton of the HF config (to load / save sharded state)."""
    from types import SimpleNamespace

    from megatron_qae.model.build import load_hf_config
    from megatron_qae.model.policy import build_policy

    hf = load_hf_config(hf_dir)
    groups = parallel.init_distributed(ParallelConfig())
    cfg = SimpleNamespace(
        model=SimpleNamespace(params_dtype="float32", fp8=None, fp8_recipe="tensorwise", transformer_impl="local",
                              recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
                              transformer_overrides={}),
        parallel=SimpleNamespace(sequence_parallel=False, use_distributed_optimizer=False, ddp_overrides={}),
        optim=SimpleNamespace(lr=1e-6, min_lr=0.0, warmup_steps=0, lr_decay_style="constant", weight_decay=0.0,
                              clip_grad=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
                              optimizer_overrides={}))
    return build_policy(cfg, hf, groups, total_steps=1), hf


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
    """Write the HF weights as a Megatron checkpoint directory `out/step_0` (+ `latest`)."""
    from safetensors import safe_open
    from tqdm import tqdm

    from megatron_qae.persistence import checkpoint

    from megatron_qae.model import weights

    single_process_env()
    policy, hf = _policy(hf_dir)
    files = _safetensor_index(hf_dir)
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

    weights.load_full_weights(policy.chunks, get_full, 0, 1)
    bar.close()
    return checkpoint.save_checkpoint(out, 0, policy, {"step": 0, "model_path": str(hf_dir.resolve())},
                                      with_optimizer=False)


def _write_shards(tensors, out: Path, max_shard_bytes: int) -> dict[str, str]:
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, index = 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        if shard:
            index += 1
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        size += nbytes
    flush()
    total = index
    renamed = {}
    for k, v in weight_map.items():
        i = int(v.split("-")[1].split(".")[0])
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        renamed[k] = final
    for i in range(1, total + 1):
        os.replace(out / f"model-{i:05d}.safetensors", out / f"model-{i:05d}-of-{total:05d}.safetensors")
    return renamed


def mcore_to_hf(ckpt: Path, hf_config_dir: Path, out: Path, dtype: str, max_shard_bytes: int) -> Path:
    """Write an HF model directory from a Megatron checkpoint (saved in any layout)."""
    from megatron_qae.persistence import checkpoint

    if out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new directory")
    single_process_env()
    policy, hf = _policy(hf_config_dir)
    checkpoint.load_checkpoint(ckpt, policy, model_only=True)
    return policy_to_hf(policy, hf, hf_config_dir, out, dtype, max_shard_bytes)


def policy_to_hf(policy, hf: dict, hf_config_dir: Path, out: Path, dtype: str,
                 max_shard_bytes: int = 5_000_000_000) -> Path:
    """Write a one-process policy's weights (TP = PP = 1) as an HF model directory, with
    config.json and the tokenizer files of `hf_config_dir`; written atomically."""
    from tqdm import tqdm

    from megatron_qae.model import weights

    if out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new directory")
    with _atomic_dir(out) as tmp:
        target = DTYPES[dtype]
        names = list(weights.global_named_parameters(policy.chunks[0]))

        def tensors():
            for name, full in tqdm(weights.iter_full_params(policy.chunks, None), total=len(names),
                                   desc="mcore -> hf", unit="tensor"):
                for hf_name, t in qm.megatron_to_hf(name, full, hf):
                    yield hf_name, t.to(target).clone()

        weight_map = _write_shards(tensors(), tmp, max_shard_bytes)
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        config = json.loads((hf_config_dir / "config.json").read_text())
        config["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in TOKENIZER_FILES:
            if (hf_config_dir / f).is_file():
                shutil.copy2(hf_config_dir / f, tmp / f)
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
