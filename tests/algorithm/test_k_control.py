"""The K controller against hand-computed sequences: band, direction per target, bounds,
hysteresis (window), steps with nothing trained, state round trip, and its config checks."""

from __future__ import annotations

import pickle

import pytest

from megatron_qae.algorithm import k_control
from megatron_qae.algorithm.k_control import KState, next_state
from megatron_qae.config.algo import AlgoConfig, KControlConfig
from megatron_qae.config.loading import load_config


def _run(kc: KControlConfig, k0: float, signals: list[float | None]) -> list[float]:
    """K after each step."""
    state, ks = KState(k0), []
    for s in signals:
        state = next_state(kc, state, s)
        ks.append(state.k)
    return ks


def test_entropy_below_band_raises_k_above_lowers_it_inside_holds():
    kc = KControlConfig(enabled=True, low=0.3, high=1.0, step=0.05, window=1)
    #         below  below inside  above  above  edge=low edge=high
    signals = [0.1, 0.2, 0.5, 1.5, 2.0, 0.3, 1.0]
    assert _run(kc, 0.4, signals) == [0.45, 0.5, 0.5, 0.45, 0.4, 0.4, 0.4]


def test_nonzero_adv_frac_moves_the_other_way():
    kc = KControlConfig(enabled=True, target="nonzero_adv_frac", low=0.15, high=0.3, step=0.1, window=1)
    # Too few non-zero advantages -> lower K; too many -> raise K (larger K, fewer non-zero).
    assert _run(kc, 0.4, [0.05, 0.05, 0.2, 0.5]) == [0.3, 0.2, 0.2, 0.3]


def test_bounds_clamp_and_a_clamped_step_keeps_the_window():
    kc = KControlConfig(enabled=True, low=0.3, high=1.0, step=0.15, k_min=0.2, k_max=0.6, window=1)
    assert _run(kc, 0.4, [0.0, 0.0, 0.0, 5.0, 5.0, 5.0]) == [0.55, 0.6, 0.6, 0.45, 0.3, 0.2]
    kc2 = KControlConfig(enabled=True, low=0.3, high=1.0, step=0.1, k_min=0.2, k_max=0.5, window=2)
    s = next_state(kc2, KState(0.5, (0.1,)), 0.1)  # at k_max: no move, window goes on
    assert s == KState(0.5, (0.1, 0.1))


def test_window_averages_and_after_a_move_k_holds_for_window_steps():
    kc = KControlConfig(enabled=True, low=0.3, high=1.0, step=0.05, window=3)
    # steps 1-2 fill the window; step 3: mean(0.1, 0.2, 0.3) = 0.2 < 0.3 -> up, window cleared;
    # steps 4-6 at K = 0.45: mean(0.2, 0.9, 0.9) = 0.667 inside -> hold; step 7: window
    # (0.9, 0.9, 0.1) mean 0.633 inside; step 8: (0.9, 0.1, 0.1) = 0.367 inside; step 9:
    # (0.1, 0.1, 0.1) below -> up.
    signals = [0.1, 0.2, 0.3, 0.2, 0.9, 0.9, 0.1, 0.1, 0.1]
    assert _run(kc, 0.4, signals) == [0.4, 0.4, 0.45, 0.45, 0.45, 0.45, 0.45, 0.45, 0.5]
    # A one-step dip does not move K when the window's mean stays in the band (hysteresis).
    assert _run(kc, 0.4, [0.5, 0.5, 0.1, 0.5]) == [0.4] * 4


def test_a_step_without_training_holds_k_and_window():
    kc = KControlConfig(enabled=True, low=0.3, high=1.0, step=0.05, window=2)
    assert _run(kc, 0.4, [0.1, None, 0.1]) == [0.4, 0.4, 0.45]


def test_up_then_down_returns_to_the_same_k_bit_for_bit():
    kc = KControlConfig(enabled=True, low=0.3, high=1.0, step=0.07, window=1)
    ks = _run(kc, 0.4, [0.0] * 5 + [9.0] * 5)
    assert ks[-1] == 0.4 and ks[4] == 0.75


def test_update_logs_k_used_band_signal_and_next_k():
    algo = AlgoConfig(k_control=KControlConfig(enabled=True, low=0.3, high=1.0, step=0.05, window=1))
    state, m = k_control.update(algo, KState(0.4), {"loss/entropy": 0.1, "adv/zero_frac": 0.8})
    assert state == KState(0.45)
    assert m == {"algo/quantile_k": 0.4, "algo/k_band_low": 0.3, "algo/k_band_high": 1.0,
                 "algo/quantile_k_next": 0.45, "algo/k_signal_entropy": 0.1}
    assert k_control.algo_at(algo, state).quantile_k == 0.45
    nz = AlgoConfig(k_control=KControlConfig(enabled=True, target="nonzero_adv_frac", low=0.1, high=0.5))
    _, m = k_control.update(nz, KState(0.4), {"adv/zero_frac": 0.75})
    assert m["algo/k_signal_nonzero_adv_frac"] == 0.25
    _, m = k_control.update(nz, KState(0.4), {})  # nothing trained: no signal logged, K held
    assert "algo/k_signal_nonzero_adv_frac" not in m and m["algo/quantile_k_next"] == 0.4


def test_off_is_the_fixed_k_and_the_same_config_object():
    algo = AlgoConfig(quantile_k=0.6)
    state = k_control.initial_state(algo, {"k": 0.3, "window": []})  # a saved state is ignored when off
    assert state == KState(0.6)
    assert k_control.algo_at(algo, state) is algo
    assert k_control.update(algo, state, {"loss/entropy": 0.0}) == (state, {"algo/quantile_k": 0.6})
    assert k_control.update(AlgoConfig(baseline="mean"), state, {}) == (state, {})


def test_state_round_trips_through_the_checkpoint_format():
    algo = AlgoConfig(k_control=KControlConfig(enabled=True, window=3))
    s = KState(0.45, (0.1, 0.25))
    back = k_control.initial_state(algo, pickle.loads(pickle.dumps(s.state_dict())))
    assert back == s
    assert k_control.initial_state(algo, None) == KState(0.4)
    with pytest.raises(ValueError, match=r"controlled K=0.9 is outside algo.k_control.k_min=0.2 / k_max=0.8"):
        k_control.initial_state(algo, {"k": 0.9, "window": []})


@pytest.mark.parametrize("overrides, match", [
    (["algo.k_control.low=nan"], r"algo.k_control.low=nan: must be a finite number"),
    (["algo.k_control.high=inf"], r"algo.k_control.high=inf: must be a finite number"),
    (["algo.k_control.low=1.0", "algo.k_control.high=0.5"], r"algo.k_control.low=1.0: must be below algo.k_control.high=0.5"),
    (["algo.k_control.target=loss"], r"algo.k_control.target='loss': use one of \['entropy', 'nonzero_adv_frac'\]"),
    (["algo.k_control.target=nonzero_adv_frac", "algo.k_control.high=2"], r"algo.k_control.high=2.0: .*inside \[0, 1\]"),
    (["algo.k_control.k_min=0.6", "algo.k_control.k_max=0.5"], r"algo.k_control.k_min=0.6: must be <= algo.k_control.k_max=0.5"),
    (["algo.k_control.step=0"], r"algo.k_control.step=0.0: must be in \(0, 1\)"),
    (["algo.k_control.window=0"], r"algo.k_control.window=0: must be in \[1, 1000\]"),
    (["algo.k_control.enabled=true", "algo.quantile_k=0.9"], r"algo.quantile_k=0.9: .*\[algo.k_control.k_min=0.2, algo.k_control.k_max=0.8\]"),
    (["algo.k_control.enabled=true", "algo.baseline=mean"], r"algo.k_control.enabled=True: .*set algo.baseline=quantile"),
])
def test_config_refuses_with_field_value_and_fix(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config("configs/test_tiny.yaml", overrides)


def test_config_off_accepts_any_k_and_on_loads_its_keys():
    assert load_config("configs/test_tiny.yaml", ["algo.quantile_k=0.9"]).algo.k_control.enabled is False
    cfg = load_config("configs/test_tiny.yaml", ["algo.k_control.enabled=true", "algo.k_control.window=1",
                                                 "algo.k_control.target=nonzero_adv_frac", "algo.k_control.high=0.5"])
    assert cfg.algo.k_control == KControlConfig(enabled=True, target="nonzero_adv_frac", high=0.5, window=1)


def test_every_rank_holds_the_same_k_as_a_single_process():
    from testsupport import tiny

    proc = tiny.torchrun(tiny.ROOT / "tests" / "dist_workers" / "k_control_worker.py", 2, [], timeout_s=300)
    for rank in range(2):
        for target in ("entropy", "nonzero_adv_frac"):
            assert f"rank {rank}: {target} K equal on 2 ranks" in proc.stdout, proc.stdout[-2000:]
