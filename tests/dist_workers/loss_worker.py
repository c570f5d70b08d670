"""torchrun worker: one forward/backward of each loss variant on a tiny Qwen2, per layout.

For every variant (policy loss + KL / entropy terms) and every micro-batch token budget, builds
the policy and its frozen reference, attaches old and reference log-probs (each offset by its
own deterministic noise so ratios and KL differ from their trivial values), runs
`forward_backward` and writes the full-named gradients and loss metrics, so the test can
compare micro-batch counts, DP and TP layouts, and zero-advantage skipping.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_qae.algorithm.objective import zero_advantage_gradient  # noqa: E402
from megatron_qae.config.algo import AlgoConfig  # noqa: E402
from megatron_qae.model import parallel, weights  # noqa: E402
from megatron_qae.config.sections import ParallelConfig  # noqa: E402
from megatron_qae.model.policy import build_policy  # noqa: E402
from megatron_qae.model.reference import build_reference  # noqa: E402
from megatron_qae.batch.batching import (rank_micro_batches, response_tokens, seq_multiple,  # noqa: E402
                                       with_old_logprobs, with_ref_logprobs)
from megatron_qae.run.train_step import compute_logprobs, forward_backward  # noqa: E402
from testsupport import tiny  # noqa: E402
from testsupport.jobs import run_jobs  # noqa: E402
from tests.dist_workers.train_worker import gather_full_grads  # noqa: E402

VARIANTS = {
    "dapo_kl_entropy": AlgoConfig(kl_coef=0.5, kl_estimator="k3", entropy_coef=0.05),
    "gspo": AlgoConfig(policy_loss="gspo", gspo_clip_low=0.05, gspo_clip_high=0.08),
    "gspo_kl_k2": AlgoConfig(policy_loss="gspo", gspo_clip_low=0.05, gspo_clip_high=0.08, kl_coef=0.3,
                             kl_estimator="k2"),
    "clip_cov": AlgoConfig(policy_loss="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=0.005, clip_cov_ub=5.0),
    "kl_cov": AlgoConfig(policy_loss="kl_cov", kl_cov_ratio=0.2, kl_cov_coef=2.0),
}
SEEDS = {"clip_cov": 3}
"""run.seed of a variant (Clip-Cov's draw); 0 for the others."""


def ref_noise(mb) -> torch.Tensor:
    """A second deterministic offset (the reference differs from the old policy)."""
    return torch.cos(tiny.old_logprob_noise(mb) * 5.0) * 0.3 * mb.loss_mask


def run_once(a, groups, hf, cfg, algo: AlgoConfig, budget: int, seed: int) -> dict:
    policy = build_policy(cfg, hf, groups, total_steps=10)
    weights.load_hf_state(policy, tiny.tiny_hf_model(hf).state_dict())
    reference = build_reference(policy, "local", None)
    samples, advs = tiny.synthetic_samples()
    skip = a.skip_zero and zero_advantage_gradient(algo) is None
    mbs, batch_metrics = rank_micro_batches(samples, advs, groups.dp_rank, groups.dims.dp, budget, skip,
                                            seq_multiple(a.tp))
    old = compute_logprobs(policy, mbs)
    ref = compute_logprobs(reference, mbs)
    same_as_policy = all(r is None or torch.equal(r, o) for r, o in zip(ref, old))
    last = groups.is_last_stage
    mbs = with_old_logprobs(mbs, [o + tiny.old_logprob_noise(mb) if last else None for mb, o in zip(mbs, old)])
    mbs = with_ref_logprobs(mbs, [r + ref_noise(mb) if last else None for mb, r in zip(mbs, ref)])
    metrics = forward_backward(policy, mbs, response_tokens(samples), algo, global_samples=len(samples), step=7,
                               seed=seed)
    return {"metrics": metrics, "grads": gather_full_grads(policy, groups), "micro_batches": len(mbs),
            "batch": batch_metrics, "reference_equals_initial_policy": same_as_policy}


def reference_from_hf(a, groups, hf, cfg) -> dict:
    """The reference built from an HF directory equals the policy loaded from it, while the
    policy itself keeps its own weights until it loads them (as on a resume, which loads a
    checkpoint into the policy only)."""
    policy = build_policy(cfg, hf, groups, total_steps=10)
    reference = build_reference(policy, "local", a.hf_dir)
    samples, advs = tiny.synthetic_samples()
    mbs, _ = rank_micro_batches(samples, advs, groups.dp_rank, groups.dims.dp, 1000, False, seq_multiple(a.tp))
    before = compute_logprobs(policy, mbs)
    ref = compute_logprobs(reference, mbs)
    assert weights.load_hf_dir(policy, a.hf_dir)
    after = compute_logprobs(policy, mbs)
    return {"before": before, "ref": ref, "after": after,
            "ref_grads": any(p.requires_grad for c in reference.chunks for p in c.parameters())}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[64])
    ap.add_argument("--skip-zero", action="store_true", help="skip zero-advantage samples where exact")
    ap.add_argument("--hf-dir", default=None, help="check the reference built from this HF directory instead")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    groups = parallel.init_distributed(ParallelConfig(tp=a.tp))
    hf = tiny.tiny_hf_config()
    cfg = tiny.run_config(a.tp, 1)
    if a.hf_dir:
        result = reference_from_hf(a, groups, hf, cfg)
        if groups.dp_rank == 0 and groups.tp_rank == 0:
            torch.save(result, f"{a.out}.hf.pt")
        return
    for name in a.variants:
        for budget in a.max_tokens:
            result = run_once(a, groups, hf, cfg, VARIANTS[name], budget, SEEDS.get(name, 0))
            if groups.dp_rank == 0 and groups.tp_rank == 0:
                torch.save(result, f"{a.out}.{name}.mt{budget}.pt")


if __name__ == "__main__":
    run_jobs(main)
