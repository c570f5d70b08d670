"""torchrun worker for checkpoints.

--mode save: one RL step under the given layout, save step 1, write the full params; then
  (with --kill-during-save) start saving step 2 and SIGKILL itself after the files are written
  but before the rename, as a crash mid-save would.
  With --save-step2, step 2 is saved normally after its loss is taken (two checkpoints).
--mode load: resume as the loop does (the newest intact checkpoint, --on-damaged decides what a
  damaged one does) under the given layout, write the full params and the loss of one more step
  on the same batch.
Several jobs in one launch with testsupport.jobs.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_qae.persistence import checkpoint  # noqa: E402

from megatron_qae.model import parallel, weights  # noqa: E402
from megatron_qae.config.sections import ParallelConfig  # noqa: E402
from megatron_qae.batch.batching import rank_micro_batches, response_tokens, with_old_logprobs  # noqa: E402
from megatron_qae.config.algo import AlgoConfig  # noqa: E402
from megatron_qae.model.policy import build_policy  # noqa: E402
from megatron_qae.run.train_step import compute_logprobs, train_step  # noqa: E402
from testsupport import tiny  # noqa: E402
from testsupport.jobs import run_jobs  # noqa: E402


def step(policy, groups, k: int) -> float:
    samples, advs = tiny.synthetic_samples(seed=k)
    mbs, _ = rank_micro_batches(samples, advs, groups.dp_rank, groups.dims.dp, 64)
    mbs = with_old_logprobs(mbs, compute_logprobs(policy, mbs))
    return train_step(policy, mbs, response_tokens(samples), AlgoConfig(), k)["loss/loss"]


def compare_save_formats(policy, out: Path) -> dict[str, int]:
    """Peak bytes torch's allocator held beyond the start of a save, per optimizer format."""
    from testsupport.measure import peak_allocated_bytes

    peaks = {}
    for fmt in ("dp_reshardable", "fully_reshardable"):
        peaks[fmt] = peak_allocated_bytes(lambda: checkpoint.save_checkpoint(
            out / f"scratch_{fmt}", 1, policy, {"step": 1}, optimizer_format=fmt))
    return peaks


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["save", "load"], required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dist-opt", action="store_true")
    ap.add_argument("--kill-during-save", action="store_true")
    ap.add_argument("--save-step2", action="store_true")
    ap.add_argument("--on-damaged", choices=["fallback", "fail"], default="fallback")
    ap.add_argument("--optimizer-format", default="dp_reshardable", choices=["dp_reshardable", "fully_reshardable"])
    ap.add_argument("--compare-save-formats", action="store_true",
                    help="also save step 1 in each format to scratch directories, recording each save's peak bytes")
    ap.add_argument("--run-dir", required=True)
    a = ap.parse_args(argv)
    groups = parallel.init_distributed(ParallelConfig(tp=a.tp, pp=a.pp))
    hf = tiny.tiny_hf_config()
    policy = build_policy(tiny.run_config(a.tp, a.pp, a.dist_opt, lr=1e-2), hf, groups, total_steps=10)
    out = Path(a.run_dir)
    if a.mode == "save":
        weights.load_hf_state(policy, tiny.tiny_hf_model(hf).state_dict())
        for k in range(3):  # several optimizer steps, so Adam's step count matters after a resume
            step(policy, groups, 1)
        checkpoint.save_checkpoint(out, 1, policy, {"step": 1, "cursor": [3, 4]}, optimizer_format=a.optimizer_format)
        save_peaks = compare_save_formats(policy, out) if a.compare_save_formats else {}
        params = {k: v.clone() for k, v in weights.iter_full_params(policy.chunks, groups.tp)}
        loss2 = step(policy, groups, 2)
        if a.save_step2:
            checkpoint.save_checkpoint(out, 2, policy, {"step": 2, "cursor": [5, 6]})
        loss3 = step(policy, groups, 3)  # depends on the Adam state carried over from step 2
        if groups.tp_rank == 0 and groups.dp_rank == 0:  # one writer per pipeline stage
            torch.save({"params": params, "loss2": loss2, "loss3": loss3, "save_peaks": save_peaks,
                        "local_params": sum(p.numel() for c in policy.chunks for p in c.parameters())},
                       out / f"saved.pp{groups.pp_rank}.pt")
        if a.kill_during_save:
            real_replace = os.replace

            def crash(src, dst):
                if "step_2" in str(dst):
                    os.killpg(os.getpgrp(), signal.SIGKILL)  # the whole run, as a node loss would
                real_replace(src, dst)

            os.replace = crash
            checkpoint.save_checkpoint(out, 2, policy, {"step": 2})
    else:
        path, state = checkpoint.load_latest(out, policy, a.on_damaged)
        params = {k: v.clone() for k, v in weights.iter_full_params(policy.chunks, groups.tp)}
        loss2 = step(policy, groups, 2)
        loss3 = step(policy, groups, 3)
        if dist.get_rank() == 0:
            torch.save({"params": params, "loss2": loss2, "loss3": loss3, "state": state, "path": str(path)},
                       out / f"loaded.pp{groups.pp_rank}.pt")


if __name__ == "__main__":
    run_jobs(main)
