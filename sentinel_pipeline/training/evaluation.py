"""Evaluation metrics of a variant's predictions, with train-set baselines.

:func:`evaluate_predictions` returns a JSON-able dict::

    {"n_samples": N,
     "heads": {head name: metrics},
     "macro_f1": <macro-F1 of the first classification head>}     # classifier variants only

Regression head metrics: ``mse``; ``baseline_mse`` (predicting the TRAIN mean of the target);
``ic`` / ``rank_ic``: the Pearson / Spearman correlation of prediction and target computed per
timestamp across symbols (timestamps with at least :data:`MIN_SYMBOLS_PER_TIMESTAMP` samples; a
timestamp where prediction or target is constant is skipped) and averaged over timestamps;
``icir`` / ``rank_icir`` = mean / std (ddof=1) of those per-timestamp values; ``n_ic_timestamps``.
Samples with a non-finite target or prediction are left out (``n`` counts the rest).

Classification head metrics (argmax of the logits vs ``tb_class``; classes 0 = down, 1 = neutral,
2 = up): ``accuracy``, ``macro_f1``, ``f1_per_class`` {down, neutral, up}, ``confusion_matrix``
(rows = true class, sklearn's convention), ``class_counts``, and the majority-class baseline (always
predicting the TRAIN majority class) ``baseline_accuracy`` / ``baseline_macro_f1``.

Values are Python floats/ints; a metric that is undefined (e.g. no timestamp with enough symbols)
is ``None``, never NaN, so the dict serialises as strict JSON. :func:`train_baselines` computes the
``baseline`` argument from the train split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from sentinel_pipeline.data.split_arrays import SplitArrays
from sentinel_pipeline.training.families.base import N_CLASSES, VariantSpec

MIN_SYMBOLS_PER_TIMESTAMP = 3
CLASS_NAMES: tuple[str, ...] = ("down", "neutral", "up")


def _float(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def per_timestamp_correlations(
    pred: np.ndarray,
    target: np.ndarray,
    timestamps: np.ndarray,
    *,
    rank: bool = False,
    min_group: int = MIN_SYMBOLS_PER_TIMESTAMP,
) -> np.ndarray:
    """Correlation of ``pred`` and ``target`` within each timestamp with ``>= min_group`` samples.

    Pearson, or Spearman (average ranks for ties) with ``rank=True``. Timestamps where either side is
    constant are dropped. Returns the correlations in timestamp order. Vectorised over all groups.
    """
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    ok = np.isfinite(pred) & np.isfinite(target)
    _, group, counts = np.unique(np.asarray(timestamps)[ok], return_inverse=True, return_counts=True)
    keep = counts[group] >= min_group
    x, y, g = pred[ok][keep], target[ok][keep], group[keep]
    if g.size == 0:
        return np.empty(0)
    order = np.argsort(g, kind="stable")
    x, y, g = x[order], y[order], g[order]
    _, g = np.unique(g, return_inverse=True)  # compact 0..G-1, sorted
    if rank:
        ranks = pd.DataFrame({"g": g, "x": x, "y": y}).groupby("g")[["x", "y"]].rank(method="average")
        x, y = ranks["x"].to_numpy(np.float64), ranks["y"].to_numpy(np.float64)
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    varies = (np.maximum.reduceat(x, starts) > np.minimum.reduceat(x, starts)) & (
        np.maximum.reduceat(y, starts) > np.minimum.reduceat(y, starts)
    )
    n = np.bincount(g)
    dx = x - (np.bincount(g, x) / n)[g]
    dy = y - (np.bincount(g, y) / n)[g]
    sxy, sxx, syy = np.bincount(g, dx * dy), np.bincount(g, dx * dx), np.bincount(g, dy * dy)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = sxy / np.sqrt(sxx * syy)
    return np.clip(corr[varies], -1.0, 1.0)


def _ic_summary(values: np.ndarray) -> tuple[float | None, float | None]:
    """(mean, mean / std) of per-timestamp correlations; None where undefined."""
    if values.size == 0:
        return None, None
    mean = float(values.mean())
    if values.size < 2:
        return mean, None
    std = float(values.std(ddof=1))
    return mean, (mean / std if std > 0 else None)


def regression_metrics(
    pred: np.ndarray, target: np.ndarray, timestamps: np.ndarray, train_mean: float
) -> dict[str, Any]:
    """MSE, train-mean baseline MSE, IC / rank IC / ICIR of one regression head."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    ok = np.isfinite(pred) & np.isfinite(target)
    p, y, ts = pred[ok], target[ok], np.asarray(timestamps)[ok]
    ic_values = per_timestamp_correlations(p, y, ts)
    ric_values = per_timestamp_correlations(p, y, ts, rank=True)
    ic, icir = _ic_summary(ic_values)
    rank_ic, rank_icir = _ic_summary(ric_values)
    return {
        "n": int(ok.sum()),
        "mse": _float(np.mean((p - y) ** 2)) if y.size else None,
        "baseline_mse": _float(np.mean((y - train_mean) ** 2)) if y.size else None,
        "ic": ic,
        "icir": icir,
        "rank_ic": rank_ic,
        "rank_icir": rank_icir,
        "n_ic_timestamps": int(ic_values.size),
    }


def classification_metrics(logits: np.ndarray, tb_class: np.ndarray, majority_class: int) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class F1, confusion matrix and majority-class baseline (sklearn)."""
    y_true = np.asarray(tb_class, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(logits).reshape(len(y_true), -1).argmax(axis=1)
    labels = list(range(N_CLASSES))
    baseline = np.full_like(y_true, int(majority_class))
    per_class = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "n": int(y_true.size),
        "accuracy": float(accuracy_score(y_true, y_pred)) if y_true.size else None,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "f1_per_class": {name: float(v) for name, v in zip(CLASS_NAMES, per_class, strict=True)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_counts": np.bincount(y_true, minlength=N_CLASSES).tolist(),
        "baseline_accuracy": float(accuracy_score(y_true, baseline)) if y_true.size else None,
        "baseline_macro_f1": float(
            f1_score(y_true, baseline, labels=labels, average="macro", zero_division=0)
        ),
    }


def evaluate_predictions(
    spec: VariantSpec,
    outputs_np: dict[str, np.ndarray],
    targets: np.ndarray,
    target_names: Sequence[str],
    tb_class: np.ndarray,
    timestamps: np.ndarray,
    baseline: dict[str, Any],
) -> dict[str, Any]:
    """Metrics of every head of ``spec`` (see module docstring); ``baseline`` from :func:`train_baselines`."""
    target_names = list(target_names)
    heads: dict[str, dict[str, Any]] = {}
    for head in spec.heads:
        if head.kind == "classification":
            heads[head.name] = classification_metrics(
                outputs_np[head.name], tb_class, baseline["majority_class"]
            )
        else:
            column = np.asarray(targets)[:, target_names.index(head.target)]
            heads[head.name] = regression_metrics(
                outputs_np[head.name], column, timestamps, baseline["target_means"][head.target]
            )
    result: dict[str, Any] = {"n_samples": int(len(tb_class)), "heads": heads}
    first_classifier = next((h for h in spec.heads if h.kind == "classification"), None)
    if first_classifier is not None:
        result["macro_f1"] = heads[first_classifier.name]["macro_f1"]
    return result


def _regression_targets(spec: VariantSpec) -> list[str]:
    return list(dict.fromkeys(h.target for h in spec.heads if h.kind == "regression"))


def train_baselines(spec: VariantSpec, train_split: SplitArrays) -> dict[str, Any]:
    """Train-sample statistics the baselines use: target means, class counts, majority class.

    ``{"target_means": {target: mean over train samples}, "class_counts": [down, neutral, up],
    "majority_class": int (ties → the lowest class), "n_samples": int}``.
    """
    ends = np.asarray(train_split.sample_end_rows, dtype=np.int64)
    counts = np.bincount(np.asarray(train_split.tb_label)[ends].astype(np.int64) + 1, minlength=N_CLASSES)
    means: dict[str, float] = {}
    for name in _regression_targets(spec):
        values = np.asarray(train_split.target(name))[ends].astype(np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise ValueError(
                f"train split {train_split.split!r}: target {name!r} has no finite value at a sample"
            )
        means[name] = float(values.mean())
    return {
        "target_means": means,
        "class_counts": counts.tolist(),
        "majority_class": int(counts.argmax()),
        "n_samples": int(ends.size),
    }
