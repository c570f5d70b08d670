"""tools.convert_checkpoint: HF -> Megatron -> HF is bit-identical; Megatron logits equal
transformers' on the converted weights; training checkpoints (TP=2, PP=2 with the distributed
optimizer) export to the same model, holding about one tensor at a time, not the model; bad
inputs fail clearly without leaving output behind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from testsupport import tiny


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.convert_checkpoint", *args], cwd=tiny.ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(tiny.ROOT)})


def _tensors(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("tied,family", [(False, "qwen2"), (True, "qwen2"), (False, "qwen3")])
def test_hf_mcore_hf_round_trip_is_bit_identical(tmp_path, tied, family):
    hf = (tiny.tiny_qwen3_config if family == "qwen3" else tiny.tiny_hf_config)(tied=tied)
    src = tmp_path / "hf"
    tiny.tiny_hf_model(hf).save_pretrained(src, max_shard_size="20KB")  # several shards
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                 "architectures": hf["architectures"]}))
    assert len(list(src.glob("*.safetensors"))) > 1
    r = _convert("hf-to-mcore", "--hf-dir", str(src), "--out", str(tmp_path / "mc"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _convert("mcore-to-hf", "--ckpt", str(tmp_path / "mc" / "checkpoints" / "step_0"),
                 "--hf-config-dir", str(src), "--out", str(tmp_path / "back"), "--dtype", "float32",
                 "--max-shard-bytes", "30000")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _tensors(src), _tensors(tmp_path / "back")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a)
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, hf["vocab_size"], (2, 9))
    ref = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()(ids).logits
    assert torch.equal(ref, got)


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2", "--dist-opt"]], ids=["tp2", "pp2-distopt"])
def test_training_checkpoint_saved_under_tp2_or_pp2_exports_the_same_model(tmp_path, layout):
    run = tmp_path / "run"
    tiny.torchrun(tiny.ROOT / "tests" / "dist_workers" / "ckpt_worker.py", 2,
                  ["--mode", "save", *layout, "--run-dir", str(run)])
    hf = tiny.tiny_hf_config()
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps(hf))
    r = _convert("mcore-to-hf", "--ckpt", str(run / "checkpoints" / "step_1"), "--hf-config-dir",
                 str(cfg_dir), "--out", str(tmp_path / "hf"), "--dtype", "float32")
    assert r.returncode == 0, r.stderr[-3000:]
    saved = {}  # full (TP-merged) params after step 1, every pipeline stage's
    for f in sorted(run.glob("saved.pp*.pt")):
        saved.update(torch.load(f)["params"])
    from megatron_qae.model import qwen2_mapping as qm

    exported = _tensors(tmp_path / "hf")
    assert len(saved) == len(list(qm.megatron_names(hf)))
    for name, full in saved.items():
        for hf_name, t in qm.megatron_to_hf(name, full, hf):
            assert torch.equal(exported[hf_name], t), hf_name
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


_PEAK = """
import json, sys
from pathlib import Path
from megatron_qae.model.hf_convert import mcore_to_hf
from testsupport.measure import peak_allocated_bytes
ckpt, cfg, out = map(Path, sys.argv[1:4])
print(json.dumps(peak_allocated_bytes(lambda: mcore_to_hf(ckpt, cfg, out, "float32", 5_000_000_000))))
"""


def test_export_holds_about_one_tensor_not_the_model(tmp_path):
    # The old export built the fp32 model in DDP (the parameters plus a gradient buffer of the
    # same size) and loaded the checkpoint beside it: at least twice the model. Streaming holds
    # the megatron tensor being mapped, the chunk being read and one contiguous HF piece.
    hf = tiny.tiny_hf_config(layers=4)
    src = tmp_path / "hf"
    tiny.tiny_hf_model(hf).save_pretrained(src)
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                 "architectures": hf["architectures"]}))
    assert _convert("hf-to-mcore", "--hf-dir", str(src), "--out", str(tmp_path / "mc")).returncode == 0
    r = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "mc" / "checkpoints" / "step_0"), str(src),
                        str(tmp_path / "back")], cwd=tiny.ROOT, capture_output=True, text=True, timeout=300,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(tiny.ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    peak = json.loads(r.stdout.strip().splitlines()[-1])
    source = _tensors(src)
    model_bytes = sum(t.numel() * t.element_size() for t in source.values())
    from megatron_qae.model import qwen2_mapping as qm

    largest = max(qm.hf_to_megatron(n, source, hf).numel() * 4 for n in qm.megatron_names(hf))
    assert peak <= 2.5 * largest, (peak, largest, model_bytes)
    assert peak < 0.3 * model_bytes
    back = _tensors(tmp_path / "back")
    assert back.keys() == source.keys() and all(torch.equal(back[k], source[k]) for k in source)


def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path):
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    r = _convert("hf-to-mcore", "--hf-dir", str(src), "--out", str(tmp_path / "o1"))
    assert r.returncode != 0 and "supported: Qwen2ForCausalLM" in r.stderr and "Qwen3ForCausalLM" in r.stderr
    hf = tiny.tiny_hf_config()
    good = tmp_path / "hf"
    tiny.tiny_hf_model(hf).save_pretrained(good, max_shard_size="20KB")
    (good / "config.json").write_text(json.dumps({**hf}))
    victim = sorted(good.glob("model-*.safetensors"))[0]
    victim.unlink()
    r = _convert("hf-to-mcore", "--hf-dir", str(good), "--out", str(tmp_path / "o2"))
    assert r.returncode != 0 and victim.name in r.stderr
    assert not (tmp_path / "o2" / "checkpoints").exists() or not list((tmp_path / "o2" / "checkpoints").glob("step_*"))
    r = _convert("mcore-to-hf", "--ckpt", str(tmp_path / "nope"), "--hf-config-dir", str(good),
                 "--out", str(tmp_path / "o3"))
    assert r.returncode != 0 and "not a complete checkpoint" in r.stderr
    assert not (tmp_path / "o3").exists()


def test_fp8_export_through_modelopt_matches_an_independent_quantization(tmp_path):
    from transformers import AutoConfig, Qwen2ForCausalLM

    from rollout_sglang import demo_task

    src = demo_task.write_demo_model_dir(tmp_path / "hf")
    torch.manual_seed(0)
    Qwen2ForCausalLM(AutoConfig.from_pretrained(src)).save_pretrained(src)
    train, _ = demo_task.write_demo_data(tmp_path / "data", task="single_digit")
    assert _convert("hf-to-mcore", "--hf-dir", str(src), "--out", str(tmp_path / "mc")).returncode == 0
    ckpt = str(tmp_path / "mc" / "checkpoints" / "step_0")
    r = _convert("mcore-to-hf", "--ckpt", ckpt, "--hf-config-dir", str(src), "--out", str(tmp_path / "nocal"), "--fp8")
    assert r.returncode != 0 and "--fp8 needs --calib-data" in r.stderr and not (tmp_path / "nocal").exists()
    r = _convert("mcore-to-hf", "--ckpt", ckpt, "--hf-config-dir", str(src), "--out", str(tmp_path / "bf16"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _convert("mcore-to-hf", "--ckpt", ckpt, "--hf-config-dir", str(src), "--out", str(tmp_path / "fp8"),
                 "--fp8", "--calib-data", str(train), "--calib-samples", "16")
    assert r.returncode == 0, r.stderr[-3000:]
    q = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert q["quant_algo"] == "FP8"
    ref, fp8 = _tensors(tmp_path / "bf16"), _tensors(tmp_path / "fp8")
    linear = [k for k in ref if k.endswith("_proj.weight")]
    assert len(linear) == 7 * 2  # q k v o gate up down, 2 layers
    for k in linear:
        w, stem = ref[k].float(), k[: -len(".weight")]
        assert fp8[k].dtype == torch.float8_e4m3fn
        scale = fp8[f"{stem}.weight_scale"].float()
        # Per-tensor E4M3 scaling, computed here independently: scale = amax / 448, and each
        # element within E4M3's rounding (3 mantissa bits: half a unit, 2^-4 relative, or half
        # the smallest subnormal step).
        assert torch.isclose(scale, w.abs().max() / 448, rtol=1e-6)
        err = (fp8[k].float() * scale - w).abs()
        assert (err <= w.abs() * 2 ** -4 + scale * 2 ** -10).all(), k
        assert float(fp8[f"{stem}.input_scale"]) > 0
    for k in ref.keys() - set(linear):  # embeddings, norms, biases, lm_head stay bf16, unchanged
        assert torch.equal(fp8[k], ref[k]), k
    assert (tmp_path / "fp8" / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fp8")]  # temp dirs cleaned
