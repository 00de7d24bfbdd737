"""The replay runtime: a trained bundle run over the replay window the way a live runtime would run it.

For each timestamp ``T`` of the replay window (:func:`~sentinel_pipeline.replay.config.replay_window_mask`),
in order:

1. the runtime's history is every raw bar with ``timestamp <= T`` (all symbols: ``xs_ret_z`` reads the
   cross-section); features are computed on it with the project's feature code
   (``data.features.compute_features``) under the bundle's contract (the ``FeatureConfig`` is rebuilt
   from the contract and hash-checked, :mod:`~sentinel_pipeline.replay.feature_config`);
2. for each symbol with a bar at ``T`` the model's inputs are built exactly as the HDF5 splits store
   them: the ``seq_len`` rows ending at ``T`` (same symbol, all ``feature_valid``, otherwise no decision:
   signal NaN) scaled with the bundle's seq scaler, the row's snap features with the snap scaler
   (``scalers.transform_filled``), its ``ctx_cat`` codes and its ``ctx_cont`` values (non-finite → 0);
3. the model (eval mode, ``torch.no_grad()``) runs once on the batch of those symbols and
   ``training.models.signal_from_outputs`` gives the signal. The model is the bundle's torch model, or
   its ``model.onnx`` on ONNX Runtime when the bundle was loaded with ``runtime="onnx"``
   (``bundles.load_bundle``); the signal comes from the same family code either way.

Features are recomputed on the whole history at every step (≈ 35 steps for a week of hourly bars),
which is what makes the replay a faithful runtime rather than a slice of a precomputed table. The last
step's history is the whole data (the window is the tail), so its features are the full-table
features; every earlier step's rows are compared with them and the largest difference is reported as
``info["prefix_consistency"]`` (0 when the features are causal, as ``features.py`` promises).

The window's bars then go through :func:`~sentinel_pipeline.replay.trades.simulate_trades`,
:func:`~sentinel_pipeline.replay.metrics.trade_metrics` and the random-entry baseline with the model's
trade count. :func:`replay_comparison` replays the current and the previous bundle on the same bars and
tabulates them against the baseline; :func:`write_replay_outputs` writes the report files.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from sentinel_pipeline.atomic_io import atomic_path
from sentinel_pipeline.data.feature_contract import FEATURE_GROUPS, ContractError, FeatureContract
from sentinel_pipeline.data.features import BAR_COLUMNS, FeatureConfig, compute_features
from sentinel_pipeline.data.labels import symbol_codes_checked, timestamps_ns
from sentinel_pipeline.data.scalers import FittedScalers, transform_filled
from sentinel_pipeline.replay.config import ReplayConfig, barrier_params, replay_window_mask
from sentinel_pipeline.replay.feature_config import feature_config_from_contract
from sentinel_pipeline.replay.metrics import equity_curve, trade_metrics
from sentinel_pipeline.replay.report import compare_reports, jsonable, plot_equity_curves, write_replay_report
from sentinel_pipeline.replay.trades import random_entry_baseline, simulate_trades
from sentinel_pipeline.training.families import get_variant, signal_from_outputs

PARITY_ATOL = 1e-6
REPLAY_BATCH_KIND = "windows"  # the replay builds one window per symbol and step: window families only
KEY_COLUMNS: tuple[str, ...] = ("symbol", "timestamp")


class ReplayableBundle(Protocol):
    """What the replay reads from a bundle (``bundles.LoadedBundle`` provides it)."""

    path: Path
    model: nn.Module
    arch: dict[str, Any]
    variant: str
    contract: FeatureContract
    scalers: FittedScalers
    metadata: dict[str, Any]


@dataclass
class ReplayResult:
    """One bundle replayed on one window.

    ``bars``: one row per window bar in (symbol, timestamp) order: ``symbol, timestamp, signal`` (NaN
    without a decision), ``decided``, ``atr``, ``feature_valid``, then every contract feature as the
    model saw it (seq/snap scaled, ctx_cat codes, ctx_cont). ``raw_features``: the same rows with the
    unscaled features as computed at their step (the form of ``features.arrow``).
    """

    bars: pd.DataFrame
    raw_features: pd.DataFrame
    trades: pd.DataFrame
    metrics: dict[str, Any]
    equity_curve: pd.Series
    baseline_trades: pd.DataFrame
    baseline_metrics: dict[str, Any]
    baseline_equity_curve: pd.Series
    info: dict[str, Any] = field(default_factory=dict)


def scale_features(features: pd.DataFrame, contract: FeatureContract, scalers: FittedScalers) -> dict[str, np.ndarray]:
    """Model inputs per row of a feature table, exactly as the HDF5 splits store them: ``seq``/``snap``
    scaled (non-finite → the scaled centre 0), ``ctx_cat`` int32, ``ctx_cont`` (non-finite → 0)."""
    names = {g: contract.names(g) for g in FEATURE_GROUPS}
    return {
        "seq": transform_filled(scalers.seq, features[names["seq"]].to_numpy(dtype=np.float32)),
        "snap": transform_filled(scalers.snap, features[names["snap"]].to_numpy(dtype=np.float32)),
        "ctx_cat": features[names["ctx_cat"]].to_numpy(dtype=np.int32),
        "ctx_cont": np.nan_to_num(
            features[names["ctx_cont"]].to_numpy(dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0
        ),
    }


def scaled_feature_frame(features: pd.DataFrame, contract: FeatureContract, scalers: FittedScalers) -> pd.DataFrame:
    """``symbol, timestamp`` + every contract feature in its model-input form (see :func:`scale_features`)."""
    scaled = scale_features(features, contract, scalers)
    cols: dict[str, Any] = {k: features[k].to_numpy() for k in KEY_COLUMNS}
    for group in FEATURE_GROUPS:
        for j, name in enumerate(contract.names(group)):
            cols[name] = scaled[group][:, j]
    return pd.DataFrame(cols)


def _window_ok(codes: np.ndarray, valid: np.ndarray, rows: np.ndarray, seq_len: int) -> np.ndarray:
    """For each row: do the ``seq_len`` rows ending at it belong to its symbol and have valid features?"""
    start = rows - seq_len + 1
    inside = start >= 0
    s = np.where(inside, start, 0)
    same = inside & (codes[s] == codes[rows])
    invalid_before = np.r_[0, np.cumsum(~valid)]
    return same & (invalid_before[rows + 1] - invalid_before[s] == 0)


def _predict(bundle: ReplayableBundle, inputs: dict[str, np.ndarray]) -> np.ndarray:
    device = getattr(bundle, "device", None) or next(bundle.model.parameters()).device
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in inputs.items()}
    with torch.no_grad():
        outputs = bundle.model(batch)
        signal = signal_from_outputs(bundle.variant, outputs)
    return signal.detach().float().cpu().numpy().astype(np.float64)


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a − b| over cells; both NaN counts as equal, NaN against a number as infinite."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size == 0:
        return 0.0
    both_nan = np.isnan(a) & np.isnan(b)
    with np.errstate(invalid="ignore"):
        diff = np.where(both_nan, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    return float(diff.max())


def _prepared_raw_bars(raw_bars: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in BAR_COLUMNS if c not in raw_bars.columns]
    if missing:
        raise ValueError(f"replay_bundle: raw bars lack columns {missing} (need {list(BAR_COLUMNS)})")
    raw = raw_bars[list(BAR_COLUMNS)].reset_index(drop=True)
    symbol_codes_checked(raw, "replay_bundle: raw bars")
    if raw.empty:
        raise ValueError("replay_bundle: raw bars are empty")
    return raw


@dataclass
class _Step:
    """What one runtime step produced for the bars at its timestamp (raw row ids ``rows``)."""

    rows: np.ndarray
    signal: np.ndarray
    decided: np.ndarray
    features: pd.DataFrame  # unscaled features of those bars as computed at this step
    scaled: dict[str, np.ndarray]  # their model-input form, per feature group


def _run_step(
    bundle: ReplayableBundle, raw: pd.DataFrame, ts_ns: np.ndarray, t: int, feature_config: FeatureConfig, seq_len: int
) -> tuple[_Step, pd.DataFrame, float, float]:
    """One runtime step at timestamp ``t``: features on the history ``<= t``, then one model call for the
    symbols whose window is complete. Returns the step, the history's features and the feature/model
    seconds."""
    tic = time.perf_counter()
    contract = bundle.contract
    hist_rows = np.flatnonzero(ts_ns <= t)
    hist = raw.take(hist_rows).reset_index(drop=True)
    features = compute_features(hist, feature_config)
    now = np.flatnonzero(ts_ns[hist_rows] == t)
    codes = pd.factorize(hist["symbol"])[0]
    ok = _window_ok(codes, features["feature_valid"].to_numpy(dtype=bool), now, seq_len)
    step_features = features.iloc[now].reset_index(drop=True)
    scaled = scale_features(step_features, contract, bundle.scalers)
    decide = now[ok]
    window_rows = (decide[:, None] + np.arange(-seq_len + 1, 1)).reshape(-1)
    seq_names = contract.names("seq")
    seq = transform_filled(bundle.scalers.seq, features[seq_names].to_numpy(dtype=np.float32)[window_rows])
    feature_seconds = time.perf_counter() - tic
    tic = time.perf_counter()
    signal = np.full(now.size, np.nan)
    if decide.size:
        inputs = {
            "seq": seq.reshape(decide.size, seq_len, len(seq_names)),
            "snap": scaled["snap"][ok],
            "ctx_cat": scaled["ctx_cat"][ok].astype(np.int64),
            "ctx_cont": scaled["ctx_cont"][ok],
        }
        signal[ok] = _predict(bundle, inputs)
    step = _Step(rows=hist_rows[now], signal=signal, decided=ok, features=step_features, scaled=scaled)
    return step, features, feature_seconds, time.perf_counter() - tic


def _bars_frame(steps: list[_Step], order: np.ndarray, contract: FeatureContract) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-bar frame and the unscaled features of all steps, in raw row order."""
    raw_features = pd.concat([s.features for s in steps], ignore_index=True).take(order).reset_index(drop=True)
    raw_features = raw_features[[*KEY_COLUMNS, "atr", *contract.all_names, "feature_valid"]]
    cols: dict[str, Any] = {
        "symbol": raw_features["symbol"].array,
        "timestamp": raw_features["timestamp"].array,
        "signal": np.concatenate([s.signal for s in steps])[order],
        "decided": np.concatenate([s.decided for s in steps])[order],
        "atr": raw_features["atr"].to_numpy(np.float64),
        "feature_valid": raw_features["feature_valid"].to_numpy(bool),
    }
    for group in FEATURE_GROUPS:
        stacked = np.concatenate([s.scaled[group] for s in steps])[order]
        for j, name in enumerate(contract.names(group)):
            cols[name] = stacked[:, j]
    return pd.DataFrame(cols), raw_features


def check_replayable(bundle: ReplayableBundle) -> None:
    """Refuse (``ValueError`` naming the bundle) a bundle whose model family does not read one window
    per sample: the replay rebuilds exactly that input at each step."""
    spec = get_variant(bundle.variant)
    if spec.batch_kind != REPLAY_BATCH_KIND:
        raise ValueError(
            f"{bundle.path}: replay serves models of batch kind {REPLAY_BATCH_KIND!r} only; {spec.name!r} (family "
            f"{spec.family!r}) reads {spec.batch_kind!r} batches. Judge it with the backtest stage "
            "(evaluation.backtest_stage) instead."
        )


def replay_bundle(bundle: ReplayableBundle, raw_bars: pd.DataFrame, config: ReplayConfig | None = None) -> ReplayResult:
    """Replay ``bundle`` on the replay window of ``raw_bars`` (validated bars, ``data.raw_bars`` form,
    sorted by (symbol, timestamp)), one timestamp at a time (see the module docstring). A bundle of a
    family whose batches are not windows is refused (:func:`check_replayable`)."""
    check_replayable(bundle)
    t_start = time.perf_counter()
    config = config or ReplayConfig()
    contract = bundle.contract
    feature_config = feature_config_from_contract(contract)
    seq_len = int(bundle.arch.get("seq_len", contract.seq_len))
    if "label_params" not in bundle.metadata:
        raise ValueError(f"{bundle.path}: bundle metadata has no label_params: cannot set the replay's barriers")
    label_params = dict(bundle.metadata["label_params"])
    barrier_params(label_params)  # refuse bad barriers before the loop
    raw = _prepared_raw_bars(raw_bars)
    ts_ns = timestamps_ns(raw["timestamp"])
    timestamps = np.unique(ts_ns[replay_window_mask(raw["timestamp"], config)])

    was_training = bundle.model.training
    bundle.model.eval()
    steps: list[_Step] = []
    seconds = {"features": 0.0, "model": 0.0}
    features = pd.DataFrame()
    try:
        for t in timestamps:
            step, features, f_sec, m_sec = _run_step(bundle, raw, ts_ns, int(t), feature_config, seq_len)
            steps.append(step)
            seconds["features"] += f_sec
            seconds["model"] += m_sec
    finally:
        if was_training:
            bundle.model.train()

    rows = np.concatenate([s.rows for s in steps])
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    bars_frame, raw_features = _bars_frame(steps, order, contract)
    # the window is the tail of the data, so the last step's history is every bar and its features are
    # the full-table features: compare each step's rows with them (causality check)
    full = features.take(rows)
    prefix_diff = max(
        _max_abs_diff(raw_features[n].to_numpy(np.float64), full[n].to_numpy(np.float64))
        for n in ("atr", *contract.all_names)
    )

    window_bars = raw.take(rows).reset_index(drop=True)[["symbol", "timestamp", "open", "high", "low", "close"]]
    signal = bars_frame["signal"].to_numpy()
    atr = bars_frame["atr"].to_numpy()
    trades = simulate_trades(window_bars, signal, atr, label_params, config)
    metrics = trade_metrics(trades, window_bars, signal, annualisation=config.annualisation)
    baseline = random_entry_baseline(window_bars, atr, len(trades), label_params, config)
    baseline_metrics = trade_metrics(baseline, window_bars, None, annualisation=config.annualisation)
    info = {
        "bundle": str(bundle.path),
        "variant": bundle.variant,
        "runtime": getattr(bundle, "runtime", "torch"),
        "feature_contract_hash": contract.hash,
        "seq_len": seq_len,
        "window_start": pd.Timestamp(int(timestamps[0]), tz="UTC").isoformat(),
        "window_end": pd.Timestamp(int(timestamps[-1]), tz="UTC").isoformat(),
        "n_steps": int(timestamps.size),
        "n_bars": int(rows.size),
        "n_symbols": int(bars_frame["symbol"].nunique()),
        "n_decisions": int(bars_frame["decided"].sum()),
        "label_params": label_params,
        "prefix_consistency": {"max_abs_diff": prefix_diff, "ok": bool(prefix_diff == 0.0)},
        "seconds": {**{k: round(v, 3) for k, v in seconds.items()}, "total": round(time.perf_counter() - t_start, 3)},
    }
    return ReplayResult(
        bars=bars_frame,
        raw_features=raw_features,
        trades=trades,
        metrics=metrics,
        equity_curve=equity_curve(trades, window_bars),
        baseline_trades=baseline,
        baseline_metrics=baseline_metrics,
        baseline_equity_curve=equity_curve(baseline, window_bars),
        info=info,
    )


def feature_parity(
    replay_features: pd.DataFrame,
    dataset_features: pd.DataFrame,
    columns: list[str] | None = None,
    atol: float = PARITY_ATOL,
) -> dict[str, Any]:
    """Train/serve parity: do the replay's features equal the dataset's for the same bars?

    Rows are matched on ``(symbol, timestamp)``; ``columns`` defaults to the columns both frames share
    other than the keys and replay bookkeeping (``signal``, ``decided``). Compare like with like:
    ``ReplayResult.raw_features`` with ``features.arrow``/the labelled dataset, or
    ``ReplayResult.bars`` with :func:`scaled_feature_frame` of the dataset. Both NaN counts as equal.
    Returns ``max_abs_diff``, ``n_compared`` (matched rows × columns), ``n_rows``, ``n_columns``,
    ``n_mismatched`` (cells beyond ``atol``), ``worst`` (column, symbol, timestamp of the largest
    difference) and ``ok`` (``max_abs_diff <= atol`` and at least one cell compared).
    """
    for name, frame in (("replay_features", replay_features), ("dataset_features", dataset_features)):
        missing = [k for k in KEY_COLUMNS if k not in frame.columns]
        if missing:
            raise ValueError(f"feature_parity: {name} lacks key columns {missing}")
    if columns is None:
        skip = {*KEY_COLUMNS, "signal", "decided"}
        columns = [c for c in replay_features.columns if c not in skip and c in dataset_features.columns]
    missing_cols = [c for c in columns if c not in replay_features.columns or c not in dataset_features.columns]
    if missing_cols:
        raise ValueError(f"feature_parity: columns {missing_cols} are not in both frames")
    left = replay_features[[*KEY_COLUMNS, *columns]]
    right = dataset_features[[*KEY_COLUMNS, *columns]]
    merged = left.merge(right, on=list(KEY_COLUMNS), how="inner", suffixes=("__replay", "__dataset"))
    result: dict[str, Any] = {
        "max_abs_diff": 0.0,
        "n_compared": int(len(merged) * len(columns)),
        "n_rows": int(len(merged)),
        "n_columns": len(columns),
        "n_mismatched": 0,
        "worst": None,
        "atol": atol,
    }
    worst = (-1.0, None, -1)
    for c in columns:
        a = merged[f"{c}__replay"].to_numpy(np.float64)
        b = merged[f"{c}__dataset"].to_numpy(np.float64)
        both_nan = np.isnan(a) & np.isnan(b)
        with np.errstate(invalid="ignore"):
            diff = np.where(both_nan, 0.0, np.abs(a - b))
        diff = np.where(np.isnan(diff), np.inf, diff)
        if diff.size:
            result["n_mismatched"] += int((diff > atol).sum())
            i = int(np.argmax(diff))
            if diff[i] > worst[0]:
                worst = (float(diff[i]), c, i)
    if worst[1] is not None:
        result["max_abs_diff"] = worst[0]
        row = merged.iloc[worst[2]]
        result["worst"] = {"column": worst[1], "symbol": str(row["symbol"]), "timestamp": pd.Timestamp(row["timestamp"]).isoformat()}
    result["ok"] = bool(result["n_compared"] > 0 and result["max_abs_diff"] <= atol)
    return result


@dataclass
class ReplayComparison:
    """The current bundle's replay, the previous bundle's (``None`` when there is none or it cannot be
    replayed with this code: ``previous_error`` says why) and the comparison table."""

    current: ReplayResult
    previous: ReplayResult | None
    table: pd.DataFrame
    report: dict[str, Any]
    previous_error: str | None = None


def replay_comparison(
    current: ReplayableBundle,
    previous: ReplayableBundle | None,
    raw_bars: pd.DataFrame,
    config: ReplayConfig | None = None,
) -> ReplayComparison:
    """Replay the current and the previous bundle on the same window and compare them with the random-entry
    baseline of the current model's trade count (:func:`~sentinel_pipeline.replay.report.compare_reports`)."""
    config = config or ReplayConfig()
    cur = replay_bundle(current, raw_bars, config)
    prev: ReplayResult | None = None
    prev_error: str | None = None
    if previous is not None:
        try:
            prev = replay_bundle(previous, raw_bars, config)
        except ContractError as exc:
            prev_error = f"previous bundle {previous.path} cannot be replayed: {exc}"
    table = compare_reports(cur.metrics, prev.metrics if prev else None, cur.baseline_metrics)
    report = {
        "config": asdict(config),
        "current": {"info": cur.info, "metrics": cur.metrics},
        "previous": {"info": prev.info, "metrics": prev.metrics} if prev else None,
        "previous_error": prev_error,
        "baseline": {"kind": "random_entry", "seed": config.baseline_seed, "metrics": cur.baseline_metrics},
        "comparison": jsonable(table.reset_index().to_dict(orient="records")),
    }
    return ReplayComparison(current=cur, previous=prev, table=table, report=report, previous_error=prev_error)


def _write_csv(frame: pd.DataFrame, path: Path, index: bool = False) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index)
    return path


def write_replay_outputs(comparison: ReplayComparison, out_dir: str | Path) -> dict[str, Path]:
    """Write ``replay_report.json``, ``comparison.csv``, ``trades.csv``, ``baseline_trades.csv`` and
    ``equity_curves.png`` into ``out_dir`` (each atomically); returns their paths."""
    out_dir = Path(out_dir)
    curves = {"current": comparison.current.equity_curve, "random baseline": comparison.current.baseline_equity_curve}
    if comparison.previous is not None:
        curves["previous"] = comparison.previous.equity_curve
    return {
        "report": write_replay_report(out_dir / "replay_report.json", comparison.report),
        "comparison": _write_csv(comparison.table, out_dir / "comparison.csv", index=True),
        "trades": _write_csv(comparison.current.trades, out_dir / "trades.csv"),
        "baseline_trades": _write_csv(comparison.current.baseline_trades, out_dir / "baseline_trades.csv"),
        "equity_curves": plot_equity_curves(curves, out_dir / "equity_curves.png"),
    }
