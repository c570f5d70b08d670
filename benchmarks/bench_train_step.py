"""Our RL train step vs a bare megatron-core forward/backward on the same tokens.

Prints tokens/s of both and the overhead ratio (ours / bare). The bare baseline is
megatron's own LM cross-entropy through the same schedule, no RL loss, no optimizer step; ours
is the whole RL step (log-prob + entropy from vocab-parallel logits, clipped loss with the
global token-mean, grad clip, Adam). On a GPU it also prints model TFLOP/s and MFU against
the device's bf16 peak (--peak-tflops, 989 for an H100 SXM).

    python -m benchmarks.bench_train_step [--hidden 256 --layers 4 --seq 512 --samples 16]
    python -m benchmarks.bench_train_step --preset qwen2.5-1.5b --seq 4096   # GPU
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from benchmarks.common import bench_hf_config, single_process_world, timed
from megatron_qae.model import cpu_compat, parallel
from megatron_qae.config.sections import ParallelConfig
from megatron_qae.batch.batching import rank_micro_batches, response_tokens, with_old_logprobs
from megatron_qae.config.algo import AlgoConfig
from megatron_qae.model.policy import build_policy
from megatron_qae.run.train_step import compute_logprobs, train_step
from rollout_sglang.types import Sample
from testsupport.tiny import run_config

PRESETS = {
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                         tie_word_embeddings=True, max_position_embeddings=32768),
}


def batch(samples: int, seq: int, vocab: int) -> tuple[list[Sample], list[float]]:
    g = torch.Generator().manual_seed(0)
    prompt = seq // 4
    out, adv = [], []
    for i in range(samples):
        ids = torch.randint(1, vocab, (seq,), generator=g).tolist()
        r = seq - prompt
        out.append(Sample(i // 4, tuple(ids[:prompt]), tuple(ids[prompt:]), tuple([-1.0] * r),
                          "stop", 1.0, 1.0, 0))
        adv.append(1.0 if i % 2 else -1.0)
    return out, adv


def bare_forward_backward(policy, mbs) -> None:
    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        dev = cpu_compat.default_device()
        tokens, targets = mb.tokens.to(dev), mb.targets.to(dev)
        out = model(tokens, mb.position_ids.to(dev), None, labels=targets)

        def loss_fn(mask, losses):
            return (losses.float() * mask).sum(), mask.sum().to(torch.int), {}

        return out, partial(loss_fn, mb.loss_mask.to(dev))

    for c in policy.chunks:
        c.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(mbs),
                                model=policy.chunks[0], num_microbatches=len(mbs),
                                seq_length=mbs[0].tokens.shape[1], micro_batch_size=1,
                                forward_only=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    a = ap.parse_args()
    single_process_world()
    groups = parallel.init_distributed(ParallelConfig())
    hf = bench_hf_config(a.hidden, a.layers)
    if a.preset:
        hf.update(PRESETS[a.preset])
    cfg = run_config(lr=1e-6)
    if cpu_compat.cuda_available():
        cfg.model.params_dtype = "bfloat16"
    policy = build_policy(cfg, hf, groups, total_steps=100)
    samples, adv = batch(a.samples, a.seq, hf["vocab_size"])
    mbs, bm = rank_micro_batches(samples, adv, 0, 1, a.max_tokens)
    mbs = with_old_logprobs(mbs, compute_logprobs(policy, mbs))
    tokens = sum(mb.tokens.numel() for mb in mbs)
    t_bare = timed(lambda: bare_forward_backward(policy, mbs))
    t_ours = timed(lambda: train_step(policy, mbs, response_tokens(samples), AlgoConfig(), 0))
    params = sum(p.numel() for p in policy.chunks[0].parameters())
    flops = 6 * params * tokens + 12 * hf["num_hidden_layers"] * hf["hidden_size"] * a.seq * tokens
    print(f"model: {params / 1e6:.1f}M params, {tokens} tokens/step in {len(mbs)} micro-batches "
          f"(padding {bm['batch/padding_frac']:.3f}), device {cpu_compat.default_device()}")
    print(f"bare megatron fwd/bwd: {t_bare:.3f} s  ({tokens / t_bare:,.0f} tokens/s)")
    print(f"our RL train step:     {t_ours:.3f} s  ({tokens / t_ours:,.0f} tokens/s)")
    print(f"overhead ratio (ours / bare): {t_ours / t_bare:.3f}")
    if cpu_compat.cuda_available():
        tflops = flops / t_ours / 1e12
        print(f"model TFLOP/s: {tflops:.1f}   MFU: {tflops / a.peak_tflops:.3f} (peak {a.peak_tflops})")
    parallel.destroy()


if __name__ == "__main__":
    main()
