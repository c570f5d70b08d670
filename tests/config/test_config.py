"""The config tree: YAML + overrides, errors that name field, value and fix, round trip."""

from __future__ import annotations

import re

import pytest

from megatron_qae.config.loading import Config, load_config, save_config, to_dict, validate_against_model
from testsupport import tiny

# Short lengths so that the tiny model's 128 positions are not the first error hit.
SHORT = ["rollout.max_prompt_tokens=8", "rollout.max_response_tokens=8", "reward.overlong_buffer_enable=false"]


def test_defaults_are_the_dapo_qae_recipe():
    cfg = load_config(None, [])
    assert cfg == Config()
    assert (cfg.algo.quantile_k, cfg.rollout.n_samples_per_prompt, cfg.rollout.prompts_per_step) == (0.4, 16, 512)
    assert cfg.rollout.steps_per_rollout == 512 // 32
    assert cfg.algo.effective_quantile_k == 0.4 and cfg.algo.skip_zero_advantage
    assert cfg.algo.policy_loss == "dapo" and cfg.algo.kl_coef == 0.0 and cfg.algo.entropy_coef == 0.0


def test_yaml_then_overrides_and_derived_values():
    cfg = load_config("configs/qwen2.5_32b_qae.yaml", ["algo.quantile_k=0.6", "rollout.mini_batch_prompts=64"])
    assert cfg.algo.quantile_k == 0.6 and cfg.parallel.tp == 8 and cfg.parallel.pp == 2
    assert cfg.rollout.max_response_tokens == 20480  # from the YAML, untouched by the overrides
    assert cfg.rollout.steps_per_rollout == 512 // 64
    assert load_config(None, ["algo.baseline=mean"]).algo.effective_quantile_k == -1.0
    # The override applied last wins.
    assert load_config(None, ["run.seed=1", "run.seed=2"]).run.seed == 2


@pytest.mark.parametrize("config", ["demo", "test_tiny", "qwen2.5_1.5b_qae", "qwen2.5_7b_qae", "qwen2.5_32b_qae"])
def test_shipped_configs_load(config):
    cfg = load_config(f"configs/{config}.yaml", [])
    assert cfg.algo.baseline == "quantile" and 0 < cfg.algo.quantile_k < 1


def test_the_32b_recipe_is_dapo_plus_qae():
    c = load_config("configs/qwen2.5_32b_qae.yaml", [])
    r, a, o, w = c.rollout, c.algo, c.optim, c.reward
    assert (a.quantile_k, r.n_samples_per_prompt, r.prompts_per_step, r.mini_batch_prompts) == (0.4, 16, 512, 32)
    assert (r.gen_batch_prompts, r.max_gen_batches, r.max_prompt_tokens, r.max_response_tokens) == (1536, 10, 2048, 20480)
    assert (w.overlong_buffer_tokens, w.overlong_penalty_factor, a.clip_low, a.clip_high, a.clip_c) == (4096, 1.0, 0.2, 0.28, 10.0)
    assert (o.lr, o.warmup_steps, o.weight_decay, o.clip_grad, r.val_top_p) == (1e-6, 10, 0.1, 1.0, 0.7)
    assert (c.model.fp8, c.model.fp8_recipe, c.model.params_dtype, c.engine.backend) == ("hybrid", "tensorwise", "bfloat16", "sglang")


@pytest.mark.parametrize("override,message", [
    # unknown keys and wrong types (OmegaConf errors re-raised naming the override and the key)
    (["algo.quantile_kk=0.3"], "override 'algo.quantile_kk=0.3': config key 'algo.quantile_kk'.*quantile_k"),
    (["foo.bar=1"], "config key 'foo'.*known keys here: \\['algo'"),
    (["rollout.top_p=abc"], "config key 'rollout.top_p'.*'abc'.*give a value of type float"),
    (["parallel.tp=2.5"], "config key 'parallel.tp'.*'2.5'.*type int"),
    (["engine.sglang_args=3"], "config key 'engine.sglang_args'.*type dict"),
    (["algo=3"], "override 'algo=3'"),
    (["quantile_k"], "override 'quantile_k' is not key=value"),
    (["engine.num_engines=["], "override 'engine.num_engines=\\[': the value is not valid YAML"),
    # run
    (["run.num_rollout_steps=0"], "run.num_rollout_steps=0: must be >= 1"),
    (["run.save_interval_steps=-1"], "run.save_interval_steps=-1: must be >= 0"),
    (["run.eval_n_samples=0"], "run.eval_n_samples=0"),
    # model
    (["model.params_dtype=float16"], "model.params_dtype='float16': use one of"),
    (["model.fp8=e5m2"], "model.fp8='e5m2'"),
    (["model.fp8=hybrid"], "model.fp8='hybrid': FP8 training needs model.params_dtype=bfloat16"),
    (["model.fp8_recipe=rowwise"], "model.fp8_recipe='rowwise'"),
    (["model.transformer_impl=te"], "model.transformer_impl='te'"),
    (["model.recompute_granularity=full"], "model.recompute_method=None: full recompute needs"),
    (["model.recompute_method=chunk"], "model.recompute_method='chunk'"),
    (["model.transformer_overrides={num_layerz: 2}"], "model.transformer_overrides.num_layerz=2: .*num_layers"),
    # parallel
    (["parallel.tp=0"], "parallel.tp=0: must be >= 1"),
    (["parallel.vpp=2"], "parallel.vpp=2: needs vpp >= 2 and pp >= 2 \\(pp=1\\)"),
    (["parallel.pp=2", "parallel.vpp=1"], "parallel.vpp=1"),
    (["parallel.pp=2", "parallel.vpp=2"], "parallel.vpp=2: the interleaved schedule is not supported yet.*"
                                          "set parallel.vpp=null"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel=True: needs parallel.tp > 1"),
    (["parallel.cp=2"], "parallel.cp=2: context parallelism is not built.*set parallel.cp=1"),
    (["parallel.ddp_overrides={overlap_grad_reduse: true}"], "overlap_grad_reduce"),
    # optim
    (["optim.lr=0"], "optim.lr=0.0: must be > 0"),
    (["optim.min_lr=1e-3"], "optim.min_lr=0.001: must be <= optim.lr=1e-06"),
    (["optim.lr_decay_style=step"], "optim.lr_decay_style='step'"),
    (["optim.optimizer_overrides={lrr: 1.0}"], "OptimizerConfig has no field 'lrr'"),
    # algo
    (["algo.quantile_k=1.5"], "algo.quantile_k=1.5: must be in \\(0, 1\\)"),
    (["algo.quantile_k=0.0"], "algo.quantile_k=0.0"),
    (["algo.baseline=median"], "algo.baseline='median'"),
    (["algo.quantile_method=nearest"], "algo.quantile_method='nearest'"),
    (["algo.quantile_source=reward"], "algo.quantile_source='reward'"),
    (["algo.clip_c=0.5"], "algo.clip_c=0.5: must be > 1 \\(dual clip needs c > 1"),
    (["algo.tis_cap=0"], "algo.tis_cap=0.0"),
    (["algo.clip_high=0"], "algo.clip_high=0.0"),
    (["algo.kl_coef=-0.1"], "algo.kl_coef=-0.1: must be >= 0"),
    (["algo.entropy_coef=-0.01"], "algo.entropy_coef=-0.01: must be >= 0"),
    (["algo.policy_loss=ppo"], "algo.policy_loss='ppo'"),
    (["algo.kl_estimator=k4"], "algo.kl_estimator='k4'"),
    (["algo.clip_cov_ratio=0"], "algo.clip_cov_ratio=0.0: must be in \\(0, 1\\]"),
    (["algo.kl_cov_ratio=2"], "algo.kl_cov_ratio=2.0"),
    (["algo.clip_cov_lb=6"], "algo.clip_cov_lb=6.0: must be below algo.clip_cov_ub=5.0"),
    (["algo.gspo_clip_low=0"], "algo.gspo_clip_low=0.0"),
    # rollout
    (["rollout.mini_batch_prompts=7"], "rollout.mini_batch_prompts=7: must divide rollout.prompts_per_step=512"),
    (["rollout.n_samples_per_prompt=0"], "rollout.n_samples_per_prompt=0"),
    (["rollout.gen_batch_prompts=0"], "rollout.gen_batch_prompts=0"),
    (["rollout.temperature=0"], "rollout.temperature=0.0: must be > 0"),
    (["rollout.top_p=0"], "rollout.top_p=0.0: must be in \\(0, 1\\]"),
    (["rollout.val_top_p=1.5"], "rollout.val_top_p=1.5"),
    # engine
    (["engine.backend=vllm"], "engine.backend='vllm'"),
    (["engine.num_engines=0"], "engine.num_engines=0"),
    (["engine.mem_fraction_static=1.0"], "engine.mem_fraction_static=1.0: must be in \\(0, 1\\)"),
    (["engine.engine_tp=2"], "engine.engine_tp=2: the CPU rollout server runs tp=1"),
    # reward (and the cross-field check against the rollout length)
    (["reward.overlong_buffer_tokens=30000"], "reward.overlong_buffer_tokens=30000: must be < rollout.max_response_tokens=20480"),
    (["reward.num_workers=0"], "reward.num_workers=0"),
    (["train.micro_batch_max_tokens=0"], "train.micro_batch_max_tokens=0"),
])
def test_bad_values_raise_naming_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override)


def test_bad_yaml_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("algo:\n  quantile_k: high\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: config key 'algo.quantile_k'.*'high'"):
        load_config(path, [])
    path.write_text("algoo:\n  quantile_k: 0.3\n")
    with pytest.raises(ValueError, match="config key 'algoo'.*algo"):
        load_config(path, [])
    path.write_text("algo: [\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: not valid YAML"):
        load_config(path, [])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", [])


def test_overlong_buffer_check_is_off_with_the_buffer():
    cfg = load_config(None, ["reward.overlong_buffer_tokens=30000", "reward.overlong_buffer_enable=false"])
    assert cfg.reward.overlong_buffer_tokens == 30000


def test_context_parallel_and_interleaving_are_refused_until_built():
    from megatron_qae.config.sections import ParallelConfig
    from megatron_qae.model.layout import ParallelDims

    with pytest.raises(ValueError, match="parallel.cp=2: context parallelism is not built"):
        ParallelDims.from_config(ParallelConfig(cp=2), 4)
    with pytest.raises(ValueError, match="parallel.vpp=2: the interleaved schedule is not supported"):
        ParallelDims.from_config(ParallelConfig(pp=2, vpp=2), 4)


def test_dp_degree_and_its_error():
    from megatron_qae.model.layout import ParallelDims

    p = load_config(None, ["parallel.tp=2", "parallel.pp=2"]).parallel
    assert ParallelDims.from_config(p, 8).dp == 2 and ParallelDims.from_config(p, 4).dp == 1
    with pytest.raises(ValueError, match="world size 6 is not divisible by tp\\*pp\\*cp = 4"):
        ParallelDims.from_config(p, 6)


def test_layout_checks_against_the_model():
    hf = tiny.tiny_hf_config()  # 4 heads, 2 kv heads, 2 layers, vocab 64, 128 positions
    validate_against_model(load_config(None, ["parallel.tp=2", "parallel.pp=2", *SHORT]), hf)
    cases = [
        (["parallel.tp=4"], "parallel.tp=4: must divide num_attention_heads=4 and num_key_value_heads=2"),
        (["parallel.pp=4"], "parallel.pp=4: pp\\*vpp=4 must divide num_hidden_layers=2"),
        ([], "rollout.max_response_tokens=20480: prompt \\+ response = 22528 exceeds the model's "
             "max_position_embeddings=128"),
    ]
    for override, message in cases:
        with pytest.raises(ValueError, match=message):
            validate_against_model(load_config(None, [*SHORT, *override] if override else []), hf)
    with pytest.raises(ValueError, match="parallel.tp=2: must divide vocab_size=63"):
        validate_against_model(load_config(None, ["parallel.tp=2", *SHORT]), {**hf, "vocab_size": 63})
    sglang = ["engine.backend=sglang", *SHORT]
    with pytest.raises(ValueError, match="engine.engine_tp=3: must divide num_attention_heads=4"):
        validate_against_model(load_config(None, [*sglang, "engine.engine_tp=3"]), hf)
    validate_against_model(load_config(None, [*sglang, "engine.engine_tp=4"]), hf)  # kv heads replicated


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config("configs/qwen2.5_32b_qae.yaml", ["run.seed=7", "engine.sglang_args={enable_metrics: true}",
                                                       "model.transformer_overrides={apply_rope_fusion: false}"])
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    again = load_config(path, [])
    assert again == cfg and to_dict(again) == to_dict(cfg)
    assert to_dict(cfg)["engine"]["sglang_args"] == {"enable_metrics": True}


def test_tis_cap_null_is_auto_on_with_fp8_and_an_explicit_value_wins():
    # FP8 training against bf16 sampling: the trainer's old log-probs are not the sampler's.
    fp8 = load_config("configs/test_tiny.yaml", ["model.fp8=hybrid", "model.params_dtype=bfloat16"])
    assert fp8.algo.tis_cap is None and fp8.loss_algo.tis_cap == 2.0
    assert load_config("configs/test_tiny.yaml", []).loss_algo.tis_cap is None
    explicit = load_config("configs/test_tiny.yaml", ["model.fp8=e4m3", "model.params_dtype=bfloat16",
                                                      "algo.tis_cap=1.5"])
    assert explicit.loss_algo.tis_cap == 1.5
    assert load_config("configs/test_tiny.yaml", ["algo.tis_cap=3"]).loss_algo.tis_cap == 3.0
    # The shipped FP8 recipe trains with it; one-step off-policy needs no explicit cap then.
    assert load_config("configs/qwen2.5_32b_qae.yaml", []).loss_algo.tis_cap == 2.0
    off_policy = load_config("configs/test_tiny.yaml", ["model.fp8=hybrid", "model.params_dtype=bfloat16",
                                                        "rollout.async_steps=1"])
    assert off_policy.loss_algo.tis_cap == 2.0
