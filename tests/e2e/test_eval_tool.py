"""`python -m megatron_qae.eval` end to end on the demo task, with a model whose answers are
known: a tiny Qwen2 trained here with plain transformers (partly: some sums right, some
wrong), evaluated greedily (rollout.top_k=1), so every sample of a prompt is transformers'
own greedy answer. The printed and written numbers must equal those answers' accuracy per data
source; a trainer checkpoint of the same weights (--ckpt, through the converter) must give
the same numbers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_qae.config.loading import load_config, save_config
from rollout_sglang import demo_task
from rollout_sglang.rewards.registry import exact_match
from testsupport.tiny import ROOT


def _train_tiny_model(model_dir, steps: int = 45):
    """Teach a random-init Qwen2 the padded sums for a few steps with transformers alone."""
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(AutoConfig.from_pretrained(model_dir))
    rows = [tok(q + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for q, a in demo_task.problems()]
    ids = torch.tensor(rows)  # every problem has the same length: "a+b=" + 2 digits + eos
    labels = ids.clone()
    labels[:, :4] = -100  # learn the answer only
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(model_dir)
    return model.eval(), tok


def _greedy_correct(model, tok) -> list[bool]:
    out = []
    for q, a in demo_task.problems():
        ids = torch.tensor([tok(q, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        out.append(exact_match(text, a).accuracy == 1.0)
    return out


def _eval(args: list[str], out) -> tuple[dict, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "megatron_qae.eval", *args, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "eval.json").read_text())["metrics"], proc.stdout


def _printed(stdout: str) -> dict[str, float]:
    """The table the tool prints: '<source>  name=value ...' lines."""
    found = {}
    for line in stdout.splitlines():
        cells = line.split()
        if cells and all(re.fullmatch(r"[a-z]+@\d+=[0-9.]+", c) for c in cells[1:]) and len(cells) > 1:
            src = cells[0]
            for c in cells[1:]:
                name, value = c.split("=")
                found[f"eval/{name}" if src == "all" else f"eval/{src}/{name}"] = float(value)
    return found


@pytest.mark.timeout(1200)
def test_eval_tool_reports_the_known_greedy_accuracy_per_source_from_hf_dir_and_checkpoint(tmp_path):
    model_dir = demo_task.write_demo_model_dir(tmp_path / "hf", seed=0)
    model, tok = _train_tiny_model(model_dir)
    right = _greedy_correct(model, tok)
    assert 0 < sum(right) < len(right), sum(right)  # a model that is partly right
    # Two data sources: the first 40 problems and the other 60.
    rows = [{"data_source": "first40" if i < 40 else "rest", "prompt": [{"role": "user", "content": q}],
             "reward_model": {"ground_truth": a}} for i, (q, a) in enumerate(demo_task.problems())]
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expect = {"first40": sum(right[:40]) / 40, "rest": sum(right[40:]) / 60, None: sum(right) / 100}

    greedy = ["rollout.top_k=1"]
    m, stdout = _eval(["--hf-dir", str(model_dir), "--data", str(data), "--n", "4", "--config",
                       "configs/demo.yaml", *greedy], tmp_path / "e1")
    for source, acc in expect.items():
        pre = "eval/" if source is None else f"eval/{source}/"
        for name in ("avg@4", "pass@1", "pass@2", "pass@4", "maj@1", "maj@2", "maj@4"):
            assert m[pre + name] == pytest.approx(acc, abs=1e-12), (pre + name, m[pre + name], acc)
    assert m["eval/first40/prompts"] == 40 and m["eval/rest/prompts"] == 60 and m["eval/reward_errors"] == 0
    printed = _printed(stdout)
    assert len(printed) == 21 and all(printed[k] == pytest.approx(m[k], abs=5e-5) for k in printed)

    # The same weights as a trainer checkpoint, evaluated through the converter.
    conv = subprocess.run([sys.executable, "-m", "tools.convert_checkpoint", "hf-to-mcore", "--hf-dir", str(model_dir),
                           "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, timeout=600)
    assert conv.returncode == 0, conv.stderr[-3000:]
    save_config(load_config("configs/demo.yaml", [f"model.path={model_dir}", f"data.train_path={data}"]),
                tmp_path / "run")  # --ckpt takes engines, reward and model.path from the run's config
    m2, _ = _eval(["--ckpt", str(tmp_path / "run" / "checkpoints" / "step_0"), "--data", str(data), "--n", "4",
                   *greedy], tmp_path / "e2")
    assert {k: v for k, v in m2.items()} == m
