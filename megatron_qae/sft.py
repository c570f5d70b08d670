"""Entry point: a short supervised warm start, `[torchrun ...] python -m megatron_qae.sft
--config configs/X.yaml --steps N --batch-prompts B --lr LR --out DIR [key=value ...]`.

What it does: builds the same Megatron policy as the trainer from the config (model.path,
parallel layout, optimizer settings with `--lr`), and trains it for `--steps` optimizer steps
of token-mean cross-entropy (run.sft_step) on the training data's prompts with their ground
truth followed by the end token as the target, `--batch-prompts` prompts drawn per step from
a generator seeded by run.seed (the same draw on every rank). Writes a model-only trainer
checkpoint to `<out>/checkpoints/step_N` (any layout), the per-step metrics (sft/nll, the
token-mean NLL before the step's update; sft/p_target) to `<out>/sft_metrics.json` and, in a
one-process run, the HF model directory `<out>/hf` through megatron_qae.model.hf_convert's writer,
which RL then starts from (`model.path=<out>/hf`). Multi-process runs convert the checkpoint with
`python -m tools.convert_checkpoint mcore-to-hf`. What it does not: RL, evaluation, or any
data format other than the RL data (prompt + ground-truth answer).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from pathlib import Path

from megatron_qae.run import console
from megatron_qae.launch_env import single_process_env

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="YAML file under configs/ (model, data, layout, optimizer)")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps")
    ap.add_argument("--batch-prompts", type=int, default=32, help="prompts per optimizer step")
    ap.add_argument("--lr", type=float, required=True, help="learning rate (constant, no warm-up)")
    ap.add_argument("--out", type=Path, required=True, help="directory for checkpoints/ and hf/")
    ap.add_argument("--verbose", action="store_true", help="also show third-party logs on the terminal")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.path=DIR")
    a = ap.parse_args(argv)
    for name in ("steps", "batch_prompts"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be at least 1")
    if not a.lr > 0:
        ap.error(f"--lr {a.lr}: must be positive")
    return a


def target_pairs(cfg, tokenizer) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(prompt ids, answer ids + end token) of every training prompt."""
    from rollout_sglang.data import load_prompts

    d = cfg.data
    prompts = load_prompts(d.train_path, tokenizer, prompt_key=d.prompt_key, answer_key=d.answer_key,
                           apply_chat_template=d.apply_chat_template, max_prompt_tokens=cfg.rollout.max_prompt_tokens)
    eos = (tokenizer.eos_token_id,)
    return [(p.prompt_ids, tuple(tokenizer(p.answer, add_special_tokens=False)["input_ids"]) + eos) for p in prompts]


def train(cfg, a: argparse.Namespace) -> dict[str, float]:
    """The warm start itself (every rank); returns the last step's metrics."""
    import torch.distributed as dist
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from megatron_qae.model import parallel, weights
    from megatron_qae.model.build import load_hf_config
    from megatron_qae.model.policy import build_policy, finish_param_sync
    from megatron_qae.persistence import checkpoint
    from megatron_qae.batch.batching import schedule_multiple, seq_multiple
    from megatron_qae.run.sft_step import sft_micro_batches, sft_step

    groups = parallel.init_distributed(cfg.parallel, seed=cfg.run.seed,
                                       collective_timeout_s=cfg.run.collective_timeout_s)
    hf = load_hf_config(cfg.model.path)
    policy = build_policy(cfg, hf, groups, total_steps=a.steps)
    if cfg.model.load_weights:
        weights.load_hf_dir(policy, cfg.model.path)
    pairs = target_pairs(cfg, AutoTokenizer.from_pretrained(cfg.model.path))
    rng = random.Random(cfg.run.seed)  # the same draw on every rank
    dims, history = groups.dims, []
    bar = tqdm(range(1, a.steps + 1), desc="sft steps", unit="step", disable=dist.get_rank() != 0)
    for step in bar:
        batch = rng.sample(pairs, min(a.batch_prompts, len(pairs)))
        mbs = sft_micro_batches(batch, groups.dp_rank, dims.dp, cfg.train.micro_batch_max_tokens,
                                seq_multiple(dims.tp, cfg.parallel.sequence_parallel, cfg.model.fp8 is not None),
                                schedule_multiple(dims.pp, dims.vpp))
        metrics = sft_step(policy, mbs, sum(len(t) for _, t in batch), step, cfg.train.logprob_chunk_tokens)
        history.append(metrics)
        bar.set_postfix({"nll": f"{metrics['sft/nll']:.3f}", "p_target": f"{metrics['sft/p_target']:.3f}"})
    finish_param_sync(policy)
    path = checkpoint.save_checkpoint(a.out, a.steps, policy, {"step": a.steps, "model_path": cfg.model.path},
                                      keep_last=1, with_optimizer=False)
    if dist.get_world_size() == 1:
        from megatron_qae.model.hf_convert import policy_to_hf

        policy_to_hf(policy, hf, Path(cfg.model.path), a.out / "hf", cfg.model.params_dtype)
    else:
        log.info("checkpoint %s; write its HF directory with python -m tools.convert_checkpoint mcore-to-hf "
                 "--ckpt %s --hf-config-dir %s --out %s", path, path, cfg.model.path, a.out / "hf")
    if dist.get_rank() == 0:
        (a.out / "sft_metrics.json").write_text(json.dumps(history, indent=1) + "\n")
    parallel.destroy()
    return history[-1]


def main(argv: list[str] | None = None) -> dict[str, float]:
    a = parse_args(argv)
    single_process_env()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rank = int(os.environ["RANK"])
    console.setup(rank, a.verbose)  # before megatron-core is imported: it logs at import
    from megatron_qae.config.loading import load_config

    cfg = load_config(a.config, [*a.overrides, f"optim.lr={a.lr}", "optim.warmup_steps=0",
                                 "optim.lr_decay_style=constant"])
    console.attach_run_dir(a.out, rank)
    metrics = train(cfg, a)
    if rank == 0:
        log.info("sft: %d steps, last nll %.4f, mean p(target) %.3f; model: %s", a.steps, metrics["sft/nll"],
                 metrics["sft/p_target"], a.out / "hf")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
