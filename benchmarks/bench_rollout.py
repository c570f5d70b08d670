"""Rollout tokens/s of the CPU rollout server vs calling the model's own generate.

Same model, same prompts, same number of new tokens (min_new_tokens = max_new_tokens so both
generate exactly the same count). The server path includes HTTP, batching, sampling and
per-token log-probs. Prints both rates and the ratio (server / generate).

    python -m benchmarks.bench_rollout [--prompts 16 --new-tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import bench_hf_config
from testsupport.cpu_server import CpuServer, write_model_dir
from rollout_sglang.sglang.client import SGLangClient


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    hf = bench_hf_config(256, 4)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, hf["vocab_size"], (a.prompts, a.prompt_tokens), generator=g)
    total_new = a.prompts * a.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "m", hf)
        from transformers import Qwen2ForCausalLM

        model = Qwen2ForCausalLM.from_pretrained(model_dir).eval()
        with torch.no_grad():
            model.generate(prompts[:2], max_new_tokens=4, do_sample=True)
            t0 = time.perf_counter()
            model.generate(prompts, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                           do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
            t_direct = time.perf_counter() - t0
        with CpuServer(model_dir, threads=a.threads) as url:
            client = SGLangClient(url, timeout_s=600.0)
            params = {"temperature": 1.0, "max_new_tokens": a.new_tokens,
                      "min_new_tokens": a.new_tokens}
            client.generate(prompts[:2].tolist(), {**params, "max_new_tokens": 4})
            t0 = time.perf_counter()
            outs = client.generate(prompts.tolist(), params, return_logprob=True)
            t_server = time.perf_counter() - t0
    got = sum(len(o.output_ids) for o in outs)
    print(f"model.generate: {total_new / t_direct:,.0f} new tokens/s ({t_direct:.2f} s)")
    print(f"rollout server: {got / t_server:,.0f} new tokens/s ({t_server:.2f} s, {got} tokens, with log-probs)")
    print(f"ratio (server / generate): {(got / t_server) / (total_new / t_direct):.3f}")


if __name__ == "__main__":
    main()
