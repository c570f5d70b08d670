"""Entry point: evaluate a trainer checkpoint or an HF model directory on a data set.

    python -m megatron_qae.eval --ckpt RUN/checkpoints/step_N | --hf-dir DIR --data FILE.parquet|jsonl
        [--n 32] [--k 1,4,16] [--config configs/X.yaml] [--out runs/eval] [--verbose] [key=value ...]

What it does: a trainer checkpoint is first written as an HF directory by the existing
converter (megatron_qae.model.hf_convert.mcore_to_hf, into a temporary directory: one process
on CPU, tensor by tensor, in the checkpoint's dtype); then the rollout
engines of the config start on that directory (`engine.backend=cpu`, or `engine.backend=sglang`
exactly as the trainer takes it), every prompt of `--data` is sampled `--n` times at the
validation sampling parameters (rollout.val_temperature / val_top_p / top_k), scored with the
config's reward, and avg@n, pass@k (unbiased) and maj@k are printed and written to
`<out>/eval.json`, overall and per data source, with a progress bar over prompts. The numbers
come from the same manager call and estimators as the training loop's periodic eval
(RolloutManager.eval_groups + eval_metrics.eval_summary). With --ckpt and no --config, the
run's own config.yaml (next to its checkpoints/) is the base. What it does not: train, or
compare runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from megatron_qae.run import console

DEFAULT_CHUNK_PROMPTS = 8
"""Prompts per manager call: the progress bar advances by this many."""


def _ks(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers, e.g. 1,4,16") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", type=Path, help="a trainer checkpoint directory (RUN/checkpoints/step_N)")
    src.add_argument("--hf-dir", type=Path, help="an HF model directory (safetensors + config + tokenizer)")
    ap.add_argument("--data", type=Path, required=True, help="parquet / jsonl in the verl schema")
    ap.add_argument("--n", type=int, default=32, help="samples per prompt")
    ap.add_argument("--k", type=_ks, default=None, help="k of pass@k and maj@k, comma-separated (default 1,2,4,...,n)")
    ap.add_argument("--config", default=None,
                    help="YAML config (engines, rollout lengths, reward); with --ckpt the run's config.yaml")
    ap.add_argument("--hf-config-dir", type=Path, default=None,
                    help="--ckpt: config.json + tokenizer source (default: the run config's model.path)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="--ckpt: dtype of the converted weights (default: the checkpoint's own)")
    ap.add_argument("--out", type=Path, default=Path("runs/eval"), help="directory of eval.json and logs")
    ap.add_argument("--chunk-prompts", type=int, default=DEFAULT_CHUNK_PROMPTS)
    ap.add_argument("--verbose", action="store_true", help="also show third-party logs on the terminal")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. engine.backend=sglang")
    a = ap.parse_args(argv)
    if a.n < 1:
        ap.error(f"--n {a.n}: needs at least one sample per prompt")
    bad = [k for k in a.k or [] if not 0 < k <= a.n]
    if bad:
        ap.error(f"--k {bad}: every k must be in 1..--n ({a.n}); raise --n or drop those k")
    if not a.data.is_file():
        ap.error(f"--data {a.data}: no such file")
    return a


def _base_config(a: argparse.Namespace) -> str | None:
    """--config, else the checkpoint's run config (RUN/config.yaml for RUN/checkpoints/step_N)."""
    if a.config is not None or a.ckpt is None:
        return a.config
    run_config = a.ckpt.resolve().parent.parent / "config.yaml"
    if not run_config.is_file():
        raise SystemExit(f"--ckpt {a.ckpt}: no {run_config} to take the engine and reward settings from; "
                         "pass --config")
    return str(run_config)


def _hf_dir_of(a: argparse.Namespace, base_model_path: str, tmp: Path) -> Path:
    """The HF directory to serve: --hf-dir, or the checkpoint converted by model/hf_convert.py."""
    if a.hf_dir is not None:
        return a.hf_dir
    from megatron_qae.model.hf_convert import mcore_to_hf

    hf_config_dir = a.hf_config_dir or Path(base_model_path)
    if not (hf_config_dir / "config.json").is_file():
        raise SystemExit(f"--ckpt: {hf_config_dir} has no config.json; pass --hf-config-dir")
    return mcore_to_hf(a.ckpt, hf_config_dir, tmp / "hf", a.dtype, 5_000_000_000)


def evaluate(cfg, ks: list[int], n: int, chunk_prompts: int) -> dict[str, float]:
    """Start the config's engines on cfg.model.path and evaluate cfg.data.val_path."""
    import ray
    from tqdm import tqdm

    from megatron_qae.run.rollout import Rollout
    from rollout_sglang.eval_metrics import eval_summary

    rollout = Rollout.start(cfg, "127.0.0.1")
    try:
        manager = rollout.manager
        # The engines loaded the weights from the directory at start: they serve as they are.
        urls = [u for u, _ in ray.get(manager.engine_endpoints.remote())]
        ray.get(manager.mark_synced.remote(urls, 0))
        total = ray.get(manager.num_val_prompts.remote())
        groups, errors = [], 0
        with tqdm(total=total, desc="eval prompts", unit="prompt") as bar:
            for start in range(0, total, chunk_prompts):
                part, err = ray.get(manager.eval_groups.remote(start, min(start + chunk_prompts, total), n))
                groups += part
                errors += err
                bar.update(len(part))
        return eval_summary(groups, ks, errors)
    finally:
        rollout.shutdown()
        ray.shutdown()


def format_table(metrics: dict[str, float]) -> str:
    """One line per data source (overall first): each metric as name=value."""
    rows: dict[str, list[str]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        source, name = ("all", parts[1]) if len(parts) == 2 else (parts[1], parts[2])
        if "@" in name:
            rows.setdefault(source, []).append(f"{name}={value:.4f}")
    return "\n".join(f"{source:>16}  " + "  ".join(cells) for source, cells in rows.items())


def main(argv: list[str] | None = None) -> dict[str, float]:
    a = parse_args(argv)
    console.setup(0, a.verbose)  # before megatron-core / Ray are imported
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from megatron_qae.config.loading import load_config
    from megatron_qae.train import local_ray_auth_default
    from rollout_sglang.eval_metrics import default_ks

    base = _base_config(a)
    a.out.mkdir(parents=True, exist_ok=True)
    console.attach_run_dir(a.out, 0)
    with tempfile.TemporaryDirectory(prefix=".eval-", dir=a.out) as tmp:
        base_model = load_config(base, a.overrides).model.path if a.ckpt is not None else ""
        hf_dir = _hf_dir_of(a, base_model, Path(tmp))
        cfg = load_config(base, [*a.overrides, f"model.path={hf_dir}", f"data.train_path={a.data}",
                                 f"data.val_path={a.data}", f"run.run_dir={a.out}"])
        local_ray_auth_default(cfg.ray.address, os.environ)
        ks = sorted(set(a.k)) if a.k else default_ks(a.n)
        metrics = evaluate(cfg, ks, a.n, a.chunk_prompts)
    source = {"ckpt": str(a.ckpt)} if a.ckpt is not None else {"hf_dir": str(a.hf_dir)}
    report = {**source, "data": str(a.data), "n": a.n, "ks": ks, "metrics": metrics}
    out = a.out / "eval.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{format_table(metrics)}\nwritten: {out}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
