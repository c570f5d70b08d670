"""The K controller: QAE's quantile K steered toward a band of one signal, once per rollout step.

What it does: `update` takes the controller's state (the current K and its history window) and
the rollout step's metrics, and returns the next state and the step's `algo/*` metrics; the
decision itself is the pure `next_state` on plain numbers. The rule (README, "K
controller"): the signal (`loss/entropy`, or 1 - `adv/zero_frac`) is averaged over the last
`window` steps measured at the current K; below the band, entropy raises K (more groups in the
easy regime, whose negative-only advantages raise entropy: the paper's "raise K to 0.6 if
entropy collapses"), above it lowers K; for nonzero_adv_frac the moves are the other way round
(a larger K leaves fewer non-zero advantages). K moves by `step`, clamped to [k_min, k_max],
and after a move the window starts empty (hysteresis: K holds for `window` steps). Every rank
calls it with the same metrics (the loss metrics are reduced over DP and shared along the
pipeline; the adv/* metrics come from the DP all-gather), so every rank holds the same K
without a collective of its own. What it does not: compute the signal, or run the advantage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megatron_qae.config.algo import AlgoConfig, KControlConfig


@dataclass(frozen=True)
class KState:
    """The controller between rollout steps; saved in the checkpoint's loop state."""

    k: float
    """K the next rollout step's advantages use."""
    window: tuple[float, ...] = ()
    """Signals of the last steps measured at `k`, oldest first (at most `window` of them)."""

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "window": list(self.window)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> KState:
        return cls(float(state["k"]), tuple(float(v) for v in state["window"]))


def initial_state(algo: AlgoConfig, saved: dict[str, Any] | None) -> KState:
    """The checkpoint's controller state when the run resumes with the controller on, else
    algo.quantile_k with an empty window. A saved K outside this run's [k_min, k_max] is refused."""
    kc = algo.k_control
    if not kc.enabled or saved is None:
        return KState(algo.quantile_k)
    state = KState.from_state_dict(saved)
    if not kc.k_min <= state.k <= kc.k_max:
        raise ValueError(f"the checkpoint's controlled K={state.k} is outside algo.k_control.k_min={kc.k_min} / "
                         f"k_max={kc.k_max}: widen the bounds to include it, or resume with the bounds it was saved with")
    return state


def algo_at(algo: AlgoConfig, state: KState) -> AlgoConfig:
    """`algo` with the controlled K; `algo` itself, untouched, when the controller is off."""
    return dataclasses.replace(algo, quantile_k=state.k) if algo.k_control.enabled else algo


def signal(target: str, metrics: dict[str, float]) -> float | None:
    """The controlled signal of one rollout step; None when the step trained nothing."""
    if target == "entropy":
        return metrics.get("loss/entropy")
    zero = metrics.get("adv/zero_frac")
    return None if zero is None else 1.0 - zero


def next_state(kc: KControlConfig, state: KState, value: float | None) -> KState:
    """One decision. `value` None (no trained step, nothing measured at this K) holds K and window."""
    if value is None:
        return state
    window = (*state.window, value)[-kc.window:]
    if len(window) < kc.window:
        return KState(state.k, window)
    mean = sum(window) / len(window)
    up = 1.0 if kc.target == "entropy" else -1.0  # the direction that raises the signal
    if mean < kc.low:
        move = up
    elif mean > kc.high:
        move = -up
    else:
        return KState(state.k, window)
    # Rounded so that a move up and one down return to the same K, bit for bit.
    k = round(min(max(state.k + move * kc.step, kc.k_min), kc.k_max), 10)
    if k == state.k:  # at a bound: nothing was measured at a new K, so the window goes on
        return KState(k, window)
    return KState(k, ())


def update(algo: AlgoConfig, state: KState, metrics: dict[str, float]) -> tuple[KState, dict[str, float]]:
    """(state for the next rollout step, this step's metrics: `algo/quantile_k` = the K this
    step used, and with the controller on the band and the signal (absent on a step that
    trained nothing) and the K the next step uses)."""
    if algo.baseline != "quantile":
        return state, {}
    kc = algo.k_control
    out = {"algo/quantile_k": state.k}
    if not kc.enabled:
        return state, out
    value = signal(kc.target, metrics)
    new = next_state(kc, state, value)
    out.update({"algo/k_band_low": kc.low, "algo/k_band_high": kc.high, "algo/quantile_k_next": new.k})
    if value is not None:
        out[f"algo/k_signal_{kc.target}"] = value
    return new, out
