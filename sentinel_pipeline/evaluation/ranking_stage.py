"""The ranking stage: a verified bundle of a ranking family (e.g. ``gat_multi_horizon``) scored on the
validation and test splits with its own batches (whole days and its symbol graph, from the bundle),
evaluated as a ranking (:mod:`~sentinel_pipeline.evaluation.ranking`: IC / RankIC / ICIR with HAC t, IC
decay, non-overlapping quantile long-short after costs, a daily long-short backtest against the previous
verified bundle, random portfolios and permuted rankings) and written to one output directory. Plain
Python (no Dagster); the Dagster ``backtest_<variant>`` asset of a ranking family calls it.

The same refusals as the window backtest (``backtest_stage``): an unverified bundle
(``require_verified``), one whose training/validation bars reach into the test window, or whose scalers
differ from those that scaled the splits, is never evaluated; the previous bundle is just not compared
when it is unusable (the report says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sentinel_pipeline.bundles import LoadedBundle, load_bundle
from sentinel_pipeline.data.split_arrays import SplitArrays
from sentinel_pipeline.evaluation.backtest_stage import (
    _first_sample_time,
    scaler_problem,
    usable_previous_bundle,
    window_problem,
)
from sentinel_pipeline.evaluation.predictions import score_split
from sentinel_pipeline.evaluation.ranking import (
    REPORT_NAME,
    RankingConfig,
    RankingReport,
    run_ranking_evaluation,
    write_ranking_outputs,
)
from sentinel_pipeline.training.data_loader import load_split_for_training
from sentinel_pipeline.verification import require_verified

# bump when the ranking evaluation's rules change, so that a stored result is not reused across the change
RANKING_RULES_VERSION = 1
RANKING_REPORT_NAME = REPORT_NAME


class RankingRefused(ValueError):
    """The bundle cannot be evaluated on this test split (the message says why)."""


@dataclass
class RankingOutcome:
    report: RankingReport
    summary: dict[str, Any]
    previous_bundle: str | None
    previous_note: str | None
    files: dict[str, Path]


def score_bundle(bundle: LoadedBundle, split: SplitArrays) -> pd.DataFrame:
    """The bundle's scored table of ``split`` (its family's batches, its own extra inputs)."""
    return score_split(bundle.model, bundle.arch, split, data=bundle.family_data)


def run_ranking_stage(
    bundle_dir: str | Path,
    expected_hash: str,
    test_h5: str | Path,
    val_h5: str | Path,
    out_dir: str | Path,
    config: RankingConfig | None = None,
    *,
    previous_dir: str | Path | None = None,
    fingerprint: str | None = None,
    scalers_dir: str | Path | None = None,
    verified_manifest_sha256: str | None = None,
) -> RankingOutcome:
    """Evaluate the verified ranking bundle at ``bundle_dir`` on ``val_h5``/``test_h5`` into ``out_dir``
    (module docstring). Raises ``BundleNotVerifiedError`` or :class:`RankingRefused`."""
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    scalers_dir = Path(scalers_dir) if scalers_dir is not None else Path(test_h5).parent.parent / "scalers"
    require_verified(bundle_dir, expected_hash, verified_manifest_sha256=verified_manifest_sha256)
    bundle = load_bundle(bundle_dir, expected_hash)
    test, _ = load_split_for_training(test_h5, expected_hash)
    val, _ = load_split_for_training(val_h5, expected_hash)
    test_start = _first_sample_time(test)
    problem = window_problem(bundle.metadata, expected_hash, test_start) or scaler_problem(bundle_dir, scalers_dir)
    if problem is not None:
        raise RankingRefused(f"{bundle_dir}: cannot be evaluated on {test_h5}: {problem}")
    scored_test = score_bundle(bundle, test)
    scored_val = score_bundle(bundle, val)
    prev_name = Path(previous_dir).name if previous_dir is not None else None
    prev_bundle, note = usable_previous_bundle(previous_dir, expected_hash, test_start, scalers_dir)
    previous_scored = score_bundle(prev_bundle, test) if prev_bundle is not None else None
    extra = {
        "bundle": bundle_dir.name,
        "variant": bundle.variant,
        "previous_bundle": prev_name if previous_scored is not None else None,
        "previous_note": note,
        "test_split": {"path": str(test_h5), "n_samples": int(len(scored_test)),
                       "label_params": dict(test.label_params)},
    }
    report = run_ranking_evaluation(scored_val, scored_test, previous_scored, config, extra=extra)
    files = write_ranking_outputs(out_dir, report, title=f"{bundle.variant} ({bundle_dir.name})",
                                  fingerprint=fingerprint)
    return RankingOutcome(report, report.to_dict(), prev_name if previous_scored is not None else None, note, files)
