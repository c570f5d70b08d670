"""Every numeric field of every config section against NaN, infinities, negative and
out-of-range values; the values issue 28 found accepted; and the ranges held to the libraries
that consume them (torch's Adam and seeds, sockets, SGLang's sampling rules as our CPU server
enforces them, the CPU server's parser).

The walk is generated from the dataclasses: a numeric field added to any section without a
bound fails `test_every_numeric_field_has_a_bound` and every load (check_bounds raises)."""

from __future__ import annotations

import dataclasses
import math
import socket

import pytest
import torch

from megatron_qae.config.loading import Config, load_config
from rollout_sglang.config import CPU_SERVER_ARGS, CPU_SERVER_MAX_SEQUENCES, SGLANG_SHADOWED, RolloutConfig
from rollout_sglang.config_checks import Bound, numeric_fields



def _sections(prefix: str, cls: type) -> dict[str, type]:
    """{dotted section: its dataclass}, nested sections (algo.k_control) included."""
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            name = f"{prefix}.{f.name}" if prefix else f.name
            out[name] = f.default_factory
            out.update(_sections(name, f.default_factory))
    return out


SECTIONS = _sections("", Config)
NUMERIC = [(section, name, kind, nullable) for section, cls in SECTIONS.items()
           for name, (kind, nullable) in numeric_fields(cls).items()]


def test_every_numeric_field_has_a_bound():
    assert len(NUMERIC) > 60  # the walk found the fields
    for section, cls in SECTIONS.items():
        numeric = set(numeric_fields(cls))
        assert numeric == set(getattr(cls, "BOUNDS", {})), f"{section}: bounds {sorted(getattr(cls, 'BOUNDS', {}))}"


def test_a_numeric_field_added_without_a_bound_fails_the_first_load():
    @dataclasses.dataclass(frozen=True)
    class Grown(RolloutConfig):
        new_knob: float = 1.0

    with pytest.raises(TypeError, match="Grown.new_knob has no entry in its BOUNDS"):
        Grown()


def _outside(bound: Bound, kind: str, nullable: bool) -> list:
    """NaN, infinities, negatives, the ends just outside the range, a huge value; None when
    the field is not optional; each kept only if the bound excludes it."""
    if kind == "int":
        near = [bound.low - 1 if not bound.low_open else bound.low, bound.high + 1 if not bound.high_open else bound.high]
    else:
        near = [bound.low if bound.low_open else math.nextafter(bound.low, -math.inf),
                bound.high if bound.high_open else math.nextafter(bound.high, math.inf)]
    huge = [-(10**30), 10**30] if kind == "int" else [-1e30, 1e30]
    values = [v for v in [-1, 0, *near, *huge] if math.isfinite(v) and not bound.contains(v)]
    values = [int(v) for v in values] if kind == "int" else [float(v) for v in values]
    return [math.nan, math.inf, -math.inf, *values, *([] if nullable else [None])]


@pytest.mark.parametrize("section,name,kind,nullable", NUMERIC, ids=[f"{s}.{n}" for s, n, _, _ in NUMERIC])
def test_each_numeric_field_refuses_nan_inf_and_out_of_range(section, name, kind, nullable):
    cls = SECTIONS[section]
    bound = cls.BOUNDS[name]
    for value in _outside(bound, kind, nullable):
        with pytest.raises(ValueError) as refused:
            cls(**{name: value})
        message = str(refused.value)
        assert message.startswith(f"{section}.{name}={value!r}: must be "), message
        assert bound.describe() in message, message
    # The default is inside its own range (the walk above is not refusing everything).
    cls()


def test_bound_ends_are_open_or_closed_as_declared():
    half_open = Bound(0, 1, high_open=True)
    assert [half_open.contains(v) for v in (-1e-12, 0, 0.5, 1 - 1e-12, 1)] == [False, True, True, True, False]
    assert Bound(1, also=(-1,)).contains(-1) and not Bound(1, also=(-1,)).contains(0)
    assert half_open.describe() == "in [0, 1)" and Bound(1, also=(-1,)).describe() == "-1 or >= 1"
    assert Bound(0, low_open=True).describe() == "> 0" and Bound().describe() == "a finite number"


ISSUE_28 = [
    "optim.lr=nan", "optim.lr=inf", "optim.min_lr=nan", "optim.adam_beta1=1.5", "optim.adam_beta2=-0.1",
    "optim.adam_eps=-1", "optim.weight_decay=-5", "optim.clip_grad=nan", "algo.clip_low=nan", "algo.clip_low=1.5",
    "algo.clip_high=inf", "algo.adv_eps=-1", "algo.adv_eps=nan", "algo.tis_cap=nan", "algo.clip_c=nan",
    "algo.kl_coef=nan", "algo.entropy_coef=inf", "rollout.n_samples_per_prompt=2000",
    "rollout.groups_per_request=300", "rollout.temperature=nan", "rollout.temperature=inf", "rollout.top_k=0",
    "rollout.top_k=-5", "run.seed=99999999999999999999", "run.collective_timeout_s=nan",
    "run.rollout_wait_timeout_s=nan", "engine.request_timeout_s=nan", "engine.health_timeout_s=inf",
    "engine.health_interval_s=nan", "engine.startup_timeout_s=-1", "engine.port_base=70000", "engine.port_base=-5",
    "engine.max_restarts=-1", "engine.max_running_requests=0", "engine.sglang_args.not_an_arg=1",
    "reward.timeout_s=nan", "reward.timeout_s=inf", "reward.num_workers=100000", "reward.overlong_penalty_factor=nan",
    "reward.name=no_such_reward", "ray.num_cpus=-2", "ray.num_cpus=0", "train.micro_batch_max_tokens=4",
    "optim.optimizer_overrides.lr=5",
]


@pytest.mark.parametrize("override", ISSUE_28)
def test_the_values_issue_28_found_accepted_are_refused_naming_field_and_value(override):
    key, _, value = override.partition("=")
    with pytest.raises(ValueError) as refused:
        load_config(None, [override])
    message = str(refused.value)
    assert key.rpartition(".")[2] in message and value.lstrip("-").split(".")[0] in message, message


@pytest.mark.parametrize("override,message", [
    ("optim.optimizer_overrides.lr=5", r"optim.optimizer_overrides.lr=5: set by optim.lr; set that instead"),
    ("optim.optimizer_overrides.use_distributed_optimizer=false", "set by parallel.use_distributed_optimizer"),
    ("model.transformer_overrides.num_layers=4", r"set by the model's config.json \(model.path\)"),
    ("model.transformer_overrides.params_dtype=bf16", "set by model.params_dtype"),
    ("parallel.ddp_overrides.use_distributed_optimizer=false", "set by parallel.use_distributed_optimizer"),
    ("engine.sglang_args.tp-size=2", "engine.sglang_args.tp-size=2: set by engine.engine_tp"),
    ("engine.sglang_args.random_seed=3", "set by run.seed"),
    ("engine.sglang_args.not_an_arg=1", r"the CPU server \(engine.backend=cpu\) takes only"),
    ("engine.sglang_args.--port=1", "without leading dashes"),
    ("reward.name=no_such_reward", r"reward.name='no_such_reward': use one of \['arithmetic'"),
    ("rollout.groups_per_request=2000", "must be <= rollout.gen_batch_prompts=1536"),
    ("rollout.groups_per_request=300", "= 4800 sequences per request, the CPU server serves at most 1024"),
    ("rollout.n_samples_per_prompt=2000", "= 2000 sequences per request, the CPU server serves at most 1024"),
    ("run.eval_n_samples=2000", "= 2000 sequences per eval request"),
    ("train.micro_batch_max_tokens=4", r"must be >= 16: every micro-batch row is padded"),
    ("engine.port_base=65500", "engine 0 would start"),
])
def test_cross_field_and_pass_through_refusals_name_the_field_to_use(override, message):
    extra = ["engine.num_engines=2"] if override.startswith("engine.port_base") else []
    with pytest.raises(ValueError, match=message.replace("engine 0", "engine 1")):
        load_config(None, [override, *extra])


def test_refusals_follow_the_parsers_not_the_defaults():
    # A raised CPU-server limit is the one checked; SGLang's backend has no such limit.
    assert load_config(None, ["rollout.n_samples_per_prompt=2000", "rollout.gen_batch_prompts=2000",
                              "engine.sglang_args.max_sequences=4096"]).rollout.n_samples_per_prompt == 2000
    assert load_config(None, ["rollout.n_samples_per_prompt=2000", "engine.backend=sglang",
                              "rollout.max_response_tokens=8192"]).engine.backend == "sglang"
    assert load_config(None, ["reward.name=my_pkg.grader:score"]).reward.name == "my_pkg.grader:score"
    assert load_config(None, ["parallel.tp=2", "parallel.sequence_parallel=true",
                              "train.micro_batch_max_tokens=16"]).train.micro_batch_max_tokens == 16
    with pytest.raises(ValueError, match="must be >= 48"):
        load_config(None, ["parallel.tp=3", "train.micro_batch_max_tokens=32"])


def _adam_accepts(**kw) -> bool:
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], **kw)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("beta", [-0.1, 0.0, 0.5, 0.999, 1.0, 1.5])
def test_adam_betas_follow_torch(beta):
    for name, kw in (("adam_beta1", {"betas": (beta, 0.999)}), ("adam_beta2", {"betas": (0.9, beta)})):
        try:
            load_config(None, [f"optim.{name}={beta}"])
            ours = True
        except ValueError:
            ours = False
        assert ours == _adam_accepts(**kw), (name, beta)


@pytest.mark.parametrize("field,kw,value", [("adam_eps", "eps", -1e-9), ("adam_eps", "eps", 0.0),
                                            ("weight_decay", "weight_decay", -1e-9), ("weight_decay", "weight_decay", 0.0)])
def test_adam_eps_and_weight_decay_follow_torch(field, kw, value):
    try:
        load_config(None, [f"optim.{field}={value}"])
        ours = True
    except ValueError:
        ours = False
    assert ours == _adam_accepts(**{kw: value})


def test_the_largest_seed_survives_torch_and_megatrons_offsets():
    top = Config.__dataclass_fields__["run"].default_factory.BOUNDS["seed"].high
    load_config(None, [f"run.seed={top}", f"data.seed={top}"])
    # megatron's model_parallel_cuda_manual_seed seeds seed + 2718 + tp_rank and
    # seed + 1024 + 100 ep_rank (+ 65536 strides): all must stay in torch's range.
    for seed in (top, top + 2718 + 1023, top + 1024 + 100 * 1023 + 65536 * 1024):
        torch.Generator().manual_seed(seed)
    # And the project's own derived seeds: Clip-Cov's draw (seed * 1_000_003 + step, wrapped)
    # and the prompt order (seed + epoch).
    from megatron_qae.batch.token_selection import selection_generator
    from rollout_sglang.data import PromptCursor

    selection_generator(top, 10**6)
    assert sorted(PromptCursor(10, top).next_indices(10)) == list(range(10))
    with pytest.raises(ValueError, match=r"run.seed=9223372036854775808: must be in \[0, 2\*\*63 - 1\]"):
        load_config(None, [f"run.seed={top + 1}"])
    with pytest.raises(ValueError, match="Overflow"):  # torch's own range ends at 2**64 - 1
        torch.Generator().manual_seed(2**64)


def test_the_port_range_is_the_sockets():
    load_config(None, ["engine.port_base=65535"])
    load_config(None, ["engine.port_base=1"])
    with socket.socket() as s, pytest.raises(OverflowError):
        s.bind(("127.0.0.1", 65536))


@pytest.mark.parametrize("top_k", [-5, -1, 0, 1, 7])
def test_top_k_follows_sglangs_rule_as_the_cpu_server_enforces_it(top_k):
    from rollout_sglang.cpu_server.request_bounds import BadRequest, Bounds, check_sampling

    try:
        load_config(None, [f"rollout.top_k={top_k}"])
        ours = True
    except ValueError:
        ours = False
    try:
        check_sampling({"top_k": top_k, "max_new_tokens": 1}, 1, Bounds(64, 128, 16))
        server = True
    except BadRequest:
        server = False
    assert ours == server


def test_cpu_server_options_are_the_servers_parser(capsys):
    from rollout_sglang.cpu_server import server
    from rollout_sglang.cpu_server.limits import Limits

    with pytest.raises(SystemExit):
        server.main(["--help"])
    options = {word[2:].replace("-", "_") for word in capsys.readouterr().out.split() if word.startswith("--")}
    options = {o.strip(",]") for o in options} - {"help"}
    launcher_sets = {k for k, v in SGLANG_SHADOWED.items() if v} & options | {"fd", "weight_sync_hosts"}
    assert options == set(CPU_SERVER_ARGS) | launcher_sets
    assert Limits().max_sequences == CPU_SERVER_MAX_SEQUENCES
