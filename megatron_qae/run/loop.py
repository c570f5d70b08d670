"""The RL loop: rollout -> reward -> advantage -> train -> checkpoint -> weight sync -> eval.

What it does: `run(cfg, env)` drives one training run on every trainer rank. Global rank 0
owns the Ray side (rollout manager, engines) and sends each DP rank its `TrainShard` of the
rollout batch in one scatter (batch/shard.py); each rank's advantages come from its shard through
the DP-aware QAE reduction; training runs the step's mini-batches through megatron; a checkpoint,
when one is due, is written right after training (the train state is on the device then and
colocated engines hold nothing); then weights go to the engines. Where the engines run (devices
of their own, or colocated with the trainer) is one `Placement` (sync/placement.py), picked
once: it readies the devices around training and pushes the weights, so this loop reads the
same either way. What it does not: parse arguments
or read the environment (train.py does), or implement any of the steps (each is a call).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_qae.persistence import checkpoint

from megatron_qae.model import parallel, weights
from megatron_qae.batch.batching import schedule_multiple, seq_multiple, with_old_logprobs, with_ref_logprobs
from megatron_qae.batch.shard import HandoffBytes, TrainShard, scatter_shards, shard_advantages, shard_micro_batches
from megatron_qae.launch_env import LaunchEnv
from megatron_qae.config.algo import AlgoConfig
from megatron_qae.config.loading import Config, save_config, to_dict, validate_against_model
from megatron_qae.algorithm import k_control
from megatron_qae.algorithm.k_control import KState
from megatron_qae.algorithm.objective import zero_advantage_gradient
from megatron_qae.persistence.ledger import GroupLedger
from megatron_qae.persistence.metrics import MetricsSink
from megatron_qae.model.build import load_hf_config
from megatron_qae.model.policy import Policy, build_policy, finish_param_sync
from megatron_qae.model.reference import Reference, build_reference
from megatron_qae.run.rollout import Rollout
from megatron_qae.run.train_step import compute_logprobs, logprob_gap, train_step
from megatron_qae.sync.placement import Placement, placement_for
from rollout_sglang.types import Sample

log = logging.getLogger(__name__)


def run(cfg: Config, env: LaunchEnv) -> list[dict[str, float]]:
    """Train for cfg.run.num_rollout_steps rollout steps; returns rank 0's logged metrics."""
    groups = parallel.init_distributed(
        cfg.parallel, seed=cfg.run.seed,
        collective_timeout_s=cfg.run.collective_timeout_s,
        rollout_wait_timeout_s=cfg.run.rollout_wait_timeout_s,
    )
    is_driver = dist.get_rank() == 0
    hf = load_hf_config(cfg.model.path)
    validate_against_model(cfg, hf)
    run_dir = Path(cfg.run.run_dir)
    if is_driver:
        save_config(cfg, run_dir)
    total_steps = cfg.run.num_rollout_steps * cfg.rollout.steps_per_rollout
    _log_zero_advantage_skip(cfg.algo, is_driver)
    _log_fp8_tis(cfg, is_driver)
    # Separate engines start now, while the policy is built and restored; colocated ones once
    # the policy is restored and its train state offloaded (attach).
    placement = placement_for(cfg, env.master_address, is_driver)
    try:  # whatever fails from here on (a damaged checkpoint included) tears the engines down
        policy = build_policy(cfg, hf, groups, total_steps)
        # Before any checkpoint is loaded: the reference is the initial policy, resumed or not.
        reference = build_reference(policy, cfg.model.transformer_impl,
                                    cfg.model.path if cfg.model.load_weights else None) if cfg.algo.kl_coef > 0 else None
        start, state = _restore(cfg, policy)
        rollout = placement.attach(policy)
        if rollout is not None:
            if state.get("rollout") is not None:
                rollout.load_state_dict(state["rollout"])
            rollout.wait_ready()
        kstate = k_control.initial_state(cfg.algo, state.get("k_control"))
        return _train_loop(cfg, policy, reference, rollout, placement, start, kstate, run_dir, is_driver)
    finally:
        placement.close()


def _train_loop(cfg: Config, policy: Policy, reference: Reference | None, rollout: Rollout | None,
                placement: Placement, start: int, kstate: KState, run_dir: Path, is_driver: bool
                ) -> list[dict[str, float]]:
    sink = MetricsSink(run_dir, enabled=is_driver, tensorboard=cfg.run.log_tensorboard,
                       wandb_project=cfg.run.wandb_project, config=to_dict(cfg))
    sink.truncate_after(start)
    ledger = GroupLedger(run_dir, enabled=is_driver)
    ledger.truncate_after(start)
    stop = checkpoint.install_sigterm_save()
    history: list[dict[str, float]] = []
    placement.push(start)  # engines start from the trainer's weights (attach readied the devices)
    progress = _progress(cfg, start, is_driver)
    for rollout_step in range(start + 1, cfg.run.num_rollout_steps + 1):
        t0 = time.perf_counter()
        batch = rollout.generate(rollout_step - 1) if is_driver else None               # rollout + reward
        ahead = cfg.rollout.async_steps and rollout_step < cfg.run.num_rollout_steps
        if ahead and is_driver:
            rollout.generate_ahead(rollout_step - 1)  # the next rollout step's batch, while this one trains
        sent = HandoffBytes()  # rank 0 sends each DP rank its shard only (batch/shard.py)
        algo = k_control.algo_at(cfg.algo, kstate)  # this step's K (algo.k_control; cfg.algo when off)
        shard = scatter_shards(batch, algo, _samples_per_mini_batch(cfg), skips_zero_advantage(cfg.algo),
                               policy.groups, sent)
        wait_s = time.perf_counter() - t0
        samples = batch.samples if batch is not None else None
        rollout_metrics = dict(batch.metrics) if batch is not None else {}  # rank 0 alone logs them
        _warn_underfilled(cfg, rollout_metrics, rollout_step, is_driver)
        ledger.record(rollout_step, batch)
        offload_metrics = placement.before_training()                     # colocated: engines free GPUs, state back
        advantages, adv_metrics = shard_advantages(shard, algo, policy.groups.dp)  # advantage
        train_metrics = _train(cfg, policy, reference, shard, advantages, rollout_step)  # train
        kstate, k_metrics = k_control.update(cfg.algo, kstate, {**adv_metrics, **train_metrics})  # next K
        stopping = _broadcast(stop.requested, policy)  # every rank must agree before a collective save
        if stopping or (cfg.run.save_interval_steps and rollout_step % cfg.run.save_interval_steps == 0):
            _save(cfg, policy, rollout, rollout_step, kstate, run_dir, is_driver)        # checkpoint
        placement.after_training()                                          # colocated: state off the GPU
        if ahead:
            _wait_ahead(rollout, policy)
        sync_metrics = placement.push(rollout_step).metrics()                           # weight sync
        step_s = time.perf_counter() - t0
        metrics = {**rollout_metrics, **adv_metrics, **train_metrics, **k_metrics, **sync_metrics, **offload_metrics,
                   **_staleness(samples, rollout_step), **_goodput(rollout_metrics, train_metrics, step_s),
                   "time/step_s": step_s,
                   "time/rollout_wait_s": wait_s, "train/policy_version": float(rollout_step),
                   "handoff/sent_bytes": float(sent.sent)}
        if cfg.run.eval_interval_steps and rollout_step % cfg.run.eval_interval_steps == 0 and is_driver:
            metrics.update(rollout.evaluate(cfg.run.eval_n_samples))            # eval
        sink.log(rollout_step, metrics)
        history.append(metrics)
        _progress_update(progress, metrics)
        if stopping:
            log.warning("SIGTERM: saved step %d and stopping", rollout_step)
            break
    sink.close()
    if progress is not None:
        progress.close()
    return history


def _restore(cfg: Config, policy: Policy) -> tuple[int, dict]:
    """Resume from the run directory's latest checkpoint, else load HF weights if any; (step,
    the checkpoint's loop state: its "rollout" entry goes to the rollout manager)."""
    found = checkpoint.load_latest(cfg.run.run_dir, policy, cfg.run.resume_from_damaged)
    if found is not None:
        path, state = found
        log.info("resumed from %s (step %d)", path, state["step"])
        return int(state["step"]), state
    if cfg.model.load_weights:
        weights.load_hf_dir(policy, cfg.model.path)
    return 0, {}


def _save(cfg: Config, policy: Policy, rollout: Rollout | None, rollout_step: int, kstate: KState,
          run_dir: Path, is_driver: bool) -> None:
    """Checkpoint right after training, before the offload and the push: the train state is
    still on the device and colocated engines still hold nothing, so the save's peak is the
    trainer's alone (colocated: release -> restore -> [train] -> save -> offload -> resume)."""
    loop_state = {"step": rollout_step, "rollout": rollout.state_dict() if is_driver else None,
                  "k_control": kstate.state_dict()}
    checkpoint.save_checkpoint(run_dir, rollout_step, policy, _broadcast(loop_state, policy),
                               keep_last=cfg.run.keep_last_checkpoints,
                               optimizer_format=cfg.run.checkpoint_optimizer_format)


def _broadcast(obj, policy: Policy):
    # Over the hand-off group: the other ranks wait here while rank 0 generates or evaluates.
    return parallel.broadcast_from_driver(obj, policy.groups)


def _samples_per_mini_batch(cfg: Config) -> int:
    return cfg.rollout.mini_batch_prompts * cfg.rollout.n_samples_per_prompt


def skips_zero_advantage(algo: AlgoConfig) -> bool:
    """algo.skip_zero_advantage, unless the loss gives zero-advantage responses a gradient."""
    return algo.skip_zero_advantage and zero_advantage_gradient(algo) is None


def _log_zero_advantage_skip(algo: AlgoConfig, is_driver: bool) -> None:
    reason = zero_advantage_gradient(algo)
    if is_driver and algo.skip_zero_advantage and reason is not None:
        log.info("algo.skip_zero_advantage is off for this run: a zero-advantage response still "
                 "has a gradient (%s), so leaving it out would change the step", reason)


def _log_fp8_tis(cfg: Config, is_driver: bool) -> None:
    if is_driver and cfg.model.fp8 and cfg.algo.tis_cap is None:
        log.info("model.fp8=%s: truncated importance sampling on at algo.tis_cap=%s (null = auto): the "
                 "trainer's FP8 old log-probs are not the bf16 engines' sampling policy; set algo.tis_cap "
                 "to choose another cap", cfg.model.fp8, cfg.loss_algo.tis_cap)


def _train(cfg: Config, policy: Policy, reference: Reference | None, shard: TrainShard,
           advantages: torch.Tensor, rollout_step: int) -> dict:
    """Old (and reference) log-probs for all mini-batches, then one optimizer step per
    mini-batch (none when dynamic sampling kept no group: the weights stay as they are), on
    this rank's shard and the advantages of its samples."""
    if not shard.num_mini_batches:
        return {"train/optimizer_steps": 0.0}
    groups, algo = policy.groups, cfg.loss_algo  # algo.tis_cap resolved against model.fp8
    multiple = seq_multiple(groups.dims.tp, cfg.parallel.sequence_parallel, cfg.model.fp8 is not None)
    plans = shard_micro_batches(shard, advantages, cfg.train.micro_batch_max_tokens, multiple,
                                schedule_multiple(groups.dims.pp, groups.dims.vpp), cfg.train.pack_sequences)
    t0 = time.perf_counter()
    chunk = cfg.train.logprob_chunk_tokens
    mbs_of = [with_old_logprobs(p.micro_batches, compute_logprobs(policy, p.micro_batches, cfg.rollout.temperature,
                                                                  chunk)) for p in plans]
    if reference is not None:
        mbs_of = [with_ref_logprobs(mbs, compute_logprobs(reference, mbs, cfg.rollout.temperature, chunk))
                  for mbs in mbs_of]
    gap = logprob_gap(policy, [mb for mbs in mbs_of for mb in mbs])
    sums: dict[str, float] = {}
    for i, (plan, mbs) in enumerate(zip(plans, mbs_of)):
        m = train_step(policy, mbs, plan.response_tokens, algo, (rollout_step - 1) * len(plans) + i,
                       cfg.rollout.temperature, chunk, global_samples=plan.samples, seed=cfg.run.seed)
        for k, v in {**m, **plan.metrics}.items():
            sums[k] = sums.get(k, 0.0) + v / len(plans)
    finish_param_sync(policy)  # weight sync and checkpoints read the parameters next
    elapsed = time.perf_counter() - t0
    every = [mb for mbs in mbs_of for mb in mbs]
    # [trained response tokens, those of responses with a non-zero advantage], in one all-reduce.
    trained = torch.tensor([float(sum(mb.loss_mask.sum() for mb in every)),
                            float(sum((mb.loss_mask * (mb.advantages != 0)).sum() for mb in every))])
    dist.all_reduce(trained, group=groups.dp)
    return {**sums, "train/logprob_gap_rollout": gap, "train/tis_cap": algo.tis_cap or 0.0, "train/step_s": elapsed,
            "train/tokens_per_s": float(trained[0]) / elapsed, "train/optimizer_steps": float(len(plans)),
            "train/trained_tokens": float(trained[0]), "train/gradient_tokens": float(trained[1])}


def _goodput(rollout_metrics: dict[str, float], train_metrics: dict[str, float], step_s: float) -> dict[str, float]:
    """Tokens per second of the whole rollout step (generation, hand-off, training, push):
    generated (every scored response, dropped groups included), trained (reached the backward
    pass), and goodput (trained and of a response with a non-zero advantage: the tokens that
    carry a policy gradient); the gradient tokens' share of the generated ones (rank 0 only,
    where the rollout metrics are). `persistence.metrics.gradient_token_share` is a run's share."""
    generated = rollout_metrics.get("rollout/response_tokens")
    if generated is None:
        return {}
    gradient = train_metrics.get("train/gradient_tokens", 0.0)
    return {"perf/generated_tokens": generated, "perf/gradient_tokens": gradient,
            "perf/generated_tokens_per_s": generated / step_s,
            "perf/trained_tokens_per_s": train_metrics.get("train/trained_tokens", 0.0) / step_s,
            "perf/goodput_tokens_per_s": gradient / step_s,
            "perf/gradient_token_frac": gradient / generated if generated else 0.0}


def _wait_ahead(rollout: Rollout | None, policy: Policy) -> None:
    """Rank 0 waits for the batch generated ahead before new weights go out; the other ranks wait
    in the hand-off group, whose wait is not bounded by the collective timeout."""
    if rollout is not None:
        rollout.wait_ahead()
    _broadcast(None, policy)


def _staleness(samples: list[Sample] | None, rollout_step: int) -> dict[str, float]:
    """Versions between the weights that sampled each response and the weights trained at
    `rollout_step` (version rollout_step-1): 0 generating synchronously, 1 one step off-policy. Rank 0 only."""
    lag = [rollout_step - 1 - s.policy_version for s in samples or []]
    if not lag:
        return {}
    return {"rollout/staleness_mean": sum(lag) / len(lag), "rollout/staleness_max": float(max(lag))}


def _warn_underfilled(cfg: Config, m: dict[str, float], rollout_step: int, is_driver: bool) -> None:
    if is_driver and m.get("rollout/underfilled"):
        log.warning("step %d: dynamic sampling kept %d of rollout.prompts_per_step=%d groups after %d "
                    "generation batches; training on those, if any (rollout.on_underfilled=train; 'fail' "
                    "stops instead, more rollout.max_gen_batches fills the batch)", rollout_step,
                    int(m["rollout/groups"]), cfg.rollout.prompts_per_step, int(m["rollout/gen_batches"]))


def _progress(cfg: Config, start: int, is_driver: bool):
    if not (is_driver and cfg.run.progress_bar):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.run.num_rollout_steps, initial=start, desc="rollout steps", unit="step")


def _progress_update(progress, metrics: dict[str, float]) -> None:
    if progress is None:
        return
    keys = {"acc": "rollout/accuracy_all", "reward": "rollout/reward_mean",
            "entropy": "loss/entropy", "zero_adv": "adv/zero_frac"}
    progress.set_postfix({k: f"{metrics[v]:.3f}" for k, v in keys.items() if v in metrics})
    progress.update(1)
