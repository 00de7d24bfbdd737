"""The backtest stage: a verified bundle scored on the test split, backtested, compared with the previous
verified bundle of its variant, and written to one output directory. Plain Python (no Dagster).

:func:`run_backtest_stage` refuses a bundle whose verification did not pass (``require_verified``: the
signature of its manifest by a trusted key, its files, and either the manifest digest the caller got
from Dagster's event log or the bundle's verification record), so neither the pipeline nor a script can
backtest an unverified bundle. Nothing is unpickled: the bundle is read with ``load_bundle``.
The bundle directory is only read: everything goes to ``out_dir`` (the pipeline's
``data/artifacts/backtest/<variant>/``), written as one directory that replaces the old one atomically:

====================  ===================================================================
``backtest_report.json``  config, rule as applied, metrics, random baseline, comparison, notes
``backtest.png``          equity (with the random band and the previous bundle) and drawdown
``daily.parquet``         per day: returns, costs, turnover, equity, drawdown, random band, previous
``bars.parquet``          per timestamp: returns, costs, turnover, exposure, equity, drawdown
``trades.parquet``        one row per trade
``positions.parquet``     per test sample: signal, entry side, weight, P&L, cost
``predictions.parquet``   the scored test split (``score_split``)
``random_strategies.parquet``  per strategy of both baselines: daily Sharpe, total return, trades
====================  ===================================================================

A bundle is judged on the test window only when it has not seen it: same feature contract as the test
split, and trained and validated on bars that all lie before the first test sample (a bundle trained
before the data were rebuilt may have trained on what is now the test period), and scalers identical to
those that scaled the test split (the model's inputs must be scaled as in its training). The current
bundle is refused otherwise (:class:`BacktestRefused`); the previous bundle is then just not compared (the
report says why).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sentinel_pipeline.atomic_io import atomic_dir, write_json_atomic
from sentinel_pipeline.bundles import LoadedBundle, load_bundle
from sentinel_pipeline.data.scalers import INFO_FILE, read_scaler_info, scaler_parameter_differences
from sentinel_pipeline.data.split_arrays import SplitArrays
from sentinel_pipeline.evaluation.backtest import (
    BacktestConfig,
    BacktestResult,
    backtest_report,
    compare_backtests,
    plot_backtest,
    resolve_entry_rule,
    rounded,
    run_backtest,
    threshold_from_validation,
)
from sentinel_pipeline.evaluation.predictions import score_split
from sentinel_pipeline.stage_cache import write_record
from sentinel_pipeline.training.data_loader import load_split_for_training
from sentinel_pipeline.verification import require_verified

REPORT_NAME = "backtest_report.json"
PLOT_NAME = "backtest.png"
# bump when the backtest's rules change, so that a stored result is not reused across the change
BACKTEST_RULES_VERSION = 1


@dataclass
class ScoredBacktest:
    """One bundle's backtest on the test split, with how its threshold was set."""

    result: BacktestResult
    predictions: pd.DataFrame
    threshold_source: str  # "config", "validation split" or "not used"


def backtest_loaded_bundle(
    bundle: LoadedBundle,
    test: SplitArrays,
    config: BacktestConfig,
    validation: Callable[[], SplitArrays],
    *,
    random_baseline: bool = True,
) -> ScoredBacktest:
    """Score ``test`` with the bundle's model and backtest it; the holding period defaults to the test
    split's label horizon. When the entry rule is ``threshold`` and no threshold is configured, it is
    fitted on the bundle's own signal over the validation split (``validation()`` loads it lazily)."""
    family_data = getattr(bundle, "family_data", None)  # a family's extra inputs read from the bundle
    predictions = score_split(bundle.model, bundle.arch, test, data=family_data)
    horizon = test.label_params.get("horizon")
    source = "not used"
    if resolve_entry_rule(predictions, config) == "threshold":
        if config.threshold is None:
            val = score_split(bundle.model, bundle.arch, validation(), data=family_data)
            config = dataclasses.replace(config, threshold=threshold_from_validation(val["signal"], config.fraction))
            source = "validation split"
        else:
            source = "config"
    result = run_backtest(predictions, config, horizon=horizon, random_baseline=random_baseline)
    result.info["threshold_source"] = source
    return ScoredBacktest(result, predictions, source)


class BacktestRefused(ValueError):
    """The bundle cannot be backtested on this test split (the message says why)."""


def window_problem(bundle_metadata: Mapping[str, Any], expected_hash: str,
                        test_start: pd.Timestamp) -> str | None:
    """Why a bundle cannot be judged on a test window starting at ``test_start`` (None: it can): its
    feature contract is not the test split's, or its training/validation bars reach into the window
    (a bundle trained before the data were rebuilt may have seen what is now the test period)."""
    bundle_hash = bundle_metadata.get("feature_contract_hash")
    if bundle_hash != expected_hash:
        return f"feature contract {bundle_hash} differs from the test split's {expected_hash}"
    windows = bundle_metadata.get("data_windows") or {}
    ends = []
    for split in ("train", "val"):
        end = (windows.get(split) or {}).get("end")
        if not end:
            return f"its {split} window is not recorded"
        ts = pd.Timestamp(end)
        ends.append(ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC"))
    last = max(ends)
    if last >= test_start:
        return f"it was trained/validated on bars up to {last.isoformat()}, inside this test window (from {test_start.isoformat()})"
    return None


@dataclass
class BacktestOutcome:
    current: ScoredBacktest
    previous: ScoredBacktest | None
    previous_bundle: str | None  # name of the previous bundle looked at
    previous_note: str | None  # why it was not compared, if it was not
    comparison: dict[str, Any] | None
    report: dict[str, Any]
    files: dict[str, Path]


def run_backtest_stage(
    bundle_dir: str | Path,
    expected_hash: str,
    test_h5: str | Path,
    val_h5: str | Path,
    out_dir: str | Path,
    config: BacktestConfig | None = None,
    *,
    previous_dir: str | Path | None = None,
    fingerprint: str | None = None,
    scalers_dir: str | Path | None = None,
    verified_manifest_sha256: str | None = None,
    runtime: str = "torch",
) -> BacktestOutcome:
    """Backtest the verified bundle at ``bundle_dir`` on ``test_h5`` and write ``out_dir`` (see the module
    docstring). Raises ``BundleNotVerifiedError`` for a bundle whose verification does not hold.
    ``fingerprint``: recorded in ``out_dir/.stage.json`` with the outputs' digests (pipeline reuse).
    ``scalers_dir``: the scalers the splits were written with (default ``<artifacts>/scalers`` of the
    ``<artifacts>/hdf5/test.h5`` layout). Raises :class:`BacktestRefused` when the bundle has seen the
    test window or expects other scalers. ``verified_manifest_sha256``: the manifest digest of the passing
    verification from the Dagster event log (see ``verification.require_verified``). ``runtime``: what
    scores the splits, ``"torch"`` or ``"onnx"`` (the bundle's ``model.onnx`` on ONNX Runtime,
    ``bundles.load_bundle``); the previous bundle is scored the same way."""
    config = config or BacktestConfig()
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    scalers_dir = Path(scalers_dir) if scalers_dir is not None else Path(test_h5).parent.parent / "scalers"
    require_verified(bundle_dir, expected_hash, verified_manifest_sha256=verified_manifest_sha256)
    bundle = load_bundle(bundle_dir, expected_hash, runtime=runtime)
    test, _ = load_split_for_training(test_h5, expected_hash)
    val_cache: list[SplitArrays] = []

    def validation() -> SplitArrays:
        if not val_cache:
            val_cache.append(load_split_for_training(val_h5, expected_hash)[0])
        return val_cache[0]

    test_start = _first_sample_time(test)
    problem = window_problem(bundle.metadata, expected_hash, test_start) or scaler_problem(
        bundle_dir, scalers_dir)
    if problem is not None:
        raise BacktestRefused(f"{bundle_dir}: cannot be backtested on {test_h5}: {problem}")
    current = backtest_loaded_bundle(bundle, test, config, validation)
    previous: ScoredBacktest | None = None
    comparison: dict[str, Any] | None = None
    prev_name = Path(previous_dir).name if previous_dir is not None else None
    prev_bundle, note = usable_previous_bundle(previous_dir, expected_hash, test_start, scalers_dir, runtime)
    if prev_bundle is not None:
        previous = backtest_loaded_bundle(prev_bundle, test, config, validation, random_baseline=False)
        comparison = compare_backtests(current.result, previous.result, seed=config.seed)
    extra = {
        "bundle": bundle_dir.name,
        "variant": bundle.variant,
        "runtime": runtime,
        "previous_bundle": prev_name if previous is not None else None,
        "previous_note": note,
        "test_split": {"path": str(test_h5), "n_samples": int(len(current.predictions)),
                       "label_params": dict(test.label_params)},
    }
    report = backtest_report(current.result, comparison, extra=extra)
    files = write_backtest_outputs(out_dir, current, previous, report, fingerprint=fingerprint)
    return BacktestOutcome(current, previous, prev_name, note, comparison, report, files)


def usable_previous_bundle(
    previous_dir: str | Path | None, expected_hash: str, test_start: pd.Timestamp, scalers_dir: str | Path,
    runtime: str = "torch",
) -> tuple[LoadedBundle | None, str | None]:
    """The previous verified bundle loaded for comparison on a test window starting at ``test_start``,
    or ``None`` with the reason it cannot be compared (none, unverified, unreadable, trained on the window,
    other scalers). Used by the window backtest and the ranking evaluation alike."""
    if previous_dir is None:
        return None, "no previous verified bundle of this variant"
    try:
        require_verified(previous_dir)
        bundle = load_bundle(previous_dir, runtime=runtime)
    except ValueError as exc:  # BundleError, BundleNotVerifiedError
        return None, f"previous bundle cannot be used: {exc}"
    note = window_problem(bundle.metadata, expected_hash, test_start) or scaler_problem(previous_dir, scalers_dir)
    return (None, note) if note is not None else (bundle, None)


def scaler_problem(bundle_dir: str | Path, scalers_dir: str | Path) -> str | None:
    """Why the splits under ``scalers_dir``'s pipeline are not scaled as the bundle expects (None: they
    are): the parameters in the bundle's ``scalers.json`` (what the model's inputs are scaled with;
    plain JSON, never a pickle) must equal those of the scalers that scaled the splits."""
    used = Path(scalers_dir) / INFO_FILE
    if not used.is_file():
        return f"{used} (the scalers of the splits) is missing"
    try:
        differences = scaler_parameter_differences(read_scaler_info(Path(bundle_dir) / INFO_FILE),
                                                   read_scaler_info(used))
    except ValueError as exc:
        return str(exc)
    if differences:
        return f"its scalers differ from {used}, which scaled the test split: " + "; ".join(differences)
    return None


def _first_sample_time(split: SplitArrays) -> pd.Timestamp:
    ends = split.sample_end_rows
    if len(ends) == 0:
        raise BacktestRefused(f"the {split.split} split has no samples to backtest")
    return pd.Timestamp(int(split.timestamp[ends].min()), tz="UTC")


def write_backtest_outputs(out_dir: str | Path, current: ScoredBacktest, previous: ScoredBacktest | None,
                           report: Mapping[str, Any], *, fingerprint: str | None = None) -> dict[str, Path]:
    """Write every output into a fresh directory that replaces ``out_dir`` in one rename."""
    out_dir = Path(out_dir)
    res = current.result
    daily = res.daily.copy()
    if previous is not None:
        prev = previous.result.daily.set_index("date")
        daily["previous_net_return"] = prev["net_return"].reindex(daily["date"]).to_numpy()
        daily["previous_equity"] = prev["equity"].reindex(daily["date"]).to_numpy()
    names = {
        "report": REPORT_NAME, "plot": PLOT_NAME, "daily": "daily.parquet", "bars": "bars.parquet",
        "trades": "trades.parquet", "positions": "positions.parquet", "predictions": "predictions.parquet",
    }
    with atomic_dir(out_dir, overwrite=True) as tmp:
        write_json_atomic(tmp / REPORT_NAME, dict(report))
        title = f"{report.get('bundle', '')}: test-period backtest"
        plot_backtest(res, tmp / PLOT_NAME, previous=previous.result if previous else None, title=title)
        daily.to_parquet(tmp / names["daily"], index=False)
        res.bars.to_parquet(tmp / names["bars"], index=False)
        res.trades.to_parquet(tmp / names["trades"], index=False)
        res.positions.to_parquet(tmp / names["positions"], index=False)
        current.predictions.to_parquet(tmp / names["predictions"], index=False)
        if res.random is not None:
            names["random"] = "random_strategies.parquet"
            parts = [pd.DataFrame({"baseline": name, "sharpe_daily": d.sharpe_daily, "total_return": d.total_return,
                                   "n_trades": d.trades_per_strategy})
                     for name, d in (("random", res.random), ("shifted", res.shifted)) if d is not None]
            pd.concat(parts, ignore_index=True).to_parquet(tmp / names["random"], index=False)
        if fingerprint is not None:
            outputs = [tmp / n for n in names.values()]
            # recorded relative to the directory, so the record holds once the directory is renamed
            write_record(tmp, fingerprint, outputs, {"bundle": report.get("bundle")})
    return {k: out_dir / v for k, v in names.items()}


# -- the side-by-side table of all variants ----------------------------------------------------------

COMPARISON_COLUMNS: tuple[str, ...] = (
    "variant", "status", "bundle", "entry_rule", "n_trades", "n_days", "total_return", "sharpe",
    "sharpe_ci", "p_vs_random_sharpe", "p_vs_random_return", "p_vs_shifted_sharpe", "p_vs_shifted_return",
    "max_drawdown", "daily_turnover",
    "gross_exposure", "hit_rate", "mean_trade_return", "delta_sharpe_vs_previous",
)


def comparison_row(variant: str, report: Mapping[str, Any] | None, status: str, digits: int = 3) -> dict[str, Any]:
    """One variant's line of the side-by-side table (numbers rounded to ``digits`` significant digits)."""
    if report is None:
        return {"variant": variant, "status": status, **dict.fromkeys(COMPARISON_COLUMNS[2:], "")}
    m = report.get("metrics", {})
    vs = (report.get("vs_previous") or {}).get("sharpe") or {}
    r = rounded(dict(m), digits)

    def pv(base: str, stat: str) -> Any:
        return rounded(((report.get(base) or {}).get(stat) or {}).get("p_value"), digits)

    ci = ""
    if m.get("sharpe") is not None:
        ci = f"[{rounded(m['sharpe_lower'], digits)}, {rounded(m['sharpe_upper'], digits)}]"
    return {
        "variant": variant, "status": status, "bundle": report.get("bundle", ""),
        "entry_rule": (report.get("rule") or {}).get("entry_rule", ""),
        "n_trades": m.get("n_trades"), "n_days": m.get("n_days"),
        "total_return": r.get("total_return"),
        "sharpe": r.get("sharpe") if m.get("sharpe") is not None else "not reported",
        "sharpe_ci": ci,
        "p_vs_random_sharpe": pv("random_baseline", "sharpe_daily"),
        "p_vs_random_return": pv("random_baseline", "total_return"),
        "p_vs_shifted_sharpe": pv("shifted_baseline", "sharpe_daily"),
        "p_vs_shifted_return": pv("shifted_baseline", "total_return"),
        "max_drawdown": r.get("max_drawdown"), "daily_turnover": r.get("mean_daily_turnover"),
        "gross_exposure": r.get("mean_gross_exposure"), "hit_rate": r.get("hit_rate"),
        "mean_trade_return": r.get("mean_trade_return"),
        "delta_sharpe_vs_previous": rounded(vs.get("delta"), digits) if vs else "",
    }


def comparison_markdown(rows: list[Mapping[str, Any]]) -> str:
    """The rows as a markdown table (None as an empty cell)."""
    cols = list(COMPARISON_COLUMNS)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)
