"""The config tree: YAML + overrides, errors that name field, value and fix, round trip."""

from __future__ import annotations

import pytest

from megatron_qae.config import load_config, save_config, validate_against_model
from tests import tiny


def test_yaml_then_overrides_and_derived_values():
    cfg = load_config("configs/qwen2.5_32b_qae.yaml", ["algo.quantile_k=0.6", "rollout.mini_batch_prompts=64"])
    assert cfg.algo.quantile_k == 0.6 and cfg.parallel.tp == 8
    assert cfg.rollout.steps_per_rollout == 512 // 64
    assert cfg.algo.effective_quantile_k == 0.6 and cfg.algo.can_skip_zero_advantage
    assert load_config(None, ["algo.baseline=mean"]).algo.effective_quantile_k == -1.0


@pytest.mark.parametrize("override,message", [
    (["algo.quantile_kk=0.3"], "algo.quantile_kk"),
    (["algo.quantile_k=1.5"], "algo.quantile_k=1.5"),
    (["rollout.top_p=abc"], "rollout.top_p"),
    (["parallel.tp=0"], "parallel.tp=0"),
    (["rollout.mini_batch_prompts=7"], "rollout.mini_batch_prompts=7: must divide"),
    (["model.transformer_overrides={num_layerz: 2}"], "num_layerz"),
    (["optim.optimizer_overrides={lrr: 1.0}"], "OptimizerConfig has no field 'lrr'"),
    (["algo.clip_c=0.5"], "algo.clip_c=0.5"),
    (["algo.kl_coef=0.1"], "algo.kl_coef=0.1"),
    (["reward.overlong_buffer_tokens=30000"], "reward.overlong_buffer_tokens=30000"),
    (["model.fp8=hybrid"], "model.fp8='hybrid'"),
    (["engine.colocate=true"], "engine.colocate=True"),
    (["quantile_k"], "not key=value"),
])
def test_bad_values_raise_naming_the_field(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, override)


def test_layout_checks_against_the_model():
    hf = tiny.tiny_hf_config()  # 4 heads, 2 kv heads, 2 layers, 128 positions
    cfg = load_config(None, ["parallel.tp=4", "rollout.max_prompt_tokens=8", "rollout.max_response_tokens=8",
                             "reward.overlong_buffer_enable=false"])
    with pytest.raises(ValueError, match="parallel.tp=4: must divide num_attention_heads=4 and num_key_value_heads=2"):
        validate_against_model(cfg, hf)
    with pytest.raises(ValueError, match="parallel.pp=4"):
        validate_against_model(load_config(None, ["parallel.pp=4", "rollout.max_prompt_tokens=8",
                                                  "rollout.max_response_tokens=8",
                                                  "reward.overlong_buffer_enable=false"]), hf)
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        validate_against_model(load_config(None, []), hf)


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config("configs/demo.yaml", ["run.seed=7", "engine.sglang_args={enable_metrics: true}"])
    path = save_config(cfg, tmp_path)
    assert load_config(path, []) == cfg
