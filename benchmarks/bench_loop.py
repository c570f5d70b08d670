"""Seconds per rollout step: our loop vs Hugging Face TRL's GRPOTrainer, on the same work.

Same tiny Qwen2-architecture model (the demo's, random init), same prompts (the demo's sums),
same group size, prompts per step, optimizer steps per rollout step and completion length;
dynamic sampling off (TRL has none), one trainer process, one thread each. Ours runs the real
loop (`python -m megatron_qae.train`, launched as the demo launches it: Megatron policy on gloo,
local Ray, one CPU engine, reward workers); TRL runs GRPOTrainer with transformers' generate
in-process. Both are started as fresh processes. Prints, per side: start-up seconds (launch to
the start of step 1: when step 1's metrics appear, less that step's time; ours also prints the
seconds from its last step to exit), seconds per rollout step over the steps after `--warmup`,
our split into generate / reward and hand-off / train / weight sync / other, and the ratio
ours / TRL (below 1: we are faster). TRL is a benchmark-only dependency: `pip install -e .[bench]`.

`--shipped-demo` measures the demo as shipped instead (configs/demo.yaml unchanged: dynamic
sampling on, up to 8 response tokens), both sides from the same supervised warm start the demo
uses (30 steps of `megatron_qae.sft`); TRL has no dynamic sampling, so this ratio includes the
extra generation batches dynamic sampling draws (reported as generated groups per step).

    python -m benchmarks.bench_loop [--steps 12 --warmup 2 --completion-tokens 1] [--shipped-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_qae.persistence.metrics import read_metrics
from rollout_sglang import demo_task

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}


def warm_start(tmp: Path) -> Path:
    """The demo's supervised warm start (examples/cpu_demo.py's settings), as an HF directory."""
    from examples.cpu_demo import SFT_BATCH_PROMPTS, SFT_LR, SFT_STEPS

    model = demo_task.write_demo_model_dir(tmp / "model", seed=0)
    train, val = demo_task.write_demo_data(tmp / "data", seed=0)
    args = ["--config", "configs/demo.yaml", "--steps", str(SFT_STEPS), "--batch-prompts", str(SFT_BATCH_PROMPTS),
            "--lr", str(SFT_LR), "--out", str(tmp / "sft"), f"model.path={model}", f"run.run_dir={tmp / 'sft'}",
            f"data.train_path={train}", f"data.val_path={val}"]
    subprocess.run([sys.executable, "-c", f"from megatron_qae import sft; sft.main({args!r})"], env=ENV, cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return tmp / "sft" / "hf"


def ours(tmp: Path, a: argparse.Namespace, model: Path) -> dict[str, float]:
    train, val = demo_task.write_demo_data(tmp / "data", seed=0)
    run_dir = tmp / "ours"
    # One rank, launched as the demo launches it (`python -m`, a world of one): torchrun's
    # launcher would add its own start (about 2 s here) before ours.
    cmd = [sys.executable, "-m", "megatron_qae.train", "--config", "configs/demo.yaml", f"run.run_dir={run_dir}",
           f"model.path={model}", f"data.train_path={train}", f"data.val_path={val}",
           f"run.num_rollout_steps={a.steps}", "run.eval_interval_steps=0", "run.progress_bar=false",
           "run.log_tensorboard=false"]
    if not a.shipped_demo:  # the same work as TRL's
        cmd += ["rollout.dynamic_sampling=false", f"rollout.n_samples_per_prompt={a.group}",
                f"rollout.prompts_per_step={a.prompts}", f"rollout.mini_batch_prompts={a.prompts // a.optimizer_steps}",
                f"rollout.max_response_tokens={a.completion_tokens}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_row_s = None  # launch -> step 1's metrics written (polled), as TRL's clock reads it
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if first_row_s is None and metrics.is_file() and metrics.stat().st_size > 0:
            first_row_s = time.perf_counter() - t0
        time.sleep(0.02)
    exit_s = time.perf_counter() - t0
    if proc.returncode != 0 or first_row_s is None:
        raise SystemExit(f"our run failed (exit {proc.returncode}); see {run_dir}/logs")
    rows = read_metrics(run_dir)
    timed = rows[a.warmup:]

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in timed) / len(timed)

    step, gen, wait = mean("time/step_s"), mean("rollout/generate_s"), mean("time/rollout_wait_s")
    train_s, sync = mean("train/step_s"), mean("sync/total_s")
    last_row_s = first_row_s + sum(r["time/step_s"] for r in rows[1:])
    return {"startup_s": first_row_s - rows[0]["time/step_s"], "shutdown_s": exit_s - last_row_s,
            "step_s": step, "generate_s": gen,
            "reward_handoff_s": wait - gen, "train_s": train_s, "sync_s": sync,
            "other_s": step - wait - train_s - sync,
            "completion_tokens": mean("rollout/response_len_mean"),
            "groups_generated": mean("rollout/groups_generated"), "accuracy": mean("rollout/accuracy_all")}


TRL_SCRIPT = r'''
import json, sys, time
T0 = time.perf_counter()
import torch
from datasets import Dataset
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from rollout_sglang import demo_task

a = json.loads(sys.argv[1])
torch.set_num_threads(1)
torch.manual_seed(0)
model_dir = a["model"]
tok = AutoTokenizer.from_pretrained(model_dir)
model = (Qwen2ForCausalLM.from_pretrained(model_dir) if a["shipped_demo"]
         else Qwen2ForCausalLM(Qwen2Config.from_pretrained(model_dir)))
rows = [{"prompt": q, "answer": ans} for q, ans in demo_task.problems()]
data = Dataset.from_list(rows * 200)

def exact(completions, answer, **_):
    return [1.0 if c.strip() == x else -1.0 for c, x in zip(completions, answer)]

stamps, lengths = [], []
class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        stamps.append(time.perf_counter())
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "completions/mean_length" in logs:
            lengths.append(logs["completions/mean_length"])

per_gen = a["prompts"] * a["group"]
cfg = GRPOConfig(output_dir=a["tmp"] + "/trl_out", use_cpu=True, report_to=[], logging_steps=1,
                 max_steps=a["steps"] * a["optimizer_steps"], learning_rate=2e-3, beta=0.0,
                 num_generations=a["group"], per_device_train_batch_size=per_gen // a["optimizer_steps"],
                 steps_per_generation=a["optimizer_steps"], max_completion_length=a["completion_tokens"],
                 temperature=1.0, top_p=1.0, loss_type="dapo", save_strategy="no", seed=0,
                 disable_tqdm=True, dataloader_num_workers=0, log_completions=False)
trainer = GRPOTrainer(model=model, reward_funcs=exact, args=cfg, train_dataset=data, processing_class=tok,
                      callbacks=[Clock()])
trainer.train()
k = a["optimizer_steps"]
ends = stamps[k - 1::k]
first_start = stamps[0] - (stamps[k - 1] - stamps[0]) / max(k - 1, 1) if k > 1 else None
w = a["warmup"]
step_s = (ends[-1] - ends[w - 1]) / (len(ends) - w)
print("RESULT " + json.dumps({"startup_s": ends[0] - T0 - step_s, "step_s": step_s,
                              "completion_tokens": sum(lengths) / max(len(lengths), 1)}))
'''


def trl(tmp: Path, a: argparse.Namespace, model: Path) -> dict[str, float]:
    args = json.dumps({**vars(a), "tmp": str(tmp), "model": str(model)})
    proc = subprocess.run([sys.executable, "-c", TRL_SCRIPT, args], env=ENV, cwd=ROOT, check=True,
                          capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--optimizer-steps", type=int, default=2)
    ap.add_argument("--completion-tokens", type=int, default=1)
    ap.add_argument("--shipped-demo", action="store_true",
                    help="configs/demo.yaml as shipped (dynamic sampling on), both from the demo's warm start")
    a = ap.parse_args()
    if a.shipped_demo:
        a.completion_tokens, a.group, a.prompts, a.optimizer_steps = 8, 8, 8, 2  # configs/demo.yaml
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = warm_start(tmp) if a.shipped_demo else demo_task.write_demo_model_dir(tmp / "model", seed=0)
        o = ours(tmp, a, model)
        t = trl(tmp, a, model)
    print(f"work: {a.prompts} prompts x {a.group} samples, {a.optimizer_steps} optimizer steps per rollout "
          f"step, up to {a.completion_tokens} completion tokens (mean: ours {o['completion_tokens']:.2f}, "
          f"TRL {t['completion_tokens']:.2f}); steps {a.warmup + 1}..{a.steps} timed")
    print(f"ours: {o['step_s']:.3f} s/step = generate {o['generate_s']:.3f} + reward/hand-off "
          f"{o['reward_handoff_s']:.3f} + train {o['train_s']:.3f} + sync {o['sync_s']:.3f} + other "
          f"{o['other_s']:.3f}; start-up {o['startup_s']:.1f} s (launch to step 1), exit "
          f"{o['shutdown_s']:.1f} s after the last step")
    if a.shipped_demo:
        print(f"ours (shipped demo, dynamic sampling on): {o['groups_generated']:.1f} groups generated per step "
              f"for {a.prompts} trained (TRL: {a.prompts}); rollout accuracy {o['accuracy']:.3f}")
    print(f"TRL:  {t['step_s']:.3f} s/step; start-up {t['startup_s']:.1f} s")
    print(f"ratio ours / TRL, s per rollout step: {o['step_s'] / t['step_s']:.2f}; start-up: "
          f"{o['startup_s'] / t['startup_s']:.2f}")


if __name__ == "__main__":
    main()
