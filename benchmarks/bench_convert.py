"""Peak host memory of exporting a Megatron checkpoint to HF (`tools.convert_checkpoint
mcore-to-hf`), before and after the streaming converter, in the same run.

A random Qwen2-architecture model of about 1B parameters is saved as a bf16 model-only dist
checkpoint; then the command line converts it to bf16 safetensors twice, each in its own
process: once with the code of `--before` (default: the commit before the streaming converter,
extracted with `git archive`: it built the fp32 TP=PP=1 policy in DDP with its optimizer and
loaded the checkpoint into it) and once with this tree's. Each process's peak RSS comes from
the kernel (`os.wait4`'s ru_maxrss) and is printed as a ratio to the model's bytes; the two
outputs are compared tensor by tensor.

    python -m benchmarks.bench_convert [--hidden 2048 --layers 20 --vocab 32000] [--before 161d77d]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _config(hidden: int, layers: int, vocab: int) -> dict:
    from benchmarks.common import bench_hf_config

    hf = bench_hf_config(hidden=hidden, layers=layers, vocab=vocab)
    hf.update(num_attention_heads=hidden // 128, num_key_value_heads=max(hidden // 512, 1),
              intermediate_size=hidden * 11 // 4, torch_dtype="bfloat16")
    return hf


def write_checkpoint(hf_dir: Path, run_dir: Path) -> None:
    """(child process) A random bf16 model-only checkpoint of `hf_dir`'s config.json."""
    import torch

    from megatron_qae.launch_env import single_process_env
    from megatron_qae.model import parallel
    from megatron_qae.model.build import load_hf_config
    from megatron_qae.model.hf_convert import _bare_model
    from megatron_qae.persistence import checkpoint

    single_process_env()
    chunks = _bare_model(load_hf_config(hf_dir), "bfloat16")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))
    checkpoint.save_model_checkpoint(run_dir, 0, chunks, {"step": 0})
    parallel.destroy()


def _convert(code_root: Path, ckpt: Path, hf_dir: Path, out: Path) -> tuple[int, float]:
    """Run the command line of the tree at `code_root`; (peak RSS bytes, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, "-m", "tools.convert_checkpoint", "mcore-to-hf", "--ckpt", str(ckpt),
           "--hf-config-dir", str(hf_dir), "--out", str(out), "--dtype", "bfloat16"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} (code of {code_root}) failed:\n{err.decode()[-3000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - t0


def _same_tensors(a: Path, b: Path) -> int:
    """Number of tensors compared; raises on the first that differs."""
    import torch
    from safetensors import safe_open

    where = json.loads((b / "model.safetensors.index.json").read_text())["weight_map"]
    count = 0
    for f in sorted(a.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as ha:
            for name in ha.keys():
                with safe_open(str(b / where[name]), framework="pt") as hb:
                    if not torch.equal(ha.get_tensor(name), hb.get_tensor(name)):
                        raise SystemExit(f"{name} differs between the two exports")
                count += 1
    return count


def _extract(commit: str, into: Path) -> Path:
    archive = into / "before.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), commit,
                    "megatron_qae", "rollout_sglang", "tools", "testsupport"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "before", filter="data")
    archive.unlink()
    return into / "before"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--before", default="161d77d", help="commit whose converter is the baseline")
    ap.add_argument("--write", nargs=2, type=Path, metavar=("HF_DIR", "RUN_DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.write:
        write_checkpoint(*a.write)
        return
    hf = _config(a.hidden, a.layers, a.vocab)
    with tempfile.TemporaryDirectory(prefix=".bench-convert-", dir=".") as tmp:
        tmp = Path(tmp)
        hf_dir, run_dir = tmp / "hf", tmp / "run"
        hf_dir.mkdir()
        (hf_dir / "config.json").write_text(json.dumps(hf))
        subprocess.run([sys.executable, "-m", "benchmarks.bench_convert", "--write", str(hf_dir), str(run_dir)],
                       cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
        ckpt = run_dir / "checkpoints" / "step_0"
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        model_bytes = sum(m.size.numel() * m.properties.dtype.itemsize for k, m in meta.items()
                          if hasattr(m, "size"))
        before_rss, before_s = _convert(_extract(a.before, tmp), ckpt, hf_dir, tmp / "hf_before")
        after_rss, after_s = _convert(ROOT, ckpt, hf_dir, tmp / "hf_after")
        count = _same_tensors(tmp / "hf_before", tmp / "hf_after")
    print(f"model: {model_bytes // 2 / 1e9:.2f}B parameters, {model_bytes / 1e9:.2f} GB bf16 "
          f"(hidden {a.hidden}, {a.layers} layers, vocab {a.vocab})")
    print(f"before ({a.before}): peak RSS {before_rss / 1e9:.2f} GB = {before_rss / model_bytes:.2f}x the model, "
          f"{before_s:.1f} s")
    print(f"after (this tree): peak RSS {after_rss / 1e9:.2f} GB = {after_rss / model_bytes:.2f}x the model, "
          f"{after_s:.1f} s")
    print(f"the two exports are identical ({count} tensors)")


if __name__ == "__main__":
    main()
