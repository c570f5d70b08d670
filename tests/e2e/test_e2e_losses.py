"""End to end with the loss variants: 2 trainer ranks, CPU engines, 2 rollout steps of GSPO
(mean baseline), and of DAPO with a KL k3 penalty to the frozen reference plus an entropy bonus
(quantile baseline); their metrics are logged and finite, and the second run says why it
does not skip zero-advantage responses."""

from __future__ import annotations

import math

from megatron_qae.persistence.metrics import read_metrics
from testsupport import tiny


def _rows(run_dir, overrides: list[str]) -> tuple[list[dict], str]:
    proc = tiny.train_run(run_dir, 2, ["run.num_rollout_steps=2", "run.log_tensorboard=false", *overrides])
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["train/optimizer_steps"] > 0
        assert r["train/policy_version"] == r["step"]
    return rows, proc.stdout + proc.stderr


def _finite(rows: list[dict], names: list[str]) -> None:
    for r in rows:
        for name in names:
            assert name in r and math.isfinite(r[name]), (name, r.get(name))


def test_gspo_with_the_mean_baseline(tmp_path):
    rows, terminal = _rows(tmp_path / "run", ["algo.policy_loss=gspo", "algo.baseline=mean"])
    _finite(rows, ["loss/pg_clip_frac", "loss/ratio", "loss/approx_kl", "loss/pg_loss", "loss/loss",
                   "train/grad_norm"])
    assert all("loss/dual_clip_frac" not in r and "loss/kl_ref" not in r for r in rows)
    assert "skip_zero_advantage is off" not in terminal  # GSPO skips exactly


def test_kl_k3_and_entropy_bonus_with_the_quantile_baseline(tmp_path):
    rows, terminal = _rows(tmp_path / "run", ["algo.kl_coef=0.1", "algo.kl_estimator=k3",
                                              "algo.entropy_coef=0.01", "algo.baseline=quantile"])
    _finite(rows, ["loss/kl_ref", "loss/entropy", "loss/pg_clip_frac", "loss/loss", "train/grad_norm"])
    assert rows[0]["loss/kl_ref"] >= 0.0 and rows[1]["loss/kl_ref"] > 0.0  # the policy moved off the reference
    assert all(r["batch/skipped_samples_frac"] == 0.0 for r in rows)
    assert terminal.count("algo.skip_zero_advantage is off") == 1
