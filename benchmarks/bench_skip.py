"""Skip zero-advantage samples: one RL optimizer step with skipping on vs off.

Prints the wall-time ratio (off / on) of the train step on a batch whose advantages follow a
realistic QAE pattern (K=0.4, G=16, per-prompt success rates spread like a reasoning run's,
about 80% zero), and the max |param difference| between the two updates (must be ~0).

    python -m benchmarks.bench_skip [--groups 8] [--response-tokens 192]
"""

from __future__ import annotations

import argparse
import torch

from benchmarks.common import bench_hf_config, single_process_world, timed
from megatron_qae.model import parallel, weights
from megatron_qae.config.sections import ParallelConfig
from megatron_qae.algorithm.advantage import compute_group_advantages
from megatron_qae.batch.batching import empty_micro_batch, rank_micro_batches, response_tokens, with_old_logprobs
from megatron_qae.config.algo import AlgoConfig
from megatron_qae.model.policy import build_policy
from megatron_qae.run.train_step import compute_logprobs, train_step
from rollout_sglang.types import Sample
from testsupport.tiny import run_config


def qae_batch(groups: int, n: int, prompt: int, response: int, vocab: int, seed: int = 0):
    """Binary-reward groups with mixed accuracy (after dynamic sampling), success rates near 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # Beta sampling draws from the global generator
    samples = []
    gid = 0
    while gid < groups:
        rate = float(torch.distributions.Beta(0.3, 0.3).sample())
        oks = [bool(torch.rand(1, generator=g) < rate) for _ in range(n)]
        if len(set(oks)) == 1:
            continue  # DAPO dynamic sampling keeps only groups with mixed accuracy
        for ok in oks:
            r = int(torch.randint(response // 2, response + 1, (1,), generator=g))
            ids = torch.randint(1, vocab, (prompt + r,), generator=g).tolist()
            samples.append(Sample(gid, tuple(ids[:prompt]), tuple(ids[prompt:]), tuple([-1.0] * r),
                                  "stop", 1.0 if ok else -1.0, float(ok), 0))
        gid += 1
    scores = torch.tensor([s.reward for s in samples])
    ids = torch.tensor([s.group_id for s in samples])
    adv, metrics = compute_group_advantages(scores, ids, quantile_k=0.4)
    return samples, adv.tolist(), metrics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--response-tokens", type=int, default=192)
    ap.add_argument("--max-tokens", type=int, default=2048)
    a = ap.parse_args()
    single_process_world()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    groups = parallel.init_distributed(ParallelConfig())
    hf = bench_hf_config()
    start = None
    samples, adv, adv_metrics = qae_batch(a.groups, a.n, 64, a.response_tokens, hf["vocab_size"])
    tokens = response_tokens(samples)
    results = {}
    for skip in (False, True):
        # A fresh policy per setting, so both see the same optimizer-state history.
        policy = build_policy(run_config(lr=1e-5), hf, groups, total_steps=100)
        if start is None:
            start = {n: p.detach().clone() for n, p in weights.global_named_parameters(policy.chunks[0])}
        mbs, bm = rank_micro_batches(samples, adv, 0, 1, a.max_tokens, skip)
        mbs = mbs or [empty_micro_batch()]

        def reset() -> None:
            with torch.no_grad():
                for n, p in weights.global_named_parameters(policy.chunks[0]):
                    p.copy_(start[n])

        def step() -> None:
            reset()
            train_step(policy, mbs, tokens, AlgoConfig(), step=0)

        reset()
        mbs = with_old_logprobs(mbs, compute_logprobs(policy, mbs))

        # The compared update is the first step from a fresh optimizer state; timing after it.
        step()
        results[(skip, "params")] = {n: p.detach().clone() for n, p in weights.global_named_parameters(policy.chunks[0])}
        results[(skip, "grads")] = {n: p.main_grad.detach().clone() for n, p in weights.global_named_parameters(policy.chunks[0])}
        results[(skip, "bm")] = bm
        results[skip] = timed(step, repeats=2)
    diff = max((results[(True, "params")][n] - results[(False, "params")][n]).abs().max().item() for n in start)
    gdiff = max((results[(True, "grads")][n] - results[(False, "grads")][n]).abs().max().item() for n in start)
    gmax = max(results[(False, "grads")][n].abs().max().item() for n in start)
    update = max((results[(False, "params")][n] - start[n]).abs().max().item() for n in start)
    print(f"zero-advantage fraction: {adv_metrics['adv/zero_frac']:.3f} "
          f"(skipped samples {results[(True, 'bm')]['batch/skipped_samples_frac']:.3f})")
    print(f"train step, skip off: {results[False]:.3f} s   skip on: {results[True]:.3f} s")
    print(f"speed-up ratio (off / on): {results[False] / results[True]:.2f}x")
    print(f"max |grad difference|: {gdiff:.3e} (largest |grad| {gmax:.3e})")
    print(f"max |param difference| after the step: {diff:.3e} (largest update {update:.3e})")
    parallel.destroy()


if __name__ == "__main__":
    main()
