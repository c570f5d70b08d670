"""Convert between Hugging Face Qwen2 safetensors and Megatron dist checkpoints.

    python -m tools.convert_checkpoint hf-to-mcore --hf-dir HF --out CKPT
    python -m tools.convert_checkpoint mcore-to-hf --ckpt CKPT/step_N --hf-config-dir HF --out OUT \
        [--dtype bfloat16] [--max-shard-bytes 5000000000] [--fp8 --calib-data PROMPTS]

The command line of megatron_qae/model/hf_convert.py. What it does: HF -> Megatron reads the safetensors shards tensor by tensor and writes a model
dist checkpoint (torch_dist) that training loads in any layout (`model.path` + the checkpoint
as the run directory's first step, or `load_checkpoint`). Megatron -> HF reads the checkpoint
(saved under any tp/pp/dp) from its files one tensor at a time on CPU, in its stored dtype,
maps each with the same pure Qwen2 mapping weight sync uses, and appends it to its size-bounded
safetensors shard as it goes (no model, optimizer or process group: the peak is a few tensors),
then writes the index, config.json and the tokenizer files. Output goes to a temporary directory renamed at the end, so a failure leaves nothing
half-written. `--fp8` quantizes the exported model to FP8 with nvidia-modelopt, calibrating
activation scales on prompts of a data file. What it does not: optimizer state (HF has none).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from megatron_qae.model.hf_convert import (DTYPES, calibration_ids, export_fp8, hf_to_mcore,
                                           mcore_to_hf)
from megatron_qae.run import console


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verbose", action="store_true",
                    help="also show third-party logs and warnings (megatron-core, torch, modelopt)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore")
    a.add_argument("--hf-dir", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True, help="run directory to write checkpoints/step_0 into")
    b = sub.add_parser("mcore-to-hf")
    b.add_argument("--ckpt", type=Path, required=True, help="a checkpoints/step_N directory")
    b.add_argument("--hf-config-dir", type=Path, required=True, help="source of config.json and tokenizer files")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="dtype of the written weights (read in the checkpoint's own, cast per tensor)")
    b.add_argument("--max-shard-bytes", type=int, default=5_000_000_000)
    b.add_argument("--fp8", action="store_true",
                   help="write an FP8 (E4M3) model through nvidia-modelopt instead (needs --calib-data)")
    b.add_argument("--calib-data", type=Path, help="--fp8: parquet / jsonl prompts (training schema)")
    b.add_argument("--calib-samples", type=int, default=128)
    b.add_argument("--calib-max-tokens", type=int, default=2048)
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="--fp8: device for calibration")
    args = ap.parse_args(argv)
    console.setup(0, args.verbose)  # megatron-core is imported below, lazily
    if args.cmd == "hf-to-mcore":
        print(hf_to_mcore(args.hf_dir, args.out))
    elif not args.fp8:
        print(mcore_to_hf(args.ckpt, args.hf_config_dir, args.out, args.dtype, args.max_shard_bytes))
    else:
        if args.calib_data is None or not args.calib_data.is_file():
            raise SystemExit(f"--fp8 needs --calib-data: a parquet / jsonl of prompts for the activation "
                             f"scales (got {args.calib_data})")
        if args.out.exists():
            raise SystemExit(f"--out {args.out} exists; choose a new directory")
        calib = calibration_ids(args.calib_data, args.hf_config_dir, args.calib_samples, args.calib_max_tokens)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{args.out.name}.bf16-", dir=args.out.parent) as tmp:
            bf16 = mcore_to_hf(args.ckpt, args.hf_config_dir, Path(tmp) / "hf", "bfloat16", args.max_shard_bytes)
            print(export_fp8(bf16, args.out, calib, args.device))


if __name__ == "__main__":
    main(sys.argv[1:])
