"""Packed vs padded micro-batches: training tokens/s of one RL step at a 10x length spread.

Samples whose lengths spread 10x (a long tail, as reasoning rollouts have) go through one RL
optimizer step (forward, backward, Adam) as padded micro-batches (one right-padded row per
sample) and as packed ones (train.pack_sequences: the samples end to end in one row) under
the same token budget. The two settings' steps are timed interleaved, `--repeats` times each
after a warm-up; prints real tokens/s of both (min and median), the ratio of the medians, the
padding fraction and the max |grad difference| of the two steps.

Packed attention runs per sequence on CPU too (model/packed_attention.py: length buckets, one
causal batch each), as Transformer Engine's THD attention does on GPU. `--model demo` takes
the CPU demo's model (2 layers, 64 wide) instead of the 4-layer 256-wide bench model, for the
demo's shape: 64 samples of ~45-token answers.

    python -m benchmarks.bench_packing [--samples 32] [--min-tokens 48] [--max-tokens-per-sample 480]
    python -m benchmarks.bench_packing --model demo --samples 64 --min-tokens 50 --max-tokens-per-sample 64 --prompt-tokens 12
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import bench_hf_config, single_process_world
from megatron_qae.config.algo import AlgoConfig
from megatron_qae.model import parallel, weights
from megatron_qae.config.sections import ParallelConfig
from megatron_qae.model.policy import build_policy
from megatron_qae.batch.batching import rank_micro_batches, response_tokens, seq_multiple, with_old_logprobs
from megatron_qae.run.train_step import compute_logprobs, train_step
from rollout_sglang.types import Sample
from testsupport.tiny import run_config


def spread_batch(n: int, shortest: int, longest: int, vocab: int, prompt: int = 32, seed: int = 0):
    """`n` samples whose lengths spread from `shortest` to `longest` tokens (log-uniform, so a
    long tail), advantages +-1 (none zero: every sample is trained)."""
    g = torch.Generator().manual_seed(seed)
    samples, advs = [], []
    for i in range(n):
        u = float(torch.rand(1, generator=g))
        total = int(shortest * (longest / shortest) ** u)
        ids = torch.randint(1, vocab, (total,), generator=g).tolist()
        samples.append(Sample(i // 16, tuple(ids[:prompt]), tuple(ids[prompt:]), tuple([-1.0] * (total - prompt)),
                              "stop", 1.0, 1.0, 0))
        advs.append(1.0 if i % 2 else -1.0)
    return samples, advs


def demo_hf_config() -> dict:
    """The CPU demo's model config (rollout_sglang.demo_task), read back from the directory it writes."""
    import json
    import tempfile

    from rollout_sglang.demo_task import write_demo_model_dir

    with tempfile.TemporaryDirectory() as d:
        return json.loads((write_demo_model_dir(d) / "config.json").read_text())


def setting(samples, advs, groups, hf, budget: int, pack: bool, start: dict | None):
    """A fresh policy at `start`'s weights (its own when None), the micro-batches with their
    old log-probs, and the step to time."""
    policy = build_policy(run_config(lr=1e-5), hf, groups, total_steps=100)
    named = dict(weights.global_named_parameters(policy.chunks[0]))
    start = start or {n: p.detach().clone() for n, p in named.items()}
    mbs, bm = rank_micro_batches(samples, advs, 0, 1, budget, False, seq_multiple(1), 1, pack)

    def reset() -> None:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(start[n])

    reset()  # each setting's policy starts from the same weights, old log-probs included
    mbs = with_old_logprobs(mbs, compute_logprobs(policy, mbs))

    def step() -> None:
        reset()
        train_step(policy, mbs, response_tokens(samples), AlgoConfig(), step=0)

    step()  # warm-up, and the gradients compared below
    grads = {n: p.main_grad.detach().clone() for n, p in named.items()}
    return step, bm, grads, start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--min-tokens", type=int, default=48)
    ap.add_argument("--max-tokens-per-sample", type=int, default=480)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--budget", type=int, default=1024, help="train.micro_batch_max_tokens")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per setting, interleaved")
    ap.add_argument("--model", choices=["bench", "demo"], default="bench")
    a = ap.parse_args()
    single_process_world()
    groups = parallel.init_distributed(ParallelConfig())
    hf = bench_hf_config() if a.model == "bench" else demo_hf_config()
    samples, advs = spread_batch(a.samples, a.min_tokens, a.max_tokens_per_sample, hf["vocab_size"], a.prompt_tokens)
    real = sum(s.num_tokens for s in samples)
    step_pad, bm_pad, grads_pad, start = setting(samples, advs, groups, hf, a.budget, False, None)
    step_pack, bm_pack, grads_pack, _ = setting(samples, advs, groups, hf, a.budget, True, start)
    # Wall time, and the process's CPU time: on a machine shared with other jobs the second
    # counts this step's own work, not the time it waited for a core.
    times: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(a.repeats):
        for pack, step in ((False, step_pad), (True, step_pack)):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times[pack].append(time.perf_counter() - t0)
            cpu[pack].append(time.process_time() - c0)
    lengths = sorted(s.num_tokens for s in samples)
    print(f"{a.model} model, {len(samples)} samples, {real:,} tokens, lengths {lengths[0]}..{lengths[-1]} "
          f"({lengths[-1] / lengths[0]:.1f}x spread), budget {a.budget} tokens per micro-batch, "
          f"{a.repeats} interleaved repeats")
    for pack, name, bm in ((False, "padded", bm_pad), (True, "packed", bm_pack)):
        t = sorted(times[pack])
        print(f"{name}: wall min {t[0]:.3f} s / median {statistics.median(t):.3f} s, "
              f"{real / statistics.median(t):,.0f} tokens/s (median); CPU median {statistics.median(cpu[pack]):.3f} s; "
              f"{int(bm['batch/micro_batches'])} micro-batches, padding {bm['batch/padding_frac']:.1%}")
    gdiff = max((grads_pack[n] - grads_pad[n]).abs().max().item() for n in start)
    ratio = statistics.median(times[False]) / statistics.median(times[True])
    print(f"tokens/s ratio packed / padded: {ratio:.2f}x (median wall), "
          f"{min(times[False]) / min(times[True]):.2f}x (min wall), "
          f"{statistics.median(cpu[False]) / statistics.median(cpu[True]):.2f}x (median CPU time)")
    print(f"max |grad difference| packed vs padded: {gdiff:.2e}")
    parallel.destroy()


if __name__ == "__main__":
    main()
