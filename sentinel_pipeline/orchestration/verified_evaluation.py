"""The guard shared by the assets that evaluate a verified bundle on the test split (the window backtest,
``backtest_assets``, and the ranking evaluation, ``ranking_assets``): locks, the Dagster event log as the
trust anchor, and reuse of unchanged results."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg

from sentinel_pipeline.data.feature_contract import read_contract
from sentinel_pipeline.locking import bundle_lock, exclusive_lock
from sentinel_pipeline.orchestration.bundle_checks import current_bundle
from sentinel_pipeline.orchestration.data_assets import upstream_fingerprint
from sentinel_pipeline.orchestration.replay_assets import dagster_verified_digest, previous_verified_bundle
from sentinel_pipeline.stage_cache import fingerprint, fresh_record
from sentinel_pipeline.verification import BundleNotVerifiedError, require_verified


def evaluate_verified_bundle(
    context: dg.AssetExecutionContext, paths: Any, variant: str, out: Path, *, what: str, stage: str, rules: int,
    config: dict[str, Any], run: Callable[[Path, str, Path | None, str, str | None], None],
    refused: tuple[type[Exception], ...], report_name: str,
) -> tuple[dict[str, Any], str, bool]:
    """The guarded evaluation of a variant's current bundle into ``out`` (the window backtest and the ranking
    evaluation): a shared lock on the bundle (its verification, exclusive, cannot run while it is read) and
    an exclusive one on ``out`` (two evaluations of the variant would replace it at once; its file sits
    beside the directory, which is replaced as a whole); refused unless the latest ``bundle_verified``
    evaluation in Dagster's event log passed for exactly this manifest; reused when the fingerprint of
    its inputs (bundle, manifest, previous verified bundle, HDF5 splits, config, rules) is unchanged, else
    ``run(bundle, expected_hash, previous, fingerprint, digest)``. Returns the report, the fingerprint and
    whether it was reused."""
    bundle = current_bundle(context.instance, paths, variant)
    with bundle_lock(bundle, shared=True), exclusive_lock(out.parent, name=f".{variant}.lock"):
        digest, refusal = dagster_verified_digest(context.instance, variant)
        if refusal is not None:
            raise dg.Failure(description=f"{what} of {bundle.name} refused: {refusal}")
        expected = read_contract(paths.feature_contract).hash
        try:
            require_verified(bundle, expected, verified_manifest_sha256=digest)
        except BundleNotVerifiedError as exc:
            raise dg.Failure(description=f"{what} of {bundle.name} refused: {exc}") from exc
        previous = previous_verified_bundle(paths.models_dir, variant, bundle)
        fp = fingerprint(
            stage=stage, rules=rules, bundle=bundle.name, manifest=digest,
            previous=previous.name if previous else None,
            hdf5=upstream_fingerprint(paths.hdf5_dir, "hdf5_splits"), config=config,
        )
        reused = fresh_record(out, fp) is not None
        if reused:
            context.log.info(f"inputs unchanged (fingerprint {fp[:12]}): reusing {out}")
        else:
            try:
                run(bundle, expected, previous, fp, digest)
            except (BundleNotVerifiedError, *refused) as exc:
                raise dg.Failure(description=f"{what} of {bundle.name} refused: {exc}") from exc
        report = json.loads((out / report_name).read_text(encoding="utf-8"))
    return report, fp, reused
