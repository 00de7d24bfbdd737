"""The train/test shift check (adversarial validation) on the Arrow cache of the splits.

Non-blocking (a WARN when the train-vs-validation AUC is above ``auc_warn_threshold``); the
train-vs-test comparison is report-only: shown in the UI, never read by training, feature selection
or the gate. The work is done by ``sentinel_pipeline.evaluation.shift_check`` (no Dagster there).
"""

import tempfile
from pathlib import Path

import dagster as dg

from sentinel_pipeline.data import arrow_cache as arrow_mod
from sentinel_pipeline.evaluation import shift_check as shift_mod
from sentinel_pipeline.orchestration.data_assets import arrow_cache
from sentinel_pipeline.orchestration.metadata import image, md_table
from sentinel_pipeline.orchestration.settings import PipelineSettings
from sentinel_pipeline.paths import SPLITS


class ShiftCheckConfig(dg.Config):
    """Run config of the check (``ops: {arrow_cache_train_shift: {config: {...}}}`` in the launchpad)."""

    auc_warn_threshold: float = 0.75  # train-vs-val AUC above this: WARN (the check never blocks by default)
    max_rows_per_side: int = 20_000
    n_blocks: int = 20
    n_folds: int = 5
    trend_threshold: float = 0.8
    seed: int = 0

    def to_shift_config(self) -> shift_mod.ShiftConfig:
        return shift_mod.ShiftConfig(max_rows_per_side=self.max_rows_per_side, n_blocks=self.n_blocks,
                                     n_folds=self.n_folds, trend_threshold=self.trend_threshold, seed=self.seed)


def _auc_text(r: shift_mod.ShiftReport) -> str:
    return f"{r.auc:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"


def shift_metadata(reports: dict[str, shift_mod.ShiftReport], threshold: float, plot: Path | None) -> dict:
    md: dict = {}
    for name, r in reports.items():
        md[f"{name}_auc"] = dg.MetadataValue.text(_auc_text(r))
    md["auc_warn_threshold"] = threshold
    md["ci_method"] = shift_mod.CI_METHOD
    md["cv"] = next(iter(reports.values())).cv if reports else ""
    md["drift_per_group"] = md_table([{"comparison": n, "group": g["group"], "n_features": g["n_features"],
                                       "auc": g["auc"]} for n, r in reports.items() for g in r.groups])
    md["top_features"] = md_table([{"comparison": n, "feature": t["feature"], "group": t["group"],
                                    "importance": t["importance"], "std": t["std"]}
                                   for n, r in reports.items() for t in r.top_features])
    trending = next(iter(reports.values())).trending if reports else []
    md["trending_features"] = md_table([{"feature": t["feature"], "group": t["group"], "spearman": t["spearman"]}
                                        for t in trending]) if trending else dg.MetadataValue.text("none")
    md["rows_per_side"] = md_table([{"comparison": n, "train": r.n_train_rows, "later": r.n_later_rows,
                                     "time_blocks": r.n_blocks, "folds": r.n_folds, "seconds": r.seconds}
                                    for n, r in reports.items()])
    md["report_only"] = "train_vs_test is shown here only; training, feature selection and the gate never read it"
    if plot is not None:
        md["plot"] = image(plot, "domain AUC per group and top features")
    return md


def build_shift_check(blocking: bool = False) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=arrow_cache, name="train_shift", blocking=blocking,
                    description="Adversarial validation: a time-block cross-validated domain classifier on the "
                    "contract's features tells train from validation (WARN above the threshold) and from test "
                    "(report-only). AUC [block-bootstrap CI], drift per feature group, top features, trending features.")
    def train_shift(settings: PipelineSettings, config: ShiftCheckConfig) -> dg.AssetCheckResult:
        paths = settings.paths()
        splits = {s: arrow_mod.open_split(paths.arrow(s)) for s in SPLITS}
        reports = shift_mod.shift_check(splits, config.to_shift_config())
        with tempfile.TemporaryDirectory() as tmp:
            plot = shift_mod.plot_shift(reports, Path(tmp) / "shift.png", config.auc_warn_threshold) if reports else None
            metadata = shift_metadata(reports, config.auc_warn_threshold, plot)
        val = reports.get("train_vs_val")
        passed = val is None or val.auc <= config.auc_warn_threshold
        description = None
        if not passed:
            trending = ", ".join(t["feature"] for t in val.trending) or "none"
            description = (f"train vs val AUC {_auc_text(val)} above {config.auc_warn_threshold}; "
                           f"top feature {val.top_features[0]['feature'] if val.top_features else '-'}; "
                           f"trending: {trending}")
        return dg.AssetCheckResult(passed=passed, severity=dg.AssetCheckSeverity.WARN, metadata=metadata,
                                   description=description)

    return train_shift


train_shift = build_shift_check()
SHIFT_CHECKS = [train_shift]
