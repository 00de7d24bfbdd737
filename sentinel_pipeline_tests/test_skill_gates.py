"""The statistics behind the verification gate (HAC t, bootstrap, Lo's Sharpe SE) and the gates."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.evaluation import skill_gates as sg
from sentinel_pipeline.evaluation.predictions import head_column
from sentinel_pipeline.evaluation.statistics import (
    block_bootstrap_ci,
    effective_windows,
    hac_mean_test,
    sharpe_ratio_ci,
)


def _overlapping(rng: np.random.Generator, n: int, h: int) -> np.ndarray:
    """Sums of h consecutive iid shocks: the autocorrelation of h-bar forward returns."""
    e = rng.standard_normal(n + h - 1)
    return np.convolve(e, np.ones(h), "valid")


# -- statistics --------------------------------------------------------------------------------


def test_hac_mean_test_has_nominal_size_on_iid_data() -> None:
    rng = np.random.default_rng(0)
    t = np.array([hac_mean_test(rng.standard_normal(500), 5).t for _ in range(400)])
    assert 0.02 <= np.mean(np.abs(t) > 1.96) <= 0.09
    assert abs(np.median(t)) < 0.15


def test_hac_standard_error_widens_for_overlapping_samples() -> None:
    rng = np.random.default_rng(1)
    x = _overlapping(rng, 2000, 20) / math.sqrt(20)
    naive_se = x.std(ddof=1) / math.sqrt(x.size)
    hac = hac_mean_test(x, 40)
    assert hac.se > 3 * naive_se  # long-run sd of an MA(19) is ~sqrt(20) x the marginal sd
    assert hac.lag == 40 and hac.n == 2000


def test_hac_mean_test_detects_a_real_mean_and_refuses_degenerate_input() -> None:
    rng = np.random.default_rng(2)
    assert hac_mean_test(0.3 + rng.standard_normal(400), 4).t > 3
    assert math.isnan(hac_mean_test([1.0, 1.0, 1.0, 1.0], 2).t)
    assert math.isnan(hac_mean_test([0.5, np.nan], 2).t)


def test_block_bootstrap_ci_covers_the_mean_and_is_reproducible() -> None:
    rng = np.random.default_rng(3)
    x = 1.0 + _overlapping(rng, 600, 10) / math.sqrt(10)
    a = block_bootstrap_ci(x, 20, n_boot=400, seed=5)
    b = block_bootstrap_ci(x, 20, n_boot=400, seed=5)
    assert a == b
    assert a.lower < 1.0 < a.upper
    assert a.lower < a.estimate < a.upper


def test_sharpe_ci_matches_the_iid_formula_and_widens_with_autocorrelation() -> None:
    rng = np.random.default_rng(4)
    r = 0.05 + rng.standard_normal(2000)
    est = sharpe_ratio_ci(r, 252, lag=0)
    sr = r.mean() / r.std()
    assert est.sharpe == pytest.approx(sr * math.sqrt(252))
    iid_se = math.sqrt((1 + sr**2 / 2) / r.size) * math.sqrt(252)
    assert est.se == pytest.approx(iid_se, rel=0.1)
    ar = np.empty(2000)
    ar[0] = 0.0
    e = rng.standard_normal(2000)
    for i in range(1, 2000):
        ar[i] = 0.6 * ar[i - 1] + e[i]
    wide, narrow = sharpe_ratio_ci(0.05 + ar, 252, lag=20), sharpe_ratio_ci(0.05 + ar, 252, lag=0)
    assert wide.se > 1.5 * narrow.se
    assert math.isnan(sharpe_ratio_ci([0.1, 0.1, 0.1], 252).sharpe)


def test_effective_windows() -> None:
    assert effective_windows(240, 20) == 12
    assert effective_windows(19, 20) == 0


# -- gate tables -------------------------------------------------------------------------------


def _panel(rng: np.random.Generator, n_sym: int, n_ts: int, skill: float, h: int = 5) -> pd.DataFrame:
    """A table like score_split's: forward returns of horizon h built from overlapping shocks."""
    times = pd.date_range("2024-01-01", periods=n_ts + h, freq="h", tz="UTC")
    rows = []
    for s in range(n_sym):
        shocks = rng.standard_normal(n_ts + h)
        fwd = np.array([shocks[i + 1 : i + 1 + h].sum() for i in range(n_ts)])
        signal = skill * fwd + rng.standard_normal(n_ts) * math.sqrt(h)
        rows.append(pd.DataFrame({"symbol": f"S{s}", "timestamp": times[:n_ts], "signal": signal,
                                  f"fwd_ret_{h}": fwd}))
    return pd.concat(rows, ignore_index=True)


def test_directional_skill_passes_a_skilled_signal_and_fails_a_random_one() -> None:
    rng = np.random.default_rng(5)
    good = sg.directional_skill(_panel(rng, 20, 400, 0.3), 5, min_t=2.0)
    assert good.passed and good.value > 4
    assert good.extra["method"] == "cross_sectional"
    assert good.n_windows == effective_windows(good.n_timestamps, 5)
    ts = [sg.directional_skill(_panel(rng, 20, 400, 0.0), 5, min_t=2.0).value for _ in range(30)]
    assert np.mean(np.asarray(ts) >= 2.0) <= 0.15


def test_directional_skill_uses_the_time_series_ic_for_one_symbol() -> None:
    rng = np.random.default_rng(6)
    one = _panel(rng, 1, 3000, 0.3)
    result = sg.directional_skill(one, 5, min_t=2.0)
    assert result.extra["method"] == "time_series"
    assert result.passed
    noise = sg.directional_skill(_panel(rng, 1, 3000, 0.0), 5, min_t=2.0)
    assert noise.extra["method"] == "time_series" and abs(noise.value) < 3.5


def test_directional_skill_refuses_to_decide_on_too_few_windows() -> None:
    rng = np.random.default_rng(7)
    short = sg.directional_skill(_panel(rng, 20, 40, 1.0), 5, min_t=2.0, min_windows=10)
    assert not short.passed
    assert "not enough data" in short.detail
    assert math.isnan(short.value)


def test_mse_skill_compares_with_the_train_mean_on_winsorised_targets() -> None:
    rng = np.random.default_rng(8)
    pred = _panel(rng, 10, 400, 0.0)
    y = pred["fwd_ret_5"].to_numpy()
    pred["target"] = y
    pred[head_column("head")] = 0.5 * y + 0.3 * rng.standard_normal(y.size)
    good = sg.mse_skill(pred, "head", "target", 0.0, 5, min_t=2.0)
    assert good.passed and good.extra["mse"] < good.extra["baseline_mse"]
    pred[head_column("head")] = rng.standard_normal(y.size)  # worse than the mean predictor
    assert not sg.mse_skill(pred, "head", "target", 0.0, 5, min_t=2.0).passed
    # one absurd target (an unadjusted split) cannot make a near-constant model look good
    spiked = pred.assign(target=np.where(np.arange(y.size) == 7, 1e6, y))
    spiked[head_column("head")] = 0.0
    result = sg.mse_skill(spiked, "head", "target", 100.0, 5, min_t=2.0, winsor_quantile=0.01)
    assert result.extra["winsor_bounds"][1] < 50
    assert not result.passed or result.extra["baseline_mse"] < 1e5


def test_shift_null_passes_aligned_predictions_and_fails_a_constant_or_misaligned_one() -> None:
    rng = np.random.default_rng(9)
    pred = _panel(rng, 10, 400, 0.0)
    fwd = pred["fwd_ret_5"].to_numpy()
    truth = np.digitize(fwd, [-1.0, 1.0])  # 0 down, 1 neutral, 2 up
    noisy = np.where(rng.random(truth.size) < 0.5, truth, rng.integers(0, 3, truth.size))
    table = pred.assign(tb_class=truth, pred_class=noisy)
    good = sg.shift_null_skill(table, 5)
    assert good.passed and good.extra["p_accuracy"] < 0.05
    const = sg.shift_null_skill(table.assign(pred_class=2), 5)
    assert not const.passed
    random = sg.shift_null_skill(table.assign(pred_class=rng.integers(0, 3, truth.size)), 5)
    assert not random.passed or random.value < 1.0


def test_shift_offsets_respect_the_horizon() -> None:
    offsets = sg.shift_offsets(100, 20, 500)
    assert offsets.min() == 20 and offsets.max() == 80
    assert sg.shift_offsets(30, 20, 10).size == 0


def test_gate_result_serialises_nan_as_none() -> None:
    r = sg.GateResult("x", False, "s", float("nan"), 2.0, 0, 0, 0, "d")
    assert r.to_dict()["value"] is None
