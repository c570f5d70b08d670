"""The `algo` section of the run config: baseline, policy loss and its terms.

What it does: one frozen dataclass, a docstring per field, per-field validation (ValueError
naming field, value and fix; every numeric field has a `BOUNDS` entry). What it does not: load files (loading.py) or cross-section checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from rollout_sglang.config_checks import (FINITE, NON_NEGATIVE, POSITIVE, UNIT_OPEN, Bound,
                                          check_bounds, fail as _fail, one_of as _one_of)

FP8_TIS_CAP = 2.0
"""algo.tis_cap when it is null and model.fp8 is on: every trainer forward (old log-probs and
reference included) runs in FP8 while the engines sample in bf16, so the trainer's old
log-probs are not the sampling policy's; the truncated weight exp(old - rollout) <= 2 corrects
the loss for that gap (docs/scale.md, "FP8 training against bf16 sampling")."""

POLICY_LOSSES = ("dapo", "gspo", "clip_cov", "kl_cov")
"""The allowed algo.policy_loss values: the names megatron_qae/algorithm/losses/ registers (a
test holds the two equal; the config does not import the losses)."""


K_CONTROL_TARGETS = ("entropy", "nonzero_adv_frac")
"""The signals algo.k_control can steer: the policy's mean token entropy over the trained
responses (`loss/entropy`, nats/token), or the share of the batch's responses with a non-zero
advantage (1 - `adv/zero_frac`)."""


@dataclass(frozen=True)
class KControlConfig:
    """algo.k_control: K of the QAE baseline steered toward a band of one signal
    (megatron_qae/algorithm/k_control.py; README, "K controller")."""

    enabled: bool = False
    """Steer K once per rollout step; off = the fixed algo.quantile_k, exactly as without it."""
    target: str = "entropy"
    """'entropy' (K up below the band, down above it) or 'nonzero_adv_frac' (K down below the
    band, up above it: a larger K gives fewer non-zero advantages)."""
    low: float = 0.3
    """Lower edge of the target band (entropy: nats/token; nonzero_adv_frac: a share)."""
    high: float = 1.0
    """Upper edge of the target band; inside [low, high] K holds."""
    step: float = 0.05
    """How far K moves in one decision (at most one decision per rollout step)."""
    k_min: float = 0.2
    """Smallest K the controller sets."""
    k_max: float = 0.8
    """Largest K the controller sets."""
    window: int = 2
    """Hysteresis: the signal compared with the band is the mean of the last `window` rollout
    steps measured at the current K; after K moves the window starts empty, so K holds for at
    least `window` steps."""

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "low": NON_NEGATIVE, "high": POSITIVE,
        "step": Bound(0, 1, low_open=True, high_open=True, why="a change of the quantile K"),
        "k_min": UNIT_OPEN, "k_max": UNIT_OPEN,
        "window": Bound(1, 1000, why="rollout steps of history"),
    }

    def __post_init__(self) -> None:
        check_bounds("algo.k_control", self, self.BOUNDS)
        _one_of("algo.k_control.target", self.target, K_CONTROL_TARGETS)
        if self.low >= self.high:
            _fail("algo.k_control.low", self.low, f"must be below algo.k_control.high={self.high}")
        if self.target == "nonzero_adv_frac" and self.high > 1:
            _fail("algo.k_control.high", self.high, "nonzero_adv_frac is a share: set a band inside [0, 1]")
        if self.k_min > self.k_max:
            _fail("algo.k_control.k_min", self.k_min, f"must be <= algo.k_control.k_max={self.k_max}")


@dataclass(frozen=True)
class AlgoConfig:
    baseline: str = "quantile"
    """Group baseline: 'quantile' (QAE) or 'mean' (GRPO / DAPO)."""
    quantile_k: float = 0.4
    """K of the QAE baseline, in (0, 1); raise to 0.6 if entropy collapses early."""
    quantile_method: str = "linear"
    """'linear' (torch.quantile, as the public code) or 'inverted_cdf' (the paper's definition)."""
    quantile_source: str = "score"
    """Quantile over 'score' (shaped reward) or 'accuracy' (0/1 correctness before shaping)."""
    norm_adv_by_std: bool = True
    """Divide advantages by the group's unbiased std (+ adv_eps)."""
    adv_eps: float = 1e-6
    """Epsilon of the std normalization."""
    clip_low: float = 0.2
    """PPO clip below: ratio >= 1 - clip_low."""
    clip_high: float = 0.28
    """PPO clip above (DAPO clip-higher): ratio <= 1 + clip_high."""
    clip_c: float | None = 10.0
    """Dual-clip bound for negative advantages (> 1); None disables it."""
    tis_cap: float | None = None
    """Truncated importance-sampling cap on trainer/rollout probability ratios; None = auto:
    FP8_TIS_CAP (2.0) with model.fp8 (FP8 training against bf16 sampling), else off; an
    explicit value wins (`effective_tis_cap`)."""
    skip_zero_advantage: bool = True
    """Leave responses with advantage exactly 0 out of forward/backward (same update); turned
    off for the run, with a log line, when the loss gives them a gradient (KL, entropy bonus,
    clip_cov, kl_cov)."""
    policy_loss: str = "dapo"
    """Policy loss: 'dapo' (clipped token-mean), 'gspo' (sequence ratio, sequence-mean),
    'clip_cov' or 'kl_cov' (covariance token selection, verl 0.9.1's rules)."""
    gspo_clip_low: float = 3e-4
    """GSPO: sequence ratio >= 1 - gspo_clip_low (GSPO paper: 3e-4)."""
    gspo_clip_high: float = 4e-4
    """GSPO: sequence ratio <= 1 + gspo_clip_high (GSPO paper: 4e-4)."""
    clip_cov_ratio: float = 2e-4
    """Clip-Cov: share of a mini-batch's response tokens whose gradient is dropped."""
    clip_cov_lb: float = 1.0
    """Clip-Cov: lower covariance bound of the candidate tokens."""
    clip_cov_ub: float = 5.0
    """Clip-Cov: upper covariance bound of the candidate tokens."""
    kl_cov_ratio: float = 2e-4
    """KL-Cov: share of a mini-batch's response tokens (largest covariance) that get the penalty."""
    kl_cov_coef: float = 1.0
    """KL-Cov: coefficient of the |log-ratio| penalty (verl's ppo_kl_coef)."""
    kl_coef: float = 0.0
    """KL penalty to the frozen initial policy (a reference forward each rollout step); 0 = off (DAPO)."""
    kl_estimator: str = "k3"
    """KL estimator: 'k1', 'k2', 'k3' or 'low_var_kl' (= k3), as verl's kl_penalty."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (loss -= coef * entropy); 0 = off (DAPO)."""
    k_control: KControlConfig = field(default_factory=KControlConfig)
    """Steering of quantile_k toward a band of entropy or non-zero-advantage share; off by default."""

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "quantile_k": Bound(0, 1, low_open=True, high_open=True, why="the QAE quantile; 0.4 recommended"),
        "adv_eps": Bound(0, low_open=True, why="added to the group std, which is 0 for an all-equal group"),
        "clip_low": Bound(0, 1, low_open=True, high_open=True, why="the ratio's floor 1 - clip_low stays > 0"),
        "clip_high": POSITIVE,
        "clip_c": Bound(1, low_open=True, why="dual clip needs c > 1, DAPO uses 10; or null"),
        "tis_cap": POSITIVE,
        "gspo_clip_low": UNIT_OPEN, "gspo_clip_high": POSITIVE,
        "clip_cov_ratio": Bound(0, 1, low_open=True, why="a share of tokens, verl default 2e-4"),
        "clip_cov_lb": FINITE, "clip_cov_ub": FINITE,
        "kl_cov_ratio": Bound(0, 1, low_open=True, why="a share of tokens, verl default 2e-4"), "kl_cov_coef": POSITIVE,
        "kl_coef": Bound(0, why="0 turns the term off"), "entropy_coef": Bound(0, why="0 turns the term off"),
    }

    def __post_init__(self) -> None:
        check_bounds("algo", self, self.BOUNDS)
        _one_of("algo.baseline", self.baseline, ("quantile", "mean"))
        _one_of("algo.quantile_method", self.quantile_method, ("linear", "inverted_cdf"))
        _one_of("algo.quantile_source", self.quantile_source, ("score", "accuracy"))
        if self.tis_cap is not None and self.tis_cap <= 0:
            _fail("algo.tis_cap", self.tis_cap, "must be > 0, or null")
        self._check_loss_variants()
        self._check_k_control()

    def _check_k_control(self) -> None:
        kc = self.k_control
        if not kc.enabled:
            return
        if self.baseline != "quantile":
            _fail("algo.k_control.enabled", kc.enabled, f"steers the quantile baseline's K; algo.baseline="
                  f"{self.baseline!r} has none: set algo.baseline=quantile or algo.k_control.enabled=false")
        if not kc.k_min <= self.quantile_k <= kc.k_max:
            _fail("algo.quantile_k", self.quantile_k, f"the controller starts from it: must be in "
                  f"[algo.k_control.k_min={kc.k_min}, algo.k_control.k_max={kc.k_max}]; move K or the bounds")

    def _check_loss_variants(self) -> None:
        _one_of("algo.policy_loss", self.policy_loss, POLICY_LOSSES)
        _one_of("algo.kl_estimator", self.kl_estimator, ("k1", "k2", "k3", "low_var_kl"))
        if self.clip_cov_lb >= self.clip_cov_ub:
            _fail("algo.clip_cov_lb", self.clip_cov_lb, f"must be below algo.clip_cov_ub={self.clip_cov_ub}")

    def effective_tis_cap(self, fp8: bool) -> float | None:
        """The truncated-IS cap the loss applies: algo.tis_cap when set; when null, FP8_TIS_CAP
        with FP8 training (`fp8` = model.fp8 is set), else None (off)."""
        if self.tis_cap is not None:
            return self.tis_cap
        return FP8_TIS_CAP if fp8 else None

    @property
    def effective_quantile_k(self) -> float:
        """K passed to the advantage (-1 = mean baseline)."""
        return self.quantile_k if self.baseline == "quantile" else -1.0
