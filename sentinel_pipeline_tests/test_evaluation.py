"""Evaluation: per-timestamp IC / rank IC vs a pandas reference, classification metrics, baselines."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from sentinel_pipeline.data.split_arrays import TARGET_NAMES
from sentinel_pipeline.training.evaluation import (
    evaluate_predictions,
    per_timestamp_correlations,
    regression_metrics,
    train_baselines,
)
from sentinel_pipeline.training.models import VARIANTS
from sentinel_pipeline_tests.test_data_loader import random_split


def _panel(seed: int = 0, n_ts: int = 120) -> pd.DataFrame:
    """Timestamps with 1..7 symbols each, tied values, a few constant groups and NaNs."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 8, size=n_ts)
    ts = np.repeat(np.arange(n_ts) * 300, sizes)[rng.permutation(sizes.sum())]  # unsorted rows
    y = rng.normal(size=ts.size)
    p = np.round(0.4 * y + rng.normal(size=ts.size), 1)  # rounding makes ties
    p[ts == ts[0]] = 0.5  # one timestamp with a constant prediction
    y[rng.random(ts.size) < 0.03] = np.nan
    return pd.DataFrame({"ts": ts, "p": p, "y": y})


def _reference(df: pd.DataFrame, method: str) -> pd.Series:
    """Straightforward per-timestamp correlation with pandas."""
    out = {}
    for t, g in df.dropna().groupby("ts"):
        if len(g) >= 3 and g["p"].nunique() > 1 and g["y"].nunique() > 1:
            out[t] = g["p"].corr(g["y"], method=method)
    return pd.Series(out).sort_index()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ic_and_rank_ic_match_pandas_per_timestamp(seed):
    df = _panel(seed)
    for method, rank in (("pearson", False), ("spearman", True)):
        ref = _reference(df, method)
        got = per_timestamp_correlations(
            df["p"].to_numpy(), df["y"].to_numpy(), df["ts"].to_numpy(), rank=rank
        )
        np.testing.assert_allclose(got, ref.to_numpy(), rtol=1e-10, atol=1e-12)
    m = regression_metrics(df["p"].to_numpy(), df["y"].to_numpy(), df["ts"].to_numpy(), train_mean=0.1)
    ic_ref, ric_ref = _reference(df, "pearson"), _reference(df, "spearman")
    assert m["ic"] == pytest.approx(ic_ref.mean(), rel=1e-10)
    assert m["rank_ic"] == pytest.approx(ric_ref.mean(), rel=1e-10)
    assert m["icir"] == pytest.approx(ic_ref.mean() / ic_ref.std(ddof=1), rel=1e-9)
    assert m["rank_icir"] == pytest.approx(ric_ref.mean() / ric_ref.std(ddof=1), rel=1e-9)
    assert m["n_ic_timestamps"] == len(ic_ref)
    ok = df.dropna()
    assert m["n"] == len(ok)
    assert m["mse"] == pytest.approx(((ok["p"] - ok["y"]) ** 2).mean())
    assert m["baseline_mse"] == pytest.approx(((ok["y"] - 0.1) ** 2).mean())


def test_perfect_and_inverted_predictors():
    df = _panel(3).dropna()
    y, ts = df["y"].to_numpy(), df["ts"].to_numpy()
    perfect = regression_metrics(y, y, ts, train_mean=0.0)
    assert perfect["ic"] == pytest.approx(1.0) and perfect["rank_ic"] == pytest.approx(1.0)
    assert perfect["mse"] == 0.0
    monotone = regression_metrics(np.exp(y), y, ts, train_mean=0.0)  # same ranks, not linear
    assert monotone["rank_ic"] == pytest.approx(1.0) and monotone["ic"] < 1.0
    inverted = regression_metrics(-y, y, ts, train_mean=0.0)
    assert inverted["ic"] == pytest.approx(-1.0)


def test_undefined_ic_is_none_and_json_strict():
    ts = np.arange(10)  # one symbol per timestamp: no cross-section
    m = regression_metrics(np.arange(10.0), np.arange(10.0), ts, train_mean=0.0)
    assert m["ic"] is None and m["icir"] is None and m["n_ic_timestamps"] == 0
    json.dumps(m, allow_nan=False)


def _classifier_case(seed: int = 0, n: int = 400):
    rng = np.random.default_rng(seed)
    tb_class = rng.choice(3, size=n, p=[0.25, 0.5, 0.25])
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), tb_class] += rng.random(n) < 0.6  # partly informative
    return logits, tb_class


def test_classification_metrics_match_sklearn_and_baseline():
    logits, tb_class = _classifier_case()
    n = len(tb_class)
    targets = np.random.default_rng(1).normal(size=(n, len(TARGET_NAMES)))
    ts = np.repeat(np.arange(n // 4), 4)
    baseline = {"majority_class": 1, "target_means": {}}
    res = evaluate_predictions(
        VARIANTS["transformer_tbm"], {"direction": logits}, targets, TARGET_NAMES, tb_class, ts, baseline
    )
    json.dumps(res, allow_nan=False)
    m = res["heads"]["direction"]
    pred = logits.argmax(1)
    assert m["accuracy"] == pytest.approx((pred == tb_class).mean())
    assert m["macro_f1"] == pytest.approx(f1_score(tb_class, pred, average="macro"))
    assert res["macro_f1"] == m["macro_f1"] and res["n_samples"] == n
    per_class = f1_score(tb_class, pred, average=None)
    assert [m["f1_per_class"][k] for k in ("down", "neutral", "up")] == pytest.approx(list(per_class))
    crosstab = pd.crosstab(tb_class, pred).reindex(index=range(3), columns=range(3), fill_value=0)
    assert m["confusion_matrix"] == crosstab.to_numpy().tolist()
    assert m["class_counts"] == np.bincount(tb_class, minlength=3).tolist()
    # majority-class baseline: always "neutral"
    assert m["baseline_accuracy"] == pytest.approx((tb_class == 1).mean())
    f1_neutral = 2 * (tb_class == 1).mean() / (1 + (tb_class == 1).mean())
    assert m["baseline_macro_f1"] == pytest.approx(f1_neutral / 3)
    assert m["macro_f1"] > m["baseline_macro_f1"]


def test_evaluate_predictions_regression_heads_use_their_targets_and_train_means():
    rng = np.random.default_rng(4)
    n = 300
    targets = rng.normal(size=(n, len(TARGET_NAMES)))
    ts = np.repeat(np.arange(n // 5), 5)
    early = targets[:, TARGET_NAMES.index("early_move")]
    quality = targets[:, TARGET_NAMES.index("tb_return_atr")]
    logits, tb_class = _classifier_case(n=n)
    outputs = {"direction": logits, "early_move": early + rng.normal(size=n), "quality": -quality}
    baseline = {"majority_class": 0, "target_means": {"early_move": 0.2, "tb_return_atr": -0.1}}
    res = evaluate_predictions(
        VARIANTS["seq_ctx_fusion"], outputs, targets, TARGET_NAMES, tb_class, ts, baseline
    )
    heads = res["heads"]
    assert set(heads) == {"direction", "early_move", "quality"}
    assert heads["quality"]["ic"] == pytest.approx(-1.0)
    assert 0.3 < heads["early_move"]["ic"] < 0.95
    assert heads["early_move"]["baseline_mse"] == pytest.approx(np.mean((early - 0.2) ** 2))
    assert heads["quality"]["baseline_mse"] == pytest.approx(np.mean((quality + 0.1) ** 2))
    assert heads["direction"]["baseline_accuracy"] == pytest.approx((tb_class == 0).mean())
    json.dumps(res, allow_nan=False)
    # regression-only variants have no macro_f1 summary
    reg = evaluate_predictions(
        VARIANTS["mlp_two_head"],
        {"early_move": early, "tb_return_atr": quality},
        targets,
        TARGET_NAMES,
        tb_class,
        ts,
        {"majority_class": 1, "target_means": baseline["target_means"]},
    )
    assert "macro_f1" not in reg and reg["heads"]["tb_return_atr"]["mse"] == 0.0


def test_train_baselines_use_train_samples_only():
    split = random_split(seed=9)
    ends = split.sample_end_rows
    split.targets[np.setdiff1d(np.arange(split.n_rows), ends)] = 1e6  # non-sample rows must not count
    split.tb_label[:] = 1
    split.tb_label[ends[: len(ends) // 2 + 1]] = -1  # majority of samples: down
    base = train_baselines(VARIANTS["seq_ctx_fusion"], split)
    assert base["majority_class"] == 0
    assert base["class_counts"] == np.bincount(split.tb_label[ends] + 1, minlength=3).tolist()
    assert base["n_samples"] == len(ends)
    assert set(base["target_means"]) == {"early_move", "tb_return_atr"}
    col = TARGET_NAMES.index("tb_return_atr")
    assert base["target_means"]["tb_return_atr"] == pytest.approx(
        split.targets[ends, col].astype(np.float64).mean()
    )
    json.dumps(base, allow_nan=False)
