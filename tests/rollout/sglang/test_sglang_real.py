"""The trainer against the real SGLang 0.5.23 server (`sglang.launch_server --device cpu`, fp32,
one server for the module): generation with log-probs and n > 1 checked against transformers;
full weight pushes from the trainer over a gloo weight-update group (TP=1, TP=2) and by tensor
handle (colocated), each followed by log-prob parity trainer vs engine through /generate; a
push the engine refuses is an error naming the engine and SGLang's message, not a hang; with
sglang importable, CPU tensors serialize and engine arguments are checked against SGLang's
own parser.

Release / resume of memory is not exercised on this server: SGLang 0.5.23 synchronizes the CUDA
device in /release_memory_occupation and dies without a GPU (the colocated loop's tag
tracking is tested against the CPU server in test_manager.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch

from rollout_sglang.sglang.client import SGLangClient
from testsupport import tiny
from testsupport.sglang_server import sglang_python

from tests.rollout.sglang.conftest import KEY, reset_weights
WORKER = tiny.ROOT / "tests" / "dist_workers" / "sync_worker.py"

# A real SGLang server starts in ~100 s (longer on a busy machine), inside the first test.
# One xdist worker runs the whole real-SGLang tier: never two ~3 GB servers at once.
pytestmark = [pytest.mark.timeout(1200), pytest.mark.xdist_group("real_sglang")]


@pytest.fixture(scope="module")
def model_dir(tier_model_dir):
    # The server serves seed-0 weights; the trainer pushes seed-7 weights.
    return tier_model_dir


@pytest.fixture(scope="module")
def started(real_server):
    return real_server


@pytest.fixture
def url(started, model_dir):
    """The tier's server, back at its start weights (seed 0) and version "0", so no test
    passes on what an earlier one (or the conformance module) pushed."""
    reset_weights(started.url(), model_dir, "0")
    return started.url()


def _run(tmp_path, nproc: int, url: str, args: list[str]) -> dict:
    out = tmp_path / "out.json"
    tiny.torchrun(WORKER, nproc, [*args, "--urls", url, "--out", str(out), "--api-key", KEY], timeout_s=400)
    return json.loads(out.read_text())


def _max_gap(engine: dict) -> float:
    assert len(engine["rollout"]) == len(engine["trainer"]) > 0
    return max(abs(a - b) for a, b in zip(engine["rollout"], engine["trainer"]))


def test_generate_n_samples_with_logprobs_of_the_served_model(url, model_dir):
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(model_dir).eval()
    prompts = [[5, 9, 11], [3, 4, 8, 20]]
    outs = SGLangClient(url, timeout_s=120, api_key=KEY).generate(
        prompts, {"temperature": 1.0, "max_new_tokens": 6, "ignore_eos": True, "n": 3})
    assert len(outs) == 6 and all(len(o.output_ids) == 6 and o.finish_reason == "length" for o in outs)
    assert all(o.weight_version == "0" for o in outs)
    for i, o in enumerate(outs):
        prompt = prompts[i // 3]  # row-major: the n samples of a prompt are adjacent
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + o.output_ids])).logits[0], -1)
        ref = [logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(o.output_ids)]
        assert max(abs(a - b) for a, b in zip(o.output_logprobs, ref)) < 1e-4


@pytest.mark.parametrize("nproc,args", [(1, []), (2, ["--tp", "2"])])
def test_full_push_over_gloo_then_logprob_parity(url, tmp_path, nproc, args):
    res = _run(tmp_path, nproc, url, args)
    (engine,) = res["engines"].values()
    assert res["report"]["second_failed"] is None
    assert engine["engine_version"] == "3"
    assert _max_gap(engine) < 1e-4


def test_colocated_push_by_tensor_handle_then_logprob_parity(url, tmp_path):
    res = _run(tmp_path, 1, url, ["--mode", "colocated", "--engine-tp", "1"])
    (engine,) = res["engines"].values()
    assert res["report"]["ok"] == [True]
    assert engine["engine_version"] == "3"
    assert _max_gap(engine) < 1e-4


def test_refused_update_names_the_engine_and_sglangs_message(url, tmp_path):
    client = SGLangClient(url, timeout_s=120, api_key=KEY)
    client.begin_weight_update()  # someone else's session is open: SGLang refuses ours
    try:
        t0 = time.monotonic()
        res = _run(tmp_path, 1, url, [])
        elapsed = time.monotonic() - t0
    finally:
        client.end_weight_update()
    failed = res["report"]["second_failed"]
    assert url in failed and "a weight-update session is already open" in failed
    assert elapsed < 200  # the request timeout is 120 s: the push did not wait for it
    assert client.weight_version() == "0"  # nothing was loaded


def _in_sglang_venv(code: str) -> str:
    """Run `code` with the python that has sglang (our packages and the stand-in on its path)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tiny.ROOT / "tools" / "sglang_cpu"), str(tiny.ROOT)])}
    proc = subprocess.run([sglang_python(), "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cpu_tensors_serialize_with_sglang_importable(tmp_path):
    """With sglang importable, a CPU payload must not go through SGLang's CUDA reductions
    patch (IndexError there) and must load back. In the same process (one sglang import):
    SGLang 0.5.23's own unpickler of the route (utils/common.py SafeUnpickler) is given the
    hostile payloads of test_tensor_payload.py; its exact (module, name) set refuses each
    global, so none runs its command (docs/reliability.md)."""
    marker = tmp_path / "pwned"
    out = _in_sglang_venv(
        "import io, os, torch\n"
        "from rollout_sglang.sglang.tensor_payload import serialize_named_tensors, deserialize_named_tensors\n"
        "from sglang.srt.utils.common import SafeUnpickler\n"
        "from testsupport.hostile_pickles import hostile_payloads\n"
        "t = torch.arange(6.0).reshape(2, 3)\n"
        "back = deserialize_named_tensors(serialize_named_tensors([('w', t)]))\n"
        "assert torch.equal(back[0][1], t), back\n"
        f"for kind, raw in sorted(hostile_payloads('touch {marker}').items()):\n"
        "    try:\n"
        "        got = repr(SafeUnpickler(io.BytesIO(raw)).load())\n"
        "    except Exception as exc:\n"
        "        got = type(exc).__name__ + ': ' + str(exc)\n"
        f"    print(kind, os.path.exists('{marker}'), got[:120])\n"
        "print('ok')\n")
    assert out.strip().endswith("ok")
    assert not marker.exists(), out
    lines = dict(line.split(" ", 1) for line in out.splitlines()[:-1])
    for kind in ("dotted_builtins_eval", "dotted_from_allowed_name", "dotted_module_attribute", "reduce_eval"):
        assert lines[kind].startswith("False RuntimeError: Blocked unsafe global"), (kind, lines[kind])
    assert lines["trailing_bytes"] == "False []"  # SGLang reads one pickle and ignores what follows


def test_server_args_are_checked_by_sglangs_parser_in_the_engines_python():
    """The trainer's python has no sglang: the check asks .venv-sglang's python, once."""
    import importlib.util

    from rollout_sglang.sglang.server_args import sglang_arg_names, validate_server_args

    assert importlib.util.find_spec("sglang") is None
    python = sglang_python()
    hits = sglang_arg_names.cache_info().hits
    validate_server_args({"device": "cpu", "max_total_tokens": 64, "enable_deterministic_inference": True}, python)
    with pytest.raises(ValueError, match="engine.sglang_args.max_total_token: not an argument of "
                                         "sglang.launch_server") as refused:
        validate_server_args({"max_total_token": 64}, python)
    assert "max_total_tokens" in str(refused.value).split("did you mean", 1)[1]
    with pytest.raises(ValueError, match="engine.sglang_args.not_an_arg"):
        validate_server_args({"not_an_arg": 1}, python)
    assert sglang_arg_names.cache_info().hits == hits + 2  # asked once, answered from the cache twice
