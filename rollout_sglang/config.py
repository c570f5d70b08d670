"""The rollout-side sections of the run config: rollout, engine, reward, data.

What it does: one frozen dataclass per section, read by this package (the manager, the engine
pool, the reward scorer, the prompt loader) and composed into the run's root config by
megatron_qae.config.loading; a docstring per field, per-field validation and the checks
across these four sections (`check_rollout_sections`), each a ValueError naming field, value
and fix. What it does not: load files, or check against the trainer's sections or the model
(megatron_qae.config.loading does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rollout_sglang.config_checks import fail, one_of, positive


@dataclass(frozen=True)
class RolloutConfig:
    n_samples_per_prompt: int = 16
    """Responses per prompt (the group size G)."""
    prompts_per_step: int = 512
    """Groups kept per rollout step (the train batch, in prompts)."""
    mini_batch_prompts: int = 32
    """Prompts per optimizer step; prompts_per_step / mini_batch_prompts steps per rollout."""
    gen_batch_prompts: int = 1536
    """Prompts generated per generation batch (over-sampling for dynamic sampling)."""
    max_gen_batches: int = 10
    """Generation batches per rollout step before giving up on filling the batch."""
    on_underfilled: str = "train"
    """When max_gen_batches run out with fewer than prompts_per_step groups kept: 'train' on the groups kept (warns, logs rollout/underfilled), 'fail' stops (DAPO's strict behaviour)."""
    groups_per_request: int = 1
    """Groups per /generate request. 1 streams group by group (each scored and kept or dropped as it finishes, the rest aborted once the batch is full): for long, uneven responses. More cuts per-request HTTP cost where responses are short and even (the CPU demo: 8); a request's groups finish together."""
    dynamic_sampling: bool = True
    """Drop groups whose accuracy is all-equal (all right or all wrong) and refill."""
    max_prompt_tokens: int = 2048
    """Longest prompt (longer ones are filtered out of the data set)."""
    max_response_tokens: int = 20480
    """max_new_tokens of generation."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts (log-probs are taken at this temperature)."""
    top_p: float = 1.0
    """Nucleus sampling of training rollouts."""
    top_k: int = -1
    """Top-k sampling of training rollouts (-1 = off)."""
    val_temperature: float = 1.0
    """Sampling temperature of evaluation."""
    val_top_p: float = 0.7
    """Nucleus sampling of evaluation."""
    async_steps: int = 0
    """1: one-step off-policy -- the engines generate step k+1's batch while the trainer trains on step k (samples at most one policy_version old; needs algo.tis_cap). 0: generate, then train."""

    def __post_init__(self) -> None:
        for name in ("n_samples_per_prompt", "prompts_per_step", "mini_batch_prompts",
                     "gen_batch_prompts", "max_gen_batches", "groups_per_request", "max_prompt_tokens",
                     "max_response_tokens"):
            positive(f"rollout.{name}", getattr(self, name))
        one_of("rollout.on_underfilled", self.on_underfilled, ("train", "fail"))
        one_of("rollout.async_steps", self.async_steps, (0, 1))
        if self.prompts_per_step % self.mini_batch_prompts:
            fail("rollout.mini_batch_prompts", self.mini_batch_prompts,
                  f"must divide rollout.prompts_per_step={self.prompts_per_step}")
        for name in ("temperature", "val_temperature"):
            positive(f"rollout.{name}", getattr(self, name))
        for name in ("top_p", "val_top_p"):
            if not 0.0 < getattr(self, name) <= 1.0:
                fail(f"rollout.{name}", getattr(self, name), "must be in (0, 1]")

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps per rollout step."""
        return self.prompts_per_step // self.mini_batch_prompts


@dataclass(frozen=True)
class EngineConfig:
    backend: str = "cpu"
    """'sglang' (sglang.launch_server, GPU) or 'cpu' (our server with the same HTTP API)."""
    num_engines: int = 1
    """Rollout engines (each a server process run by a Ray actor)."""
    engine_tp: int = 1
    """Tensor-parallel size of each engine (GPUs per engine)."""
    colocate: bool = False
    """Engines share the trainer's GPUs: one engine TP rank per trainer rank (num_engines x
    engine_tp = trainer world size), memory released during training, weights passed by
    handle (update_weights_from_tensor)."""
    offload_train_state: bool = True
    """Colocated: while the engines generate, free the trainer's gradient buffers and keep its
    optimizer state (moments, fp32 main params) in host memory, restored bit for bit before
    training (model/offload.py); ignored unless colocate."""
    mem_fraction_static: float = 0.8
    """SGLang --mem-fraction-static (weights + KV cache share of GPU memory)."""
    sglang_args: dict[str, Any] = field(default_factory=dict)
    """Extra sglang.launch_server arguments by SGLang's own ServerArgs names, passed as
    --key value (checked against SGLang's parser when sglang is importable). `device: cpu`
    (with `max_total_tokens`) serves real SGLang on CPU with the tools/sglang_cpu stand-in."""
    sglang_python: str | None = None
    """Python interpreter that runs sglang.launch_server (e.g. .venv-sglang/bin/python when
    SGLang lives in its own venv); None = the trainer's own interpreter."""
    host: str = "127.0.0.1"
    """Address the engines listen on."""
    port_base: int = 30000
    """First port tried for engine servers."""
    startup_timeout_s: float = 300.0
    """Seconds an engine's server may take, once Ray placed it, to serve (SGLang: warmup done)."""
    schedule_timeout_s: float = 600.0
    """Seconds Ray may take to place the engine actors (their GPUs free on live nodes; engine
    nodes may still be joining); past it the start fails naming what an engine asks for, its
    Ray state and what the cluster has."""
    request_timeout_s: float = 600.0
    """Deadline of one control or weight-update request (generation has its own, sized for
    the request); a hung engine is found by its /health probes within seconds either way."""
    request_s_per_token: float = 0.01
    """Seconds a generation request may take per token it may generate (rows x n x
    max_new_tokens), on top of request_floor_s: its deadline is sized for the request."""
    request_floor_s: float = 60.0
    """Seconds every generation request gets whatever its size (queueing, prefill)."""
    health_interval_s: float = 2.0
    """Seconds between /health probes of an engine while requests to it are in flight (one
    prober per engine, however many requests)."""
    health_timeout_s: float = 5.0
    """Seconds one /health probe may take; an engine that gives no answer (of any status: a
    503 from a warming SGLang is an answer) to health_failures probes in a row is hung (stopped
    or wedged): it is killed, restarted and given the current weights."""
    health_failures: int = 2
    """Probes in a row without any answer that make an engine hung."""
    max_restarts: int = 3
    """Restarts allowed per engine before the run fails."""
    weight_sync_bucket_bytes: int = 512 * 1024 * 1024
    """Bytes per weight-sync bucket (one HTTP update request each)."""
    max_running_requests: int | None = None
    """SGLang --max-running-requests, None = SGLang's default."""

    def __post_init__(self) -> None:
        one_of("engine.backend", self.backend, ("cpu", "sglang"))
        positive("engine.num_engines", self.num_engines)
        positive("engine.engine_tp", self.engine_tp)
        if not 0.0 < self.mem_fraction_static < 1.0:
            fail("engine.mem_fraction_static", self.mem_fraction_static, "must be in (0, 1)")
        positive("engine.weight_sync_bucket_bytes", self.weight_sync_bucket_bytes)
        positive("engine.request_timeout_s", self.request_timeout_s)
        positive("engine.schedule_timeout_s", self.schedule_timeout_s)
        positive("engine.request_s_per_token", self.request_s_per_token, strict=False)
        positive("engine.request_floor_s", self.request_floor_s)
        positive("engine.health_interval_s", self.health_interval_s)
        positive("engine.health_timeout_s", self.health_timeout_s)
        positive("engine.health_failures", self.health_failures)


@dataclass(frozen=True)
class RewardConfig:
    name: str = "dapo_math"
    """'dapo_math' (verl's DAPO grading, +1/-1), 'dapo_math_strict_box', 'math_verify', 'arithmetic' (tests), 'exact_match' (demo), or 'package.module:function' (docs/rewards.md)."""
    overlong_buffer_enable: bool = True
    """DAPO overlong penalty: linear in the last overlong_buffer_tokens before the max length."""
    overlong_buffer_tokens: int = 4096
    """Length of the penalty buffer, in tokens."""
    overlong_penalty_factor: float = 1.0
    """Penalty at the max length (the penalty grows linearly to -factor)."""
    num_workers: int = 2
    """Processes scoring responses (math-verify needs a main thread, so always processes)."""
    timeout_s: float = 30.0
    """Seconds one response's reward may take; past it the worker is killed and the response gets failure_score."""
    failure_score: float = -1.0
    """Score (accuracy 0) of a response whose reward raised, timed out, or returned a non-number or NaN; counted in reward/errors."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.failure_score):
            fail("reward.failure_score", self.failure_score, "must be a finite number, e.g. -1.0")
        positive("reward.timeout_s", self.timeout_s)
        positive("reward.overlong_buffer_tokens", self.overlong_buffer_tokens)
        positive("reward.overlong_penalty_factor", self.overlong_penalty_factor, strict=False)
        positive("reward.num_workers", self.num_workers)


@dataclass(frozen=True)
class DataConfig:
    train_path: str = ""
    """Training prompts: parquet (DAPO-Math-17k / verl schema) or jsonl."""
    val_path: str | None = None
    """Validation prompts for avg@k / pass@k (same formats), None = no evaluation."""
    prompt_key: str = "prompt"
    """Column holding the prompt (chat messages or a string)."""
    answer_key: str = "reward_model.ground_truth"
    """Dotted path to the ground-truth answer in a row."""
    apply_chat_template: bool = True
    """Apply the tokenizer's chat template (with the generation prompt)."""
    shuffle: bool = True
    """Shuffle prompts each epoch (deterministically from `seed`)."""
    seed: int = 1234
    """Seed of the prompt order."""


def check_rollout_sections(rollout: RolloutConfig, engine: EngineConfig, reward: RewardConfig) -> None:
    """The constraints across the rollout, engine and reward sections."""
    if reward.overlong_buffer_enable and reward.overlong_buffer_tokens >= rollout.max_response_tokens:
        fail("reward.overlong_buffer_tokens", reward.overlong_buffer_tokens,
             f"must be < rollout.max_response_tokens={rollout.max_response_tokens}; shrink the buffer "
             "or set reward.overlong_buffer_enable=false")
    if engine.backend == "cpu" and engine.engine_tp != 1:
        fail("engine.engine_tp", engine.engine_tp, "the CPU rollout server runs tp=1; set 1")
