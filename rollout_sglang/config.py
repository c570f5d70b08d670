"""The rollout-side sections of the run config: rollout, engine, reward, data.

What it does: one frozen dataclass per section, read by this package (the manager, the engine
pool, the reward scorer, the prompt loader) and composed into the run's root config by
megatron_qae.config.loading; a docstring per field, per-field validation (every numeric field has a `BOUNDS` entry) and the checks
across these four sections (`check_rollout_sections`), each a ValueError naming field, value
and fix. What it does not: load files, or check against the trainer's sections or the model
(megatron_qae.config.loading does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rollout_sglang.config_checks import (AT_LEAST_ONE, FINITE, NON_NEGATIVE, POSITIVE, PORT, SECONDS, SEED,
                                          UNIT_OPEN, Bound, check_bounds, fail, no_shadowing, one_of)
from rollout_sglang.rewards.registry import BUILTIN_REWARDS

CPU_SERVER_MAX_SEQUENCES = 1024
"""Sequences (rows x n) per request our CPU server serves: its --max-sequences default
(cpu_server/limits.py, imported there with uvicorn; a test holds the two equal)."""

CPU_SERVER_ARGS = ("dtype", "num_threads", "max_sequences", "max_body_bytes", "lock_timeout_s",
                   "weight_sync_timeout_s")
"""The CPU server's own options that `engine.sglang_args` may set with engine.backend=cpu (the
launcher sets the rest; a test holds these plus those equal to the server's parser)."""

SGLANG_SHADOWED = {
    "model_path": "model.path", "host": "engine.host", "port": "engine.port_base", "tp_size": "engine.engine_tp",
    "tp": "engine.engine_tp", "mem_fraction_static": "engine.mem_fraction_static", "random_seed": "run.seed",
    "api_key": "the run (a fresh key per run)", "enable_memory_saver": "engine.colocate",
    "skip_tokenizer_init": "the engine launcher (always on: the trainer sends token ids)",
}
"""sglang.launch_server arguments the engine launcher sets from a first-class field
(engines/engine.py server_command) -> that field."""


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

    BOUNDS: ClassVar[dict[str, Bound]] = {
        **{name: AT_LEAST_ONE for name in ("n_samples_per_prompt", "prompts_per_step", "mini_batch_prompts",
                                           "gen_batch_prompts", "max_gen_batches", "groups_per_request",
                                           "max_prompt_tokens", "max_response_tokens")},
        "temperature": Bound(0, low_open=True, why="log-probs are taken at this temperature; SGLang's 0 is greedy"),
        "val_temperature": POSITIVE,
        "top_p": Bound(0, 1, low_open=True, why="SGLang's SamplingParams.verify"),
        "val_top_p": Bound(0, 1, low_open=True, why="SGLang's SamplingParams.verify"),
        "top_k": Bound(1, also=(-1,), why="SGLang's SamplingParams.verify: -1 (off) or at least 1"),
        "async_steps": Bound(0, 1),
    }

    def __post_init__(self) -> None:
        check_bounds("rollout", self, self.BOUNDS)
        one_of("rollout.on_underfilled", self.on_underfilled, ("train", "fail"))
        if self.prompts_per_step % self.mini_batch_prompts:
            fail("rollout.mini_batch_prompts", self.mini_batch_prompts,
                  f"must divide rollout.prompts_per_step={self.prompts_per_step}")
        if self.groups_per_request > self.gen_batch_prompts:
            fail("rollout.groups_per_request", self.groups_per_request,
                 f"must be <= rollout.gen_batch_prompts={self.gen_batch_prompts} (a request holds groups of "
                 "one generation batch)")

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
    --key value (checked at start by SGLang's parser in engine.sglang_python; what the launcher
    sets from a field, e.g. port or tp_size, is refused). `device: cpu` (with `max_total_tokens`)
    serves real SGLang on CPU with the tools/sglang_cpu stand-in. With backend=cpu: only the CPU
    server's own options (dtype, num_threads, max_sequences, max_body_bytes, lock_timeout_s,
    weight_sync_timeout_s)."""
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

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "num_engines": AT_LEAST_ONE, "engine_tp": AT_LEAST_ONE, "mem_fraction_static": UNIT_OPEN,
        "port_base": PORT, "startup_timeout_s": SECONDS, "schedule_timeout_s": SECONDS, "request_timeout_s": SECONDS,
        "request_s_per_token": Bound(0, SECONDS.high, why=SECONDS.why), "request_floor_s": SECONDS,
        "health_interval_s": SECONDS, "health_timeout_s": SECONDS, "health_failures": AT_LEAST_ONE,
        "max_restarts": NON_NEGATIVE, "weight_sync_bucket_bytes": AT_LEAST_ONE,
        "max_running_requests": AT_LEAST_ONE,
    }

    def __post_init__(self) -> None:
        check_bounds("engine", self, self.BOUNDS)
        one_of("engine.backend", self.backend, ("cpu", "sglang"))
        top = self.port_base + 100 * (self.num_engines - 1)  # engine i searches from port_base + 100 i
        if top > PORT.high:
            fail("engine.port_base", self.port_base, f"engine {self.num_engines - 1} would start at port {top}, "
                 f"past {int(PORT.high)}; lower engine.port_base or engine.num_engines")
        no_shadowing("engine.sglang_args", self.sglang_args, SGLANG_SHADOWED)
        for key in self.sglang_args:
            if not re.fullmatch(r"[a-z][a-z0-9_-]*", str(key)):
                fail(f"engine.sglang_args.{key}", self.sglang_args[key], "use SGLang's ServerArgs name "
                     "(e.g. max_total_tokens, without leading dashes); see `python -m sglang.launch_server --help`")
            if self.backend == "cpu" and str(key).replace("-", "_") not in CPU_SERVER_ARGS:
                fail(f"engine.sglang_args.{key}", self.sglang_args[key], f"the CPU server (engine.backend=cpu) "
                     f"takes only {list(CPU_SERVER_ARGS)}; SGLang's own arguments need engine.backend=sglang")


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

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "overlong_buffer_tokens": AT_LEAST_ONE, "overlong_penalty_factor": NON_NEGATIVE,
        "num_workers": Bound(1, 512, why="each is a process holding two of the manager's file descriptors; "
                                         "use at most the cores of the manager's node"),
        "timeout_s": SECONDS, "failure_score": FINITE,
    }

    def __post_init__(self) -> None:
        check_bounds("reward", self, self.BOUNDS)
        if self.name not in BUILTIN_REWARDS and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.name):
            fail("reward.name", self.name, f"use one of {sorted(BUILTIN_REWARDS)} or 'package.module:function' "
                 "(docs/rewards.md)")


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

    BOUNDS: ClassVar[dict[str, Bound]] = {"seed": SEED}

    def __post_init__(self) -> None:
        check_bounds("data", self, self.BOUNDS)


def check_rollout_sections(rollout: RolloutConfig, engine: EngineConfig, reward: RewardConfig) -> None:
    """The constraints across the rollout, engine and reward sections."""
    if reward.overlong_buffer_enable and reward.overlong_buffer_tokens >= rollout.max_response_tokens:
        fail("reward.overlong_buffer_tokens", reward.overlong_buffer_tokens,
             f"must be < rollout.max_response_tokens={rollout.max_response_tokens}; shrink the buffer "
             "or set reward.overlong_buffer_enable=false")
    if engine.backend == "cpu" and engine.engine_tp != 1:
        fail("engine.engine_tp", engine.engine_tp, "the CPU rollout server runs tp=1; set 1")
    sequences, most = rollout.groups_per_request * rollout.n_samples_per_prompt, cpu_max_sequences(engine)
    if most is not None and sequences > most:
        fail("rollout.groups_per_request", rollout.groups_per_request,
             f"x rollout.n_samples_per_prompt={rollout.n_samples_per_prompt} = {sequences} sequences per request, "
             f"the CPU server serves at most {most} (engine.sglang_args.max_sequences); lower either")


def cpu_max_sequences(engine: EngineConfig) -> int | None:
    """Sequences per request the CPU server serves (None: engine.backend=sglang, no such limit)."""
    if engine.backend != "cpu":
        return None
    return int(engine.sglang_args.get("max_sequences", CPU_SERVER_MAX_SEQUENCES))
