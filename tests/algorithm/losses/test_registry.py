"""The policy-loss registry: the config's allowed names are the registered ones, a wrong name
is refused with the names to use, and a loss registered by a new module is what the objective
runs for its name."""

from __future__ import annotations

import pytest
import torch

from megatron_qae.algorithm.aggregation import Aggregation
from megatron_qae.algorithm.losses import registry
from megatron_qae.algorithm.losses.registry import LossInputs, get_policy_loss, register_policy_loss
from megatron_qae.algorithm.objective import metric_names, needs_selection, total_loss
from megatron_qae.config.algo import POLICY_LOSSES, AlgoConfig


def test_config_allows_exactly_the_registered_losses():
    assert sorted(POLICY_LOSSES) == list(registry.policy_loss_names())
    for name in POLICY_LOSSES:
        assert get_policy_loss(name).name == name


def test_unknown_name_names_the_field_the_value_and_the_registered_losses():
    with pytest.raises(ValueError) as err:
        get_policy_loss("vanilla")
    text = str(err.value)
    assert "algo.policy_loss='vanilla'" in text
    assert all(repr(name) in text for name in POLICY_LOSSES)


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="registered twice"):
        register_policy_loss("dapo")(get_policy_loss("dapo").fn)


def test_a_registered_loss_is_what_the_objective_runs(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    calls = []

    @register_policy_loss("dapo_twice", metrics=("loss/dual_clip_tokens", "loss/extra_sum"))
    def twice(x: LossInputs, agg: Aggregation, algo: AlgoConfig):
        loss, metrics = get_policy_loss("dapo").fn(x, agg, algo)
        calls.append(algo)
        return 2.0 * loss, {**metrics, "loss/extra_sum": loss.detach()}

    # The config refuses names it does not list, so the test bypasses its validation.
    algo = AlgoConfig()
    object.__setattr__(algo, "policy_loss", "dapo_twice")
    x = LossInputs(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.2, -1.5]]), torch.ones(1, 2), torch.ones(1, 2))
    agg = Aggregation("token-mean", 2)
    loss, metrics = total_loss(x, agg, algo)
    base, _ = total_loss(x, agg, AlgoConfig())
    assert calls == [algo] and torch.equal(loss, 2.0 * base)
    assert set(metric_names(algo)) == set(metrics) and not needs_selection(algo)
