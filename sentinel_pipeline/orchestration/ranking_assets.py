"""Test-period ranking evaluation of a ranking family's verified bundle (``backtest_<variant>`` of a
day-batch family such as ``gat_multi_horizon``): a thin wrapper around
``evaluation.ranking_stage.run_ranking_stage``.

Same guards as the window backtest (``backtest_assets``): the bundle's ``bundle_verified`` check is
blocking in the run; in a later run the latest evaluation of that check in Dagster's event log must have
passed, and its manifest digest is the trust anchor; the automation condition requires every blocking
check of its dependencies to pass. Outputs: ``data/artifacts/backtest/<variant>/`` (ranking report, IC
decay and long-short equity plots, daily and period tables); unchanged inputs reuse the stored result.
"""

from pathlib import Path
from typing import Any

import dagster as dg

from sentinel_pipeline.evaluation.ranking import EQUITY_PLOT, IC_DECAY_PLOT, RankingConfig, ranking_markdown
from sentinel_pipeline.evaluation.ranking_stage import (
    RANKING_REPORT_NAME,
    RANKING_RULES_VERSION,
    RankingRefused,
    run_ranking_stage,
)
from sentinel_pipeline.orchestration.data_assets import hdf5_splits
from sentinel_pipeline.orchestration.metadata import image
from sentinel_pipeline.orchestration.settings import WRITE_POOL, PipelineSettings
from sentinel_pipeline.orchestration.training_assets import bundle_asset_key
from sentinel_pipeline.orchestration.verified_evaluation import evaluate_verified_bundle

RANKING_AUTOMATION = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()


class RankingRunConfig(dg.Config):
    """How the ranking is judged (``evaluation.ranking.RankingConfig``): quantile legs, costs per unit of
    turnover (both legs), the head the daily long-short backtest trades, random draws."""

    quantile: float = 0.2
    cost_bps: float = 7.0
    min_symbols: int = 5
    backtest_horizon: int = 1
    execution_lag: int = 1
    n_random: int = 1000
    seed: int = 0

    def to_ranking_config(self) -> RankingConfig:
        return RankingConfig(**self.model_dump())


def ranking_dir(paths: Any, variant: str) -> Path:
    return paths.artifacts / "backtest" / variant


def _r(v: Any, digits: int = 4) -> Any:
    return round(float(v), digits) if isinstance(v, int | float) and v == v else v


def ranking_metadata(summary: dict[str, Any], out: Path, variant: str) -> dict[str, Any]:
    """UI metadata of a ranking report: the 5-day test figures up front, the tables, both plots."""
    md: dict[str, Any] = {
        "bundle": summary.get("bundle"),
        "previous_bundle": summary.get("previous_bundle") or f"none ({summary.get('previous_note')})",
    }
    test = ((summary.get("splits") or {}).get("test") or {}).get("horizons") or {}
    for h in ("1", "5", "20"):
        hs = test.get(h)
        if hs:
            md[f"test_rank_ic_{h}d"] = _r(hs["rank_ic"]["mean"])
            md[f"test_rank_ic_{h}d_hac_t"] = _r(hs["rank_ic"]["hac_t"], 2)
            md[f"test_long_short_{h}d_sharpe"] = _r(hs["long_short"].get("sharpe"), 2)
    m = (summary.get("backtest") or {}).get("metrics") or {}
    for k in ("total_return", "sharpe", "sharpe_lower", "sharpe_upper", "max_drawdown", "mean_daily_turnover"):
        if m.get(k) is not None:
            md[f"daily_ls_{k}"] = _r(m[k])
    perm = ((summary.get("backtest") or {}).get("permuted_rankings") or {}).get("sharpe_daily_gross") or {}
    if perm.get("p_value") is not None:
        md["daily_ls_p_vs_permuted_rankings"] = _r(perm["p_value"])
    md["ranking"] = dg.MetadataValue.md(ranking_markdown(summary))
    for name, label in ((IC_DECAY_PLOT, "IC decay"), (EQUITY_PLOT, "daily long-short equity")):
        if (out / name).is_file():
            md[name.split(".")[0]] = image(out / name, f"{variant}: {label}")
    md["ranking_report"] = dg.MetadataValue.path(str(out / RANKING_REPORT_NAME))
    return {k: v for k, v in md.items() if v is not None}


def build_ranking_asset(variant: str, key: dg.AssetKey) -> dg.AssetsDefinition:
    @dg.asset(
        key=key,
        deps=[bundle_asset_key(variant), hdf5_splits],
        group_name="backtest",
        kinds={"pytorch"},
        pool=WRITE_POOL,
        automation_condition=RANKING_AUTOMATION,
        description=f"Test-period ranking evaluation of the verified `{variant}` bundle: IC/RankIC/ICIR with HAC t "
        "per horizon, IC decay, non-overlapping quantile long-short after costs, and a daily long-short backtest "
        "against the previous verified bundle, random portfolios and permuted rankings.",
    )
    def _ranking(context: dg.AssetExecutionContext, config: RankingRunConfig, settings: PipelineSettings):
        paths = settings.paths()
        out = ranking_dir(paths, variant)

        def run(bundle: Path, expected: str, previous: Path | None, fp: str, digest: str | None) -> None:
            run_ranking_stage(bundle, expected, paths.h5("test"), paths.h5("val"), out, config.to_ranking_config(),
                              previous_dir=previous, fingerprint=fp, scalers_dir=paths.scalers_dir,
                              verified_manifest_sha256=digest)

        summary, fp, reused = evaluate_verified_bundle(
            context, paths, variant, out, what="ranking evaluation", stage="ranking", rules=RANKING_RULES_VERSION,
            config=config.model_dump(), run=run, refused=(RankingRefused,), report_name=RANKING_REPORT_NAME)
        metadata = ranking_metadata(summary, out, variant)
        metadata.update({"reused": reused, "input_fingerprint": fp[:16], "path": dg.MetadataValue.path(str(out))})
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(fp[:16]))

    return _ranking
