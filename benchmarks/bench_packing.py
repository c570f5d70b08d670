"""Packed vs padded micro-batches: training tokens/s of one RL step at a 10x length spread.

Samples whose lengths spread 10x (a long tail, as reasoning rollouts have) go through one RL
optimizer step (forward, backward, Adam) as padded micro-batches (one right-padded row per
sample) and as packed ones (train.pack_sequences: the samples end to end in one row) under
the same token budget. Prints real tokens/s of both, the ratio, the padding fraction and the
max |grad difference| of the two steps.

On CPU the local attention is dense over the packed row with a block-diagonal mask, so its
cost grows with the row length squared; Transformer Engine's THD attention on GPU costs
per sequence. Read a CPU ratio with that in mind.

    python -m benchmarks.bench_packing [--samples 64] [--min-tokens 64] [--max-tokens-per-sample 640]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import bench_hf_config, single_process_world, timed
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--min-tokens", type=int, default=64)
    ap.add_argument("--max-tokens-per-sample", type=int, default=640)
    ap.add_argument("--budget", type=int, default=2048, help="train.micro_batch_max_tokens")
    a = ap.parse_args()
    single_process_world()
    groups = parallel.init_distributed(ParallelConfig())
    hf = bench_hf_config()
    samples, advs = spread_batch(a.samples, a.min_tokens, a.max_tokens_per_sample, hf["vocab_size"])
    real = sum(s.num_tokens for s in samples)
    start, results = None, {}
    for pack in (False, True):
        policy = build_policy(run_config(lr=1e-5), hf, groups, total_steps=100)
        if start is None:
            start = {n: p.detach().clone() for n, p in weights.global_named_parameters(policy.chunks[0])}
        mbs, bm = rank_micro_batches(samples, advs, 0, 1, a.budget, False, seq_multiple(1), 1, pack)

        def reset() -> None:
            with torch.no_grad():
                for n, p in weights.global_named_parameters(policy.chunks[0]):
                    p.copy_(start[n])

        def step() -> None:
            reset()
            train_step(policy, mbs, response_tokens(samples), AlgoConfig(), step=0)

        reset()  # each setting's fresh policy starts from the same weights, old log-probs included
        mbs = with_old_logprobs(mbs, compute_logprobs(policy, mbs))
        step()
        grads = {n: p.main_grad.detach().clone() for n, p in weights.global_named_parameters(policy.chunks[0])}
        results[pack] = (timed(step, repeats=1), bm, grads)
    lengths = sorted(s.num_tokens for s in samples)
    print(f"{len(samples)} samples, {real:,} tokens, lengths {lengths[0]}..{lengths[-1]} "
          f"({lengths[-1] / lengths[0]:.1f}x spread), budget {a.budget} tokens per micro-batch")
    for pack, name in ((False, "padded"), (True, "packed")):
        t, bm, _ = results[pack]
        print(f"{name}: {t:.3f} s, {real / t:,.0f} tokens/s, {int(bm['batch/micro_batches'])} micro-batches, "
              f"padding {bm['batch/padding_frac']:.1%}")
    gdiff = max((results[True][2][n] - results[False][2][n]).abs().max().item() for n in start)
    print(f"tokens/s ratio packed / padded: {results[False][0] / results[True][0]:.2f}x")
    print(f"max |grad difference| packed vs padded: {gdiff:.2e}")
    parallel.destroy()


if __name__ == "__main__":
    main()
