"""The demo's report: the summary numbers it prints and the plot of both runs (the runs
themselves are the trainer's, tested by the e2e tests; `make demo` runs them for real)."""

from __future__ import annotations

import pytest

from examples import cpu_demo


def _rows(acc: list[float], zero: float) -> list[dict]:
    rows = []
    for i, a in enumerate(acc, start=1):
        r = {"step": i, "rollout/accuracy_all": a, "adv/zero_frac": zero, "loss/entropy": 1.0 / i,
             "rollout/response_len_mean": 3.0, "perf/goodput_tokens_per_s": 10.0 * i,
             "perf/generated_tokens_per_s": 100.0, "perf/gradient_tokens": 3.0 * i, "perf/generated_tokens": 30.0}
        if i % 5 == 0:
            r.update({"eval/avg@4": a, "eval/pass@4": min(1.0, 2 * a)})
        rows.append(r)
    return rows


def test_summary_and_plot_of_both_runs(tmp_path):
    qae = _rows([0.1 * (i % 5) for i in range(20)], 0.7)
    mean = _rows([0.2] * 20, 0.0)
    s = cpu_demo.summary(qae)
    assert s["accuracy_step1"] == 0.0
    assert s["accuracy_last"] == pytest.approx(sum(0.1 * (i % 5) for i in range(10, 20)) / 10)
    assert s["eval_avg@4"] == pytest.approx(0.4) and s["eval_pass@4"] == pytest.approx(0.8)
    assert s["zero_adv_mean"] == pytest.approx(0.7) and cpu_demo.summary(mean)["zero_adv_last"] == 0.0
    # goodput: mean of 10 i over i = 1..20 = 105; share: sum of 3 i (630) over 20 x 30 generated tokens
    assert s["goodput_mean"] == pytest.approx(105.0) and s["generated_tokens_per_s_mean"] == 100.0
    assert s["gradient_token_share"] == pytest.approx(3 * 210 / 600)
    out = cpu_demo.plot({"qae": qae, "mean": mean}, tmp_path / "demo.png")
    assert out.stat().st_size > 10_000
    assert [t for t, _ in cpu_demo.PANELS] == ["accuracy", "entropy (nats / token)", "zero-advantage share",
                                               "response length (tokens)", "goodput (gradient tokens / s)"]
