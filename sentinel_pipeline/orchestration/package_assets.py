"""``model_final_<variant>``: the shippable archive (``model_final.zip``) of each verified bundle.

Packaged only when the Dagster event log vouches for the bundle, like replay and the backtest: in the
same run the blocking ``bundle_verified`` check gates it; in a later run the asset reads the latest
evaluation of that check and packages only the manifest that evaluation passed
(``package.package_bundle(..., verified_manifest_sha256=...)``, which also re-checks the signature,
the files and the manifest). The archive goes to ``<models dir>/archives/<bundle>/model_final.zip``.
"""

from typing import Any

import dagster as dg

from sentinel_pipeline.locking import bundle_lock
from sentinel_pipeline.orchestration.bundle_checks import current_bundle
from sentinel_pipeline.orchestration.replay_assets import dagster_verified_digest
from sentinel_pipeline.orchestration.settings import WRITE_POOL, PipelineSettings
from sentinel_pipeline.orchestration.training_assets import bundle_asset_key
from sentinel_pipeline.package import PackageError, package_bundle
from sentinel_pipeline.training.families import VARIANTS

PACKAGE_AUTOMATION = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()


def package_asset_key(variant: str) -> dg.AssetKey:
    return dg.AssetKey(f"model_final_{variant}")


def build_package_asset(variant: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=package_asset_key(variant),
        deps=[bundle_asset_key(variant)],
        group_name="shipping",
        kinds={"zip"},
        pool=WRITE_POOL,
        automation_condition=PACKAGE_AUTOMATION,
        description=f"`model_final.zip` of the verified `{variant}` bundle: its signed manifest, the signature "
        "and every file the manifest lists, deterministic; `python -m sentinel_pipeline.verify --bundle-dir "
        "<zip>` verifies it as it verifies the bundle.",
    )
    def _package(context: dg.AssetExecutionContext, settings: PipelineSettings) -> dg.MaterializeResult:
        paths = settings.paths()
        bundle = current_bundle(context.instance, paths, variant)
        with bundle_lock(bundle, shared=True):  # its verification (exclusive) cannot run meanwhile
            digest, refusal = dagster_verified_digest(context.instance, variant)
            if refusal is not None:
                raise dg.Failure(description=f"packaging of {bundle.name} refused: {refusal}")
            try:
                result = package_bundle(bundle, verified_manifest_sha256=digest)
            except PackageError as exc:
                raise dg.Failure(description=f"packaging of {bundle.name} refused: {exc}") from exc
        context.log.info(f"{result.path}: {result.size} bytes, {len(result.members)} members")
        metadata: dict[str, Any] = {
            "path": dg.MetadataValue.path(str(result.path)),
            "bundle": result.bundle_dir.name,
            "size_bytes": result.size,
            "sha256": result.sha256,
            "members": len(result.members),
            "member_names": ", ".join(result.members),
            "manifest_sha256": result.manifest_sha256,
        }
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(result.sha256[:16]))

    return _package


PACKAGE_ASSETS = [build_package_asset(v) for v in VARIANTS]
