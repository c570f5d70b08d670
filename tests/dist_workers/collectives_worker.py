"""torchrun worker: the process-group rules of a GPU run, on CPU.

--mode groups: the accelerator backend is a CUDA-only stand-in (gloo registered for the
  `cuda` device type only, as NCCL is), so any collective that hands a CPU tensor to a group
  without a CPU backend raises exactly as it would on GPU. Runs the loop's advantage and
  train steps (advantage gathers, old log-probs, megatron's DDP and distributed optimizer,
  metric and token-count reductions) and the hand-off broadcast.
--mode wait: a test-sized collective timeout; rank 0 "rolls out" (sleeps) for longer than it
  before handing its batch over. With --control, the others wait on the default group
  instead of the hand-off group (what the loop did before), which must time out.
"""

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_qae.batch import batching, shard as sh  # noqa: E402

from megatron_qae.run import loop  # noqa: E402

from megatron_qae.model import parallel  # noqa: E402
from megatron_qae.config.sections import ParallelConfig  # noqa: E402
from megatron_qae.config.loading import load_config  # noqa: E402
from megatron_qae.model.policy import build_policy  # noqa: E402
from testsupport import tiny  # noqa: E402

CUDA_ONLY = "cudaonlygloo"


def _cuda_only_backend(store, rank: int, size: int, timeout: datetime.timedelta):
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def groups_mode(a) -> dict:
    dist.Backend.register_backend(CUDA_ONLY, _cuda_only_backend, devices=["cuda"])
    groups = parallel.init_distributed(ParallelConfig(pp=a.pp),
                                       accelerator_backend=CUDA_ONLY)
    cfg = load_config(None, ["rollout.n_samples_per_prompt=4", "rollout.prompts_per_step=3",
                             "rollout.mini_batch_prompts=1", "train.micro_batch_max_tokens=64",
                             "model.transformer_impl=local", "optim.lr=1e-2", "optim.warmup_steps=0",
                             f"parallel.pp={a.pp}", "parallel.use_distributed_optimizer=true"])
    hf = tiny.tiny_hf_config()
    policy = build_policy(cfg, hf, groups, total_steps=3)
    everything, _ = tiny.synthetic_samples()
    samples = everything if dist.get_rank() == 0 else None  # only rank 0 holds the rollout batch
    per_mini = cfg.rollout.mini_batch_prompts * cfg.rollout.n_samples_per_prompt
    shard = sh.scatter_shards(SimpleNamespace(samples=samples, metrics={}) if samples else None, cfg.algo,
                              per_mini, loop.skips_zero_advantage(cfg.algo), groups, sh.HandoffBytes())
    mine, _ = sh.shard_advantages(shard, cfg.algo, groups.dp)
    advantages = _whole_batch_advantages(shard, mine, len(everything), per_mini, groups)
    same = _same_micro_batches_as_whole_batch(cfg, groups, everything, shard, mine, advantages)
    metrics = loop._train(cfg, policy, None, shard, mine, 1)
    return {"backend": dist.get_backend_config(), "adv": advantages, "same_micro_batches": same,
            "loss": metrics["loss/loss"], "tokens_per_s": metrics["train/tokens_per_s"]}


def _whole_batch_advantages(shard, mine, n, per_mini, groups) -> list[float]:
    """Every sample's advantage (0.0 for those no rank trains), from the DP ranks' shards."""
    at = (shard.mini_batch * per_mini + shard.index).tolist()
    held = [None] * groups.dims.dp
    dist.all_gather_object(held, (at, mine.tolist()), group=groups.dp)  # test-side only
    out = [0.0] * n
    for idx, values in held:
        for i, v in zip(idx, values):
            out[i] = v
    return out


def _same_micro_batches_as_whole_batch(cfg, groups, everything, shard, mine, advantages) -> bool:
    """The micro-batches built from this rank's shard are bit for bit those the loop built
    when every rank held the whole batch (rank_micro_batches)."""
    per_mini = cfg.rollout.mini_batch_prompts * cfg.rollout.n_samples_per_prompt
    skip, multiple = loop.skips_zero_advantage(cfg.algo), batching.seq_multiple(groups.dims.tp)
    plans = sh.shard_micro_batches(shard, mine, cfg.train.micro_batch_max_tokens, multiple, 1,
                                   cfg.train.pack_sequences)
    for k, plan in enumerate(plans):
        lo, hi = k * per_mini, (k + 1) * per_mini
        ours = plan.micro_batches
        whole, _ = batching.rank_micro_batches(everything[lo:hi], advantages[lo:hi], groups.dp_rank, groups.dims.dp,
                                               cfg.train.micro_batch_max_tokens, skip, multiple, 1, cfg.train.pack_sequences)
        if len(ours) != len(whole):
            return False
        for a, b in zip(ours, whole):
            tensors = ("tokens", "position_ids", "targets", "loss_mask", "advantages", "rollout_logprobs")
            if a.sample_index != b.sample_index or not all(torch.equal(getattr(a, n), getattr(b, n)) for n in tensors):
                return False
    return True


def meet_at_the_store(timeout_s: float = 300.0) -> None:
    """Every rank arrives here before the groups are made. With `--timeout-s 5` the default
    group's 5 s also bounds its own rendezvous (gloo waits for its peers' keys in the store), so
    a rank still importing megatron-core 5 s after the other (seen with the suite's real SGLang
    servers on the same 2 cores: DistStoreError "wait timeout after 5000ms, keys:
    /default_pg/0//cpu//0/0") failed the test before the collective it is about; meeting
    first at torchrun's store, with a long wait, leaves the 5 s to that collective."""
    from torch.distributed.elastic.utils.store import barrier

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    barrier(store, int(os.environ["WORLD_SIZE"]), "qae_test_arrived", barrier_timeout=timeout_s)


def wait_mode(a) -> dict:
    meet_at_the_store()
    groups = parallel.init_distributed(ParallelConfig(),
                                       collective_timeout_s=a.timeout_s, rollout_wait_timeout_s=600.0)
    t0 = time.perf_counter()
    batch = {"samples": list(range(1000))} if dist.get_rank() == 0 else None
    if dist.get_rank() == 0:
        time.sleep(a.rollout_s)  # the rollout: longer than any collective may take
    if a.control:
        holder = [batch]
        dist.broadcast_object_list(holder, src=0)
        got = holder[0]
    else:
        got = loop._broadcast(batch, SimpleNamespace(groups=groups))
    waited = time.perf_counter() - t0
    dist.barrier()  # the default group still works afterwards
    return {"waited_s": waited, "received": len(got["samples"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["groups", "wait"], required=True)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--timeout-s", type=float, default=5.0)
    ap.add_argument("--rollout-s", type=float, default=15.0)
    ap.add_argument("--control", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    result = groups_mode(a) if a.mode == "groups" else wait_mode(a)
    Path(f"{a.out}.rank{dist.get_rank()}.json").write_text(json.dumps(result))
    parallel.destroy()


if __name__ == "__main__":
    main()
