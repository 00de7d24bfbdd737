"""Replay assets (one per variant) and their train/serve parity check.

Replay never runs on a bundle whose latest verification did not pass:
- in the same run: the bundle's ``bundle_verified`` check is blocking, so a failure skips replay;
- in a later run (UI or CLI): the replay asset reads the latest evaluation of that check from the
  Dagster event log, refuses unless it passed on the current materialisation, and takes the
  manifest sha256 that evaluation recorded (and that the materialisation recorded) as the trust
  anchor: ``verification.require_verified(..., verified_manifest_sha256=...)`` checks the signature,
  the files and that the bundle's current manifest has exactly that digest. Nothing inside the
  bundle (no ``verification.json``) can vouch for it;
- by automation: the asset's automation condition requires every blocking check of its
  dependencies to have passed.
"""

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from sentinel_pipeline.atomic_io import atomic_path
from sentinel_pipeline.bundles import BundleError, list_bundles, load_bundle, write_record
from sentinel_pipeline.data import tables
from sentinel_pipeline.data.feature_contract import read_contract
from sentinel_pipeline.locking import bundle_lock
from sentinel_pipeline.orchestration.bundle_checks import (
    CHECK_NAME,
    MANIFEST_KEY,
    bundle_check_key,
    current_bundle,
    latest_bundle_record,
)
from sentinel_pipeline.orchestration.data_assets import raw_bars
from sentinel_pipeline.orchestration.metadata import image, md_table, sparkline
from sentinel_pipeline.orchestration.settings import WRITE_POOL, PipelineSettings
from sentinel_pipeline.orchestration.training_assets import bundle_asset_key
from sentinel_pipeline.replay import ReplayConfig, feature_parity, replay_comparison, write_replay_outputs
from sentinel_pipeline.training.families import variants_of_kind
from sentinel_pipeline.verification import require_verified

REPLAY_AUTOMATION = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()


class ReplayRunConfig(dg.Config):
    """How the held-out window is replayed (see ``sentinel_pipeline.replay.ReplayConfig``)."""

    window_days: float = 7.0
    window_bars: int | None = None
    threshold: float = 0.1
    allow_short: bool = True
    baseline_seed: int = 0
    # what runs the model: "torch" (the checkpoint) or "onnx" (the bundle's model.onnx on ONNX Runtime,
    # one thread; the trade list is the same, see deployment.onnx_parity)
    runtime: str = "torch"

    def to_replay_config(self) -> ReplayConfig:
        return ReplayConfig(window_days=self.window_days, window_bars=self.window_bars, threshold=self.threshold,
                            allow_short=self.allow_short, baseline_seed=self.baseline_seed)


def replay_asset_key(variant: str) -> dg.AssetKey:
    return dg.AssetKey(f"replay_{variant}")


def replay_dir(paths: Any, variant: str) -> Path:
    return paths.artifacts / "replay" / variant


def dagster_verification_refusal(instance: dg.DagsterInstance, variant: str) -> str | None:
    """Why the Dagster record forbids replaying the current bundle of ``variant`` (None: it allows it)."""
    return dagster_verified_digest(instance, variant)[1]


def dagster_verified_digest(instance: dg.DagsterInstance, variant: str) -> tuple[str | None, str | None]:
    """(manifest sha256 that the latest passing ``bundle_verified`` evaluation recorded, refusal).

    Refused (digest None, refusal says why): never evaluated; the latest evaluation failed; it passed
    on an older materialisation; it recorded no manifest digest (an evaluation from before digests were
    recorded: re-run the check); or the materialisation recorded another manifest digest.
    """
    key = bundle_check_key(variant)
    asset = bundle_asset_key(variant).to_user_string()
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key]).get(key)
    if record is None or record.event is None or record.event.dagster_event is None:
        return None, f"check '{CHECK_NAME}' of {asset} has never been evaluated"
    evaluation = record.event.dagster_event.event_specific_data
    if not getattr(evaluation, "passed", False):
        return None, (f"latest evaluation of check '{CHECK_NAME}' on {asset} "
                      f"failed: {evaluation.description or record.status.value}")
    _, storage_id, mat_digest = latest_bundle_record(instance, variant)
    target = getattr(evaluation, "target_materialization_data", None)
    if storage_id is not None and target is not None and target.storage_id != storage_id:
        return None, (f"check '{CHECK_NAME}' last passed on an older materialisation of "
                      f"{asset}; the current bundle has not been verified")
    value = (getattr(evaluation, "metadata", None) or {}).get(MANIFEST_KEY)
    digest = str(getattr(value, "value", value)) if value is not None else None
    if not digest or digest == "unreadable":
        return None, (f"the passing evaluation of check '{CHECK_NAME}' on {asset} recorded no manifest digest "
                      "(it predates signed bundles): re-run the check")
    if mat_digest is not None and mat_digest != digest:
        return None, (f"check '{CHECK_NAME}' passed on manifest {digest[:12]}, but the materialisation of {asset} "
                      f"recorded manifest {mat_digest[:12]}")
    return digest, None


def previous_verified_bundle(models_dir: Path, variant: str, current: Path) -> Path | None:
    """The newest other bundle of the variant whose verification passed and still holds."""
    for path in list_bundles(models_dir, variant):
        if path.resolve() == current.resolve():
            continue
        try:
            require_verified(path)
            return path
        except BundleError:
            continue
    return None


def build_replay_asset(variant: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=replay_asset_key(variant),
        deps=[bundle_asset_key(variant), raw_bars],
        group_name="replay",
        kinds={"pytorch"},
        pool=WRITE_POOL,
        automation_condition=REPLAY_AUTOMATION,
        description=f"Production-style replay of the verified `{variant}` bundle on the last held-out window, "
        "compared with the previous verified bundle and a random-entry baseline.",
    )
    def _replay(context: dg.AssetExecutionContext, config: ReplayRunConfig, settings: PipelineSettings):
        paths = settings.paths()
        bundle = current_bundle(context.instance, paths, variant)
        # shared lock on the bundle while it is read: its verification (exclusive) cannot run meanwhile;
        # another replay may (its outputs are written atomically)
        with bundle_lock(bundle, shared=True):
            digest, refusal = dagster_verified_digest(context.instance, variant)
            if refusal is not None:
                raise dg.Failure(description=f"replay of {bundle.name} refused: {refusal}")
            expected = read_contract(paths.feature_contract).hash
            try:
                require_verified(bundle, expected, verified_manifest_sha256=digest)
                current = load_bundle(bundle, expected, runtime=config.runtime)
            except BundleError as exc:  # BundleNotVerifiedError included
                raise dg.Failure(description=f"replay of {bundle.name} refused: {exc}") from exc
            prev_path = previous_verified_bundle(paths.models_dir, variant, bundle)
            previous = None
            if prev_path is not None:
                try:
                    previous = load_bundle(prev_path, runtime=config.runtime)
                except BundleError as exc:
                    context.log.warning(f"previous bundle {prev_path.name} cannot be loaded: {exc}")
            bars = tables.read_frame(paths.bars)
            comparison = replay_comparison(current, previous, bars, config.to_replay_config())
            out = replay_dir(paths, variant)
            files = write_replay_outputs(comparison, out)
            with atomic_path(out / "replay_features.parquet") as tmp:
                comparison.current.raw_features.to_parquet(tmp, index=False)
        # the bundle's records (and their manifest) change: one writer at a time
        with bundle_lock(bundle):
            write_record(bundle, "replay_report.json", files["report"].read_bytes())
            record = write_record(bundle, "replay_equity.png", files["equity_curves"].read_bytes())

        m = comparison.current.metrics
        table = comparison.table.reset_index()
        metadata: dict[str, Any] = {
            "bundle": bundle.name,
            "runtime": config.runtime,
            "previous_bundle": prev_path.name if prev_path else "none",
            "n_candidates": m.get("n_candidates"),
            "n_trades_created": m.get("n_trades_created"),
            "hit_rate": m.get("hit_rate"),
            "goes_against_us_rate": m.get("goes_against_us_rate"),
            "sharpe": m.get("sharpe"),
            "rank_ic": m.get("rank_ic"),
            "comparison": md_table(table.to_dict(orient="records")),
            "equity_inline": sparkline({"current": comparison.current.equity_curve.tolist(),
                                        "random baseline": comparison.current.baseline_equity_curve.tolist()},
                                       f"{variant}: replay equity"),
            "equity_curves": image(files["equity_curves"], f"{variant}: replay equity curves"),
            "replay_report": dg.MetadataValue.path(str(record.with_name("replay_report.json"))),
            "window": f"{comparison.current.info.get('window_start')} .. {comparison.current.info.get('window_end')}",
        }
        return dg.MaterializeResult(metadata={k: v for k, v in metadata.items() if v is not None},
                                    data_version=dg.DataVersion(bundle.name))

    return _replay


def build_parity_check(variant: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=replay_asset_key(variant),
        name="train_serve_parity",
        description="The replay's features for the window's bars equal the training dataset's (max abs diff <= 1e-6).",
    )
    def _parity(settings: PipelineSettings) -> dg.AssetCheckResult:
        paths = settings.paths()
        replayed = pd.read_parquet(replay_dir(paths, variant) / "replay_features.parquet")
        contract = read_contract(paths.feature_contract)
        cols = ["symbol", "timestamp", *contract.all_names]
        dataset = tables.read_frame(paths.features, cols)
        result = feature_parity(replayed, dataset, columns=contract.all_names)
        worst = result.get("worst") or {}
        return dg.AssetCheckResult(
            passed=bool(result["ok"]),
            metadata={"max_abs_diff": float(result["max_abs_diff"]), "cells_compared": result["n_compared"],
                      "mismatched_cells": result["n_mismatched"], "worst": str(worst)},
            description=None if result["ok"] else f"replay features differ from the dataset: {worst}",
        )

    return _parity


# replay streams bars through a per-sample model: the variants of window families only (a day family's
# bundle is evaluated by its ranking stage, backtest_<variant>)
REPLAYABLE = list(variants_of_kind("windows"))
REPLAY_ASSETS = [build_replay_asset(v) for v in REPLAYABLE]
REPLAY_CHECKS = [build_parity_check(v) for v in REPLAYABLE]
