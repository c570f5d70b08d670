"""torchrun worker: one RL forward/backward + Adam step of a tiny Qwen2 under a given layout
(several layouts in one launch with testsupport.jobs).

Writes, per rank, the layout-independent results (full-named grads, params after the step,
loss metrics) so the test can compare layouts against TP=PP=DP=1.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_qae.persistence import checkpoint  # noqa: E402

from megatron_qae.model import parallel, weights  # noqa: E402
from megatron_qae.config.sections import ParallelConfig  # noqa: E402
from megatron_qae.batch.batching import (rank_micro_batches, response_tokens, schedule_multiple,  # noqa: E402
                                  seq_multiple, with_old_logprobs)
from megatron_qae.config.algo import AlgoConfig  # noqa: E402
from megatron_qae.model.policy import build_policy, finish_param_sync  # noqa: E402
from megatron_qae.run.train_step import compute_logprobs, forward_backward, logprob_gap, train_step  # noqa: E402
from testsupport import tiny  # noqa: E402
from testsupport.jobs import run_jobs  # noqa: E402


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-multiple", type=int, default=None, help="default: the loop's seq_multiple(tp)")
    ap.add_argument("--dist-opt", action="store_true")
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[64])
    ap.add_argument("--learn-steps", type=int, default=0)
    ap.add_argument("--mini-steps", type=int, default=0,
                    help="optimizer steps on one rollout's old log-probs; writes params and metrics of each")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--chunk-tokens", type=int, default=4096, help="train.logprob_chunk_tokens")
    ap.add_argument("--overlap", action="store_true", help="overlap_grad_reduce + overlap_param_gather")
    ap.add_argument("--bucket-size", type=int, default=None, help="DDP bucket size (parameters)")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 params (fp32 main params in the optimizer)")
    ap.add_argument("--hf-dir", default=None, help="load weights from this HF safetensors directory")
    ap.add_argument("--ckpt-dir", default=None, help="load weights from this run dir's (model-only) checkpoint")
    ap.add_argument("--skip-zero", action="store_true")
    ap.add_argument("--pack", action="store_true", help="packed micro-batches (train.pack_sequences)")
    ap.add_argument("--offload", action="store_true",
                    help="with --mini-steps: offload grad buffers + optimizer state between steps and restore")
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--policy-loss", default="dapo", help="algo.policy_loss of the forward/backward")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    groups = parallel.init_distributed(ParallelConfig(tp=a.tp, pp=a.pp))
    hf = tiny.tiny_hf_config(tied=a.tied, layers=a.layers)
    cfg = tiny.run_config(a.tp, a.pp, a.dist_opt, lr=a.lr)
    if a.overlap:  # names a field build_policy sets itself: the override must win
        cfg.parallel.ddp_overrides = {"overlap_grad_reduce": True, "overlap_param_gather": True}
    if a.bucket_size:
        cfg.parallel.ddp_overrides = {**cfg.parallel.ddp_overrides, "bucket_size": a.bucket_size}
    if a.bf16:
        cfg.model.params_dtype = "bfloat16"
    for budget in a.max_tokens:
        result = run_once(a, groups, hf, cfg, budget)
        if groups.dp_rank == 0 and groups.tp_rank == 0:
            torch.save(result, f"{a.out}.mt{budget}.pp{groups.pp_rank}.pt")


def run_once(a, groups, hf, cfg, budget: int) -> dict:
    policy = build_policy(cfg, hf, groups, total_steps=10)
    if a.ckpt_dir:
        checkpoint.load_checkpoint(checkpoint.latest_checkpoint(a.ckpt_dir), policy)
    elif a.hf_dir:
        assert weights.load_hf_dir(policy, a.hf_dir)
    else:
        weights.load_hf_state(policy, tiny.tiny_hf_model(hf).state_dict())
    samples, advs = tiny.synthetic_samples()
    multiple = a.seq_multiple or seq_multiple(a.tp)
    mbs, batch_metrics = rank_micro_batches(samples, advs, groups.dp_rank, groups.dims.dp, budget, a.skip_zero,
                                            multiple, schedule_multiple(a.pp, None), pack=a.pack)
    before = compute_logprobs(policy, mbs, chunk_tokens=a.chunk_tokens)
    if a.learn_steps:
        mbs = with_old_logprobs(mbs, before)
        for step in range(a.learn_steps):
            train_step(policy, mbs, response_tokens(samples), AlgoConfig(), step)
        return {"before": before, "after": compute_logprobs(policy, mbs), "mbs": mbs}
    if a.mini_steps:
        return mini_steps(a, policy, groups, with_old_logprobs(mbs, before), samples)
    # Only the last pipeline stage has log-probs (None elsewhere).
    noisy = [lp + tiny.old_logprob_noise(mb) if lp is not None else None for mb, lp in zip(mbs, before)]
    mbs = with_old_logprobs(mbs, noisy)
    metrics = forward_backward(policy, mbs, response_tokens(samples), AlgoConfig(policy_loss=a.policy_loss),
                               chunk_tokens=a.chunk_tokens, global_samples=len(samples))
    grads = {} if a.dist_opt else gather_full_grads(policy, groups)
    ok, grad_norm, _ = policy.optimizer.step()
    finish_param_sync(policy)
    params = dict(weights.iter_full_params(policy.chunks, groups.tp))
    return {"metrics": metrics, "grads": grads, "params": params, "grad_norm": grad_norm,
            "micro_batches": len(mbs), "batch": batch_metrics, "logprobs": per_sample_logprobs(mbs, before, samples)}


def per_sample_logprobs(mbs, lps, samples) -> dict:
    """Each sample's response log-probs [r], whatever the micro-batch layout (padded rows or
    one packed row, where the samples' response positions follow in sample_index order)."""
    out = {}
    for mb, lp in zip(mbs, lps):
        if lp is None:
            continue
        if mb.cu_seqlens is None:
            for row, i in enumerate(mb.sample_index):
                out[i] = lp[row][mb.loss_mask[row].bool()]
        else:
            flat = lp[0][mb.loss_mask[0].bool()]
            parts = flat.split([len(samples[i].response_ids) for i in mb.sample_index])
            out.update(zip(mb.sample_index, parts))
    return out


def mini_steps(a, policy, groups, mbs, samples) -> dict:
    """Several optimizer steps against one rollout's old log-probs, as the mini-batches of a
    rollout step take them: params before each step and the step's metrics."""
    history = []
    gap = logprob_gap(policy, mbs)
    for k in range(a.mini_steps):
        # Reading params between steps would force the param all-gather that --overlap
        # leaves to the next forward; with --overlap only the steps' metrics are kept.
        params = None if a.overlap else {n: t.clone() for n, t in weights.iter_full_params(policy.chunks, groups.tp)}
        metrics = train_step(policy, mbs, response_tokens(samples), AlgoConfig(), k, chunk_tokens=a.chunk_tokens)
        history.append({"params": params, "metrics": metrics,
                        "offload": offload_round_trip(policy) if a.offload else None})
    finish_param_sync(policy)
    return {"history": history, "gap": gap, "micro_batches": len(mbs),
            "params": dict(weights.iter_full_params(policy.chunks, groups.tp)), "grads": {}, "metrics": {}}


def offload_round_trip(policy) -> dict:
    """Offload, look at what is held during the window (as generation would see it), restore.
    The bytes expected are counted here from the optimizer and buffers, not by offload.py."""
    from megatron_qae.model.offload import HostArena, offload_train_state, restore_train_state

    grad_buffers = [b.grad_data for c in policy.chunks for b in c.buffers if b.grad_data is not None]
    inner = [o.optimizer for o in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])]
    moments = [v for o in inner for st in o.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    model = {p.untyped_storage().data_ptr() for c in policy.chunks for p in c.parameters()}
    mains = [p for o in inner for g in o.param_groups for p in g["params"]
             if p.untyped_storage().data_ptr() not in model]
    expected = {"grad": sum(t.untyped_storage().nbytes() for t in grad_buffers),
                "moments": sum(t.numel() * t.element_size() for t in moments),
                "mains": sum(t.numel() * t.element_size() for t in mains)}
    arena = _ARENA.setdefault("arena", HostArena())  # one per run, as Colocated keeps it
    before = [_bytes(t) for t in _offloadable(inner, model)]
    state = offload_train_state(policy, arena)
    host = [h for _, h in state.tensors]
    window = {"grad_storage": sum(t.untyped_storage().nbytes() for t in grad_buffers),
              "moment_storage": sum(t.untyped_storage().nbytes() for t in moments),
              "main_storage": sum(t.untyped_storage().nbytes() for t in mains),
              "model_storage": sum(p.untyped_storage().nbytes() for c in policy.chunks for p in c.parameters()),
              "grad_bytes": state.grad_buffer_bytes, "optimizer_bytes": state.optimizer_bytes}
    restore_train_state(policy, state)
    after = [_bytes(t) for t in _offloadable(inner, model)]
    return {"expected": expected, "window": window, "moments": len(moments), "mains": len(mains),
            "host_storages": sorted({h.untyped_storage().data_ptr() for h in host}),
            "host_ptrs": [h.data_ptr() for h in host],
            "restored_bit_exact": len(before) == len(after) > 0 and all(torch.equal(a, b) for a, b in zip(before, after))}


_ARENA: dict = {}


def _offloadable(inner, model_ptrs: set) -> list[torch.Tensor]:
    """The Adam moments and the main params that are not the model's, in a fixed order."""
    out = [v for o in inner for st in o.state.values() for k, v in sorted(st.items()) if k in ("exp_avg", "exp_avg_sq")]
    return out + [p for o in inner for g in o.param_groups for p in g["params"]
                  if p.untyped_storage().data_ptr() not in model_ptrs]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8).clone()


def gather_full_grads(policy, groups) -> dict:
    from megatron_qae.model import qwen2_mapping as qm
    out = {}
    for chunk in policy.chunks:
        for name, p in weights.global_named_parameters(chunk):
            g = p.main_grad.detach().clone()
            if groups.dims.tp > 1 and qm.tp_dim(name) is not None:
                shards = [torch.empty_like(g) for _ in range(groups.dims.tp)]
                dist.all_gather(shards, g.contiguous(), group=groups.tp)
                g = qm.tp_merge(name, shards)
            out[name] = g
    return out


if __name__ == "__main__":
    run_jobs(main)
