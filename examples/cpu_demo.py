"""CPU demo: what QAE changes. A tiny Qwen2-architecture model, warmed up by a short supervised
phase, is trained with DAPO twice from the same start and seeds, with the QAE baseline and
with the mean baseline, on zero-padded two-digit sums ("3+4=" -> "07<eos>").

What it does: writes the demo model directory (config.json + a tokenizer built in code) and the
task's data, runs the supervised warm start (megatron_qae.sft, in this process, through the
same Megatron policy; a random init is right about once in 16^3 samples, too rarely for RL to
start), then the real trainer twice (`python -m megatron_qae.train` with configs/demo.yaml:
megatron-core on gloo, a local Ray, one CPU rollout engine behind SGLang's HTTP API), once as
configured (QAE) and once with `algo.baseline=mean`, each from the warm start's HF directory,
one after the other. Plots accuracy, entropy, zero-advantage share, response length and
goodput of both runs into <run_dir>/demo.png and prints both runs' final accuracies,
zero-advantage shares and goodput. What it does not: anything the trainer does not do at scale.

    python -m examples.cpu_demo [--run-dir runs/demo] [--sft-steps N] [key=value overrides ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from megatron_qae import sft
from megatron_qae.persistence.metrics import gradient_token_share, read_metrics
from rollout_sglang import demo_task

RUNS = {"qae": [], "mean": ["algo.baseline=mean"]}
"""Run name -> the overrides that make it (both share every other setting and seed)."""
SFT_STEPS, SFT_BATCH_PROMPTS, SFT_LR = 30, 32, 3e-3
"""Warm start: about 15-20 % sampled accuracy on the demo task (measured: 30 steps -> ~0.17)."""
PANELS = [
    ("accuracy", ["rollout/accuracy_all", "eval/avg@4"]),
    ("entropy (nats / token)", ["loss/entropy"]),
    ("zero-advantage share", ["adv/zero_frac"]),
    ("response length (tokens)", ["rollout/response_len_mean"]),
    ("goodput (gradient tokens / s)", ["perf/goodput_tokens_per_s"]),
]
"""(title, metric keys) of each panel; the first key solid, the second dashed."""
_WORLD_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _python_module(module: str, args: list[str]) -> None:
    """`python -m module args` in its own process (each run sets up and tears down its own
    process group and Ray); its output goes to the terminal; a failure stops the demo. The
    world-of-one variables the in-process warm start set are not passed on: the child picks
    its own rendezvous port."""
    env = {k: v for k, v in os.environ.items() if k not in _WORLD_VARS}
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{module} failed (exit {proc.returncode}); see the logs under its run directory")


def plot(runs: dict[str, list[dict]], out: Path) -> Path:
    """One PNG: a panel per metric, one line per run (dashed: evaluation avg@4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    colors = {"qae": "tab:blue", "mean": "tab:orange"}
    for ax, (title, keys) in zip(axes, PANELS):
        for name, rows in runs.items():
            for key, style in zip(keys, ("-", "--")):
                pts = [(r["step"], r[key]) for r in rows if key in r]
                if pts:
                    label = f"{name} {'eval avg@4' if key.startswith('eval') else ''}".strip()
                    ax.plot(*zip(*pts), style, color=colors.get(name), marker="o" if style == "--" else None,
                            ms=3, lw=1.2, label=label)
        ax.set_title(title)
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def summary(rows: list[dict], last: int = 10) -> dict[str, float]:
    """Start / final numbers of one run: rollout accuracy (step 1, mean of the last `last`
    steps), last evaluation avg@4 / pass@4, zero-advantage share (mean over the run and over
    the last steps), entropy and response length at the end; goodput (gradient-carrying
    response tokens / s of the whole rollout step, mean over the run) and the run's share of
    generated tokens that carried a gradient."""
    tail = rows[-last:]
    evals = [r for r in rows if "eval/avg@4" in r]

    def mean(key: str, part: list[dict]) -> float:
        vals = [r[key] for r in part if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    return {
        "accuracy_step1": rows[0]["rollout/accuracy_all"], "accuracy_last": mean("rollout/accuracy_all", tail),
        "eval_avg@4": evals[-1]["eval/avg@4"] if evals else float("nan"),
        "eval_pass@4": evals[-1]["eval/pass@4"] if evals else float("nan"),
        "zero_adv_mean": mean("adv/zero_frac", rows), "zero_adv_last": mean("adv/zero_frac", tail),
        "entropy_last": mean("loss/entropy", tail), "response_len_last": mean("rollout/response_len_mean", tail),
        "goodput_mean": mean("perf/goodput_tokens_per_s", rows),
        "generated_tokens_per_s_mean": mean("perf/generated_tokens_per_s", rows),
        "gradient_token_share": gradient_token_share(rows),
    }


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--sft-steps", type=int, default=SFT_STEPS)
    ap.add_argument("overrides", nargs="*", help="trainer overrides for both runs, e.g. run.num_rollout_steps=20")
    a = ap.parse_args(argv)
    run_dir = Path(a.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # every demo starts over: a resumed RL run would skip its steps
    model_dir = demo_task.write_demo_model_dir(run_dir / "model", seed=0)
    train_path, val_path = demo_task.write_demo_data(run_dir / "data", seed=0)
    common = [f"data.train_path={train_path}", f"data.val_path={val_path}"]
    warm = run_dir / "sft" / "hf"
    print(f"supervised warm start: {a.sft_steps} steps", flush=True)
    sft.main(["--config", "configs/demo.yaml", "--steps", str(a.sft_steps), "--batch-prompts",
              str(SFT_BATCH_PROMPTS), "--lr", str(SFT_LR), "--out", str(run_dir / "sft"),
              f"model.path={model_dir}", f"run.run_dir={run_dir / 'sft'}", *common])  # tears its group down
    for name, extra in RUNS.items():
        print(f"RL from the warm start: {name} baseline", flush=True)
        _python_module("megatron_qae.train", ["--config", "configs/demo.yaml", f"run.run_dir={run_dir / name}",
                                              f"model.path={warm}", *common, *extra, *a.overrides])
    runs = {name: read_metrics(run_dir / name) for name in RUNS}
    out = plot(runs, run_dir / "demo.png")
    print()
    for name, rows in runs.items():
        s = summary(rows)
        print(f"{name:>4}: rollout accuracy {s['accuracy_step1']:.3f} at step 1 -> {s['accuracy_last']:.3f} "
              f"(mean of the last 10 steps), last eval avg@4 {s['eval_avg@4']:.3f} pass@4 {s['eval_pass@4']:.3f}; "
              f"zero-advantage share {s['zero_adv_mean']:.3f} (run mean), {s['zero_adv_last']:.3f} (last 10); "
              f"entropy {s['entropy_last']:.3f}, response length {s['response_len_last']:.2f}; goodput "
              f"{s['goodput_mean']:.1f} gradient tokens/s of {s['generated_tokens_per_s_mean']:.1f} generated "
              f"(run mean), {s['gradient_token_share']:.3f} of generated tokens carried a gradient")
    print(f"plot: {out}\nmetrics: {run_dir / 'qae' / 'metrics.jsonl'}, {run_dir / 'mean' / 'metrics.jsonl'}")


if __name__ == "__main__":
    main(sys.argv[1:])
