"""CPU demo: a tiny Qwen2-architecture model learns a small arithmetic task with DAPO + QAE.

What it does: writes the demo model directory (config.json + a tokenizer built in code; no
weights: the policy starts from a seeded random init) and the task's train / validation data,
runs the real trainer (megatron-core on gloo, a local Ray, one CPU rollout engine behind
SGLang's HTTP API) with configs/demo.yaml, then plots reward, entropy and advantage sparsity
per step into <run_dir>/demo.png. What it does not: anything the trainer does not do at scale.

    python -m examples.cpu_demo [--run-dir runs/demo] [key=value overrides ...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from megatron_qae import train
from megatron_qae.run.metrics import read_metrics
from rollout_sglang import demo_task


def plot(run_dir: Path) -> Path:
    """PNG of accuracy / reward, entropy and advantage sparsity over rollout steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    panels = [
        ("accuracy (all samples)", ["rollout/accuracy_all", "eval/avg@4"]),
        ("reward", ["rollout/reward_mean"]),
        ("entropy (nats / token)", ["loss/entropy"]),
        ("advantage sparsity", ["adv/zero_frac", "adv/hard_group_frac", "adv/easy_group_frac"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            pts = [(s, r[key]) for s, r in zip(steps, rows) if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = run_dir / "demo.png"
    fig.savefig(out, dpi=110)
    return out


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--fresh", action="store_true", help="delete the run directory first")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    run_dir = Path(a.run_dir)
    if a.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    model_dir = demo_task.write_demo_model_dir(run_dir / "model", seed=0)
    train_path, val_path = demo_task.write_demo_data(run_dir / "data", seed=0)
    train.main([
        "--config", "configs/demo.yaml",
        f"run.run_dir={run_dir}", f"model.path={model_dir}",
        f"data.train_path={train_path}", f"data.val_path={val_path}", *a.overrides,
    ])
    rows = read_metrics(run_dir)
    first, last = rows[0], rows[-1]
    out = plot(run_dir)
    key = "rollout/accuracy_all"
    print(f"\naccuracy: {first[key]:.3f} at step {first['step']} -> {last[key]:.3f} at step "
          f"{last['step']}\nplot: {out}\nmetrics: {run_dir / 'metrics.jsonl'} "
          f"(tensorboard --logdir {run_dir / 'tensorboard'})")


if __name__ == "__main__":
    main(sys.argv[1:])
