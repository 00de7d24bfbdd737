"""Test-period backtest assets (one per variant) and the side-by-side ``variant_comparison``.

``backtest_<variant>`` scores the test split with the variant's current bundle and backtests it
(``sentinel_pipeline.evaluation.backtest``), with a random-strategy distribution and the previous
verified bundle on the same window. Outputs go to ``data/artifacts/backtest/<variant>/``; nothing is
written into the bundle. Like replay, it never runs on a bundle whose latest verification did not pass:

- in the same run: the bundle's ``bundle_verified`` check is blocking, so a failure skips the backtest;
- in a later run (UI or CLI): the asset reads the latest evaluation of that check from the Dagster
  event log and refuses, naming the failed check, unless it passed; the manifest sha256 that
  evaluation recorded is the trust anchor (``require_verified(..., verified_manifest_sha256=...)``:
  signature, files, and the current manifest has exactly that digest), never a file in the bundle;
- by automation: its automation condition requires every blocking check of its dependencies to pass.

Unchanged inputs (same bundle and manifest, previous bundle, HDF5 splits, config and rules) reuse the
stored result, so the nightly rebuild does not score the splits again.
"""

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from sentinel_pipeline.atomic_io import write_json_atomic, write_text_atomic
from sentinel_pipeline.evaluation.backtest import BacktestConfig, rounded
from sentinel_pipeline.evaluation.backtest_stage import (
    BACKTEST_RULES_VERSION,
    PLOT_NAME,
    REPORT_NAME,
    BacktestRefused,
    comparison_markdown,
    comparison_row,
    run_backtest_stage,
)
from sentinel_pipeline.orchestration.bundle_checks import current_bundle
from sentinel_pipeline.orchestration.data_assets import hdf5_splits
from sentinel_pipeline.orchestration.metadata import image, md_table, sparkline
from sentinel_pipeline.orchestration.overview import verification_table
from sentinel_pipeline.orchestration.settings import WRITE_POOL, PipelineSettings
from sentinel_pipeline.orchestration.training_assets import bundle_asset_key
from sentinel_pipeline.orchestration.verified_evaluation import evaluate_verified_bundle
from sentinel_pipeline.training.families import VARIANTS, variants_of_kind
from sentinel_pipeline.verification import BundleNotVerifiedError, require_verified

BACKTEST_AUTOMATION = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
COMPARISON_KEY = dg.AssetKey("variant_comparison")
# the trade backtests side by side: the window families' variants (a day family's ranking evaluation has
# its own report)
COMPARED = list(variants_of_kind("windows"))
METADATA_DIGITS = 4


class BacktestRunConfig(dg.Config):
    """How the test split is traded (see ``sentinel_pipeline.evaluation.backtest.BacktestConfig``).

    Costs per side in basis points of the weight traded; ``threshold`` None with the threshold rule
    (a single symbol or a thin panel): fitted on the validation split, never on the test window."""

    cost_bps: float = 5.0
    slippage_bps: float = 2.0
    weighting: str = "equal"
    entry: str = "auto"
    fraction: float = 0.1
    threshold: float | None = None
    min_cross_section: int = 5
    holding_bars: int | None = None
    execution_lag: int = 1
    allow_short: bool = True
    min_days: int = 30
    min_trades: int = 30
    n_random: int = 1000
    seed: int = 0
    # what scores the test split: "torch" (the checkpoint) or "onnx" (the bundle's model.onnx on ONNX
    # Runtime, one thread; the same trades, see deployment.onnx_parity)
    runtime: str = "torch"

    def to_backtest_config(self) -> BacktestConfig:
        return BacktestConfig(**self.model_dump(exclude={"runtime"}))


def backtest_asset_key(variant: str) -> dg.AssetKey:
    return dg.AssetKey(f"backtest_{variant}")


def backtest_dir(paths: Any, variant: str) -> Path:
    return paths.artifacts / "backtest" / variant


def _num(v: Any) -> Any:
    return rounded(v, METADATA_DIGITS) if isinstance(v, float) else v


def backtest_metadata(report: dict[str, Any], out: Path, variant: str) -> dict[str, Any]:
    """UI metadata of a backtest report: headline numbers (rounded), tables, notes and the plot."""
    m, rule = report["metrics"], report["rule"]
    vs = report.get("vs_previous") or {}
    md: dict[str, Any] = {
        "bundle": report["bundle"],
        "previous_bundle": report.get("previous_bundle") or f"none ({report.get('previous_note')})",
        "entry_rule": f"{rule['entry_rule']}, hold {rule['holding_bars']} bars, lag {rule['execution_lag']}, "
        f"{rule['weighting']} weights, {rule['cost_bps']:g}+{rule['slippage_bps']:g} bps per side",
        "n_trades": m["n_trades"], "n_days": m["n_days"],
        "total_return": _num(m["total_return"]), "max_drawdown": _num(m["max_drawdown"]),
        "hit_rate": _num(m.get("hit_rate")), "mean_trade_return": _num(m.get("mean_trade_return")),
        "mean_daily_turnover": _num(m["mean_daily_turnover"]),
        "mean_gross_exposure": _num(m["mean_gross_exposure"]),
        "fraction_bars_invested": _num(m["fraction_bars_invested"]),
    }
    if m.get("sharpe") is not None:
        md["sharpe"] = _num(m["sharpe"])
        md["sharpe_ci"] = f"[{_num(m['sharpe_lower'])}, {_num(m['sharpe_upper'])}] (Lo, {rule['sharpe_lag_days']}-day lag)"
        if m.get("sortino") is not None:
            md["sortino"] = _num(m["sortino"])
    else:
        md["sharpe"] = "not reported (see notes)"
    for base, key in (("random", "random_baseline"), ("shifted", "shifted_baseline")):
        summary = report.get(key) or {}
        for stat, label in (("sharpe_daily", "sharpe"), ("total_return", "total_return")):
            s = summary.get(stat) or {}
            if s.get("p_value") is not None:
                md[f"p_vs_{base}_{label}"] = _num(s["p_value"])
                md[f"percentile_vs_{base}_{label}"] = _num(s["percentile"])
    rows = [{"baseline": base, "statistic": stat, "entry": (report.get(key) or {}).get("entry"),
             **{k: _num(v) for k, v in ((report.get(key) or {}).get(stat) or {}).items()}}
            for base, key in (("random", "random_baseline"), ("shifted", "shifted_baseline")) if report.get(key)
            for stat in ("sharpe_daily", "total_return")]
    if rows:
        md["random_baselines"] = md_table(rows)
        md["random_seconds"] = _num(sum((report.get(k) or {}).get("seconds") or 0.0
                                        for k in ("random_baseline", "shifted_baseline")))
    if vs:
        rows = []
        for stat in ("mean_daily_return", "sharpe", "total_return"):
            d = vs.get(stat)
            if d:
                rows.append({"metric": stat, **{k: _num(v) for k, v in d.items()}})
        md["vs_previous"] = md_table(rows) if rows else dg.MetadataValue.md("_(no comparable numbers)_")
        sharpe = vs.get("sharpe") or {}
        if sharpe.get("delta") is not None:
            md["delta_sharpe_vs_previous"] = _num(sharpe["delta"])
        mean = vs.get("mean_daily_return") or {}
        if mean.get("delta") is not None:
            md["delta_mean_daily_return_vs_previous"] = _num(mean["delta"])
    keys = ("total_return", "total_return_gross", "total_cost", "mean_daily_return", "mean_daily_return_t_hac",
            "daily_sharpe", "sharpe", "sharpe_lower", "sharpe_upper", "sortino", "annualised_return",
            "annualised_volatility", "max_drawdown", "annual_turnover", "mean_net_exposure", "n_long", "n_short",
            "mean_trade_return_gross", "mean_trade_bars", "n_entries_without_fill")
    md["metrics"] = md_table([{"metric": k, "value": "" if m.get(k) is None else _num(m.get(k))} for k in keys])
    if report.get("notes"):
        md["notes"] = dg.MetadataValue.md("\n".join(f"- {n}" for n in report["notes"]))
    if (out / "daily.parquet").is_file():  # a small inline chart; the full plot is behind "Show Markdown"
        daily = pd.read_parquet(out / "daily.parquet", columns=["equity", "random_q50"])
        md["equity_inline"] = sparkline({"model": daily["equity"].tolist(), "random median": daily["random_q50"].tolist()},
                                        f"{variant}: test-period equity")
    md["equity_drawdown"] = image(out / PLOT_NAME, f"{variant}: test-period backtest")
    md["backtest_report"] = dg.MetadataValue.path(str(out / REPORT_NAME))
    md["path"] = dg.MetadataValue.path(str(out))
    return {k: v for k, v in md.items() if v is not None}


def build_backtest_asset(variant: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=backtest_asset_key(variant),
        deps=[bundle_asset_key(variant), hdf5_splits],
        group_name="backtest",
        kinds={"pytorch"},
        pool=WRITE_POOL,
        automation_condition=BACKTEST_AUTOMATION,
        description=f"Test-period portfolio backtest of the verified `{variant}` bundle, net of costs, against "
        "random strategies with its trade count (random trades; its own schedule moved in time) and the "
        "previous verified bundle.",
    )
    def _backtest(context: dg.AssetExecutionContext, config: BacktestRunConfig, settings: PipelineSettings):
        paths = settings.paths()
        out = backtest_dir(paths, variant)

        def run(bundle: Path, expected: str, previous: Path | None, fp: str, digest: str | None) -> None:
            run_backtest_stage(bundle, expected, paths.h5("test"), paths.h5("val"), out, config.to_backtest_config(),
                               previous_dir=previous, fingerprint=fp, scalers_dir=paths.scalers_dir,
                               verified_manifest_sha256=digest, runtime=config.runtime)

        report, fp, reused = evaluate_verified_bundle(
            context, paths, variant, out, what="backtest", stage="backtest", rules=BACKTEST_RULES_VERSION,
            config=config.model_dump(), run=run, refused=(BacktestRefused,), report_name=REPORT_NAME)
        metadata = backtest_metadata(report, out, variant)
        metadata.update({"reused": reused, "input_fingerprint": fp[:16]})
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(fp[:16]))

    return _backtest


def _report_status(context: dg.AssetExecutionContext, paths: Any, variant: str,
                   report: dict[str, Any] | None) -> str:
    """``current`` when the report is of the variant's current bundle and that bundle still verifies."""
    if report is None:
        return "no backtest"
    try:
        bundle = current_bundle(context.instance, paths, variant)
    except dg.Failure:
        return "stale: no bundle on disk"
    if report.get("bundle") != bundle.name:
        return f"stale: current bundle {bundle.name} not backtested"
    try:
        require_verified(bundle)
    except BundleNotVerifiedError as exc:
        return f"stale: bundle no longer verified ({str(exc).split(': ', 1)[-1][:80]})"
    return "current"


@dg.asset(
    key=COMPARISON_KEY,
    deps=[backtest_asset_key(v) for v in COMPARED],
    group_name="backtest",
    kinds={"json"},
    pool=WRITE_POOL,
    automation_condition=dg.AutomationCondition.eager(),
    description="Every variant's test-period backtest side by side (rounded), with whether each is current.",
)
def variant_comparison(context: dg.AssetExecutionContext, settings: PipelineSettings) -> dg.MaterializeResult:
    paths = settings.paths()
    rows = []
    for variant in COMPARED:
        path = backtest_dir(paths, variant) / REPORT_NAME
        report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        rows.append(comparison_row(variant, report, _report_status(context, paths, variant, report)))
    out = paths.artifacts / "backtest"
    table = comparison_markdown(rows)
    write_json_atomic(out / "variant_comparison.json", {"variants": rows})
    write_text_atomic(out / "variant_comparison.md", table + "\n")
    return dg.MaterializeResult(metadata={
        "comparison": dg.MetadataValue.md(table),
        "verification": verification_table(paths.models_dir, COMPARED),
        "n_current": sum(r["status"] == "current" for r in rows),
        "path": dg.MetadataValue.path(str(out / "variant_comparison.json")),
    })


def _evaluation_asset(variant: str) -> dg.AssetsDefinition:
    """The window backtest for window families; the ranking evaluation for day (universe) families."""
    if VARIANTS[variant].batch_kind == "windows":
        return build_backtest_asset(variant)
    from sentinel_pipeline.orchestration.ranking_assets import build_ranking_asset

    return build_ranking_asset(variant, backtest_asset_key(variant))


BACKTEST_ASSETS = [*(_evaluation_asset(v) for v in VARIANTS), variant_comparison]
