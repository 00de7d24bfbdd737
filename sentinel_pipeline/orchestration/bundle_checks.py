"""The blocking verification check on every bundle asset, and how other assets find "the" bundle."""

import os
from pathlib import Path
from typing import Any

import dagster as dg

from sentinel_pipeline.bundles import list_bundles
from sentinel_pipeline.data.feature_contract import read_contract
from sentinel_pipeline.locking import bundle_lock
from sentinel_pipeline.orchestration.metadata import md_table
from sentinel_pipeline.orchestration.settings import PipelineSettings
from sentinel_pipeline.orchestration.training_assets import bundle_asset_key
from sentinel_pipeline.paths import ArtifactPaths
from sentinel_pipeline.training.families import VARIANTS
from sentinel_pipeline.verification import load_gates, verify_bundle, write_verification_record

CHECK_NAME = "bundle_verified"


class VerificationSettings(dg.ConfigurableResource):
    """Where the per-variant quality gates come from (JSON/YAML ``{variant: {gate: value}}``); the
    defaults of ``sentinel_pipeline.verification.DEFAULT_GATES`` apply when unset."""

    gates_file: str | None = os.environ.get("SENTINEL_QUALITY_GATES") or None


def bundle_check_key(variant: str) -> dg.AssetCheckKey:
    return dg.AssetCheckKey(bundle_asset_key(variant), CHECK_NAME)


MANIFEST_KEY = "manifest_sha256"  # metadata entry of the bundle materialisation and of the check result


def latest_bundle_materialization(instance: dg.DagsterInstance, variant: str) -> tuple[Path | None, int | None]:
    """(bundle path, storage id) of the bundle asset's latest materialisation, if any."""
    path, storage_id, _ = latest_bundle_record(instance, variant)
    return path, storage_id


def latest_bundle_record(instance: dg.DagsterInstance, variant: str) -> tuple[Path | None, int | None, str | None]:
    """(bundle path, storage id, manifest sha256) of the bundle asset's latest materialisation."""
    records = instance.fetch_materializations(bundle_asset_key(variant), limit=1).records
    if not records or records[0].asset_materialization is None:
        return None, None, None
    metadata = records[0].asset_materialization.metadata
    value = metadata.get("bundle_path")
    path = Path(str(value.value)) if value is not None else None
    digest = metadata.get(MANIFEST_KEY)
    return path, records[0].storage_id, str(digest.value) if digest is not None else None


def current_bundle(instance: dg.DagsterInstance, paths: ArtifactPaths, variant: str) -> Path:
    """The bundle the asset graph currently points at: the latest materialisation's bundle, else the
    newest bundle of the variant on disk (e.g. written by the CLI)."""
    path, _ = latest_bundle_materialization(instance, variant)
    # a record from an instance that served another models directory must not redirect us there
    if path is not None and path.is_dir() and path.resolve().parent == paths.models_dir.resolve():
        return path
    on_disk = list_bundles(paths.models_dir, variant)
    if not on_disk:
        raise dg.Failure(description=f"no bundle of variant {variant} under {paths.models_dir}")
    return on_disk[0]


def gate_rows(gate_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One readable row per statistical gate: verdict, tested number, bound and the sample it rests on."""
    def r(x: Any) -> Any:
        return round(float(x), 3) if isinstance(x, int | float) else "n/a"

    return [
        {"gate": g["name"], "passed": g["passed"], "value": r(g.get("value")), "bound": r(g.get("bound")),
         "samples": g["n_samples"], "timestamps": g["n_timestamps"], "independent windows": g["n_windows"],
         "tested": g["statistic"]}
        for g in gate_results
    ]


def onnx_parity_metadata(parity: dict[str, Any]) -> dict[str, Any]:
    """UI metadata of the ONNX parity (``deployment.onnx_parity.ParityReport`` dict): the largest
    difference, one row per output, and the decisions compared."""
    if not parity.get("outputs"):
        return {"onnx_parity": parity["note"]} if parity.get("note") else {}
    rows = [{"output": o["name"], "max |diff|": f"{o['max_abs']:.2e}", "max rel": f"{o['max_rel']:.2e}",
             "outside tolerance": o["n_outside"]} for o in parity["outputs"]]
    decisions = [{"decision": "signal sign", "compared": parity["sign_checked"], "differ": parity["sign_mismatches"]}]
    decisions += [{"decision": f"entry at {t['name']} threshold {t['value']:.4g}", "compared": t["entries"],
                   "differ": t["mismatches"]} for t in parity["thresholds"]]
    trades = parity.get("trades") or {}
    if trades.get("identical") is not None:
        decisions.append({"decision": f"backtest trade list ({trades.get('rule')})", "compared": trades["n_torch"],
                          "differ": 0 if trades["identical"] else "not identical"})
    return {
        "onnx_max_abs_diff": float(f"{max(o['max_abs'] for o in parity['outputs']):.3g}"),
        "onnx_parity": md_table(rows),
        "onnx_decisions": md_table(decisions),
        "onnx_samples": parity["n_samples"],
    }


def build_bundle_check(variant: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=bundle_asset_key(variant),
        name=CHECK_NAME,
        blocking=True,
        description="Signature of the manifest by a trusted key, files (no symlinks, nothing extra), sha256 "
        "manifest, contract hash, metadata vs contract, model loads and runs on "
        "validation rows, scalers (plain JSON) equal the data half's, metrics sane and reproduced by a forward "
        "pass over the validation split, and the statistical skill gates scored on the test "
        "split (HAC t of directional rank IC; MSE vs train mean; shift null for classifiers), and ONNX parity "
        "(model.onnx on ONNX Runtime vs torch on validation rows: values, signal signs, entry decisions, trade "
        "list). Blocks replay, the backtest and packaging when it fails.",
    )
    def _check(
        context: dg.AssetCheckExecutionContext, settings: PipelineSettings, verification: VerificationSettings
    ) -> dg.AssetCheckResult:
        paths = settings.paths()
        bundle = current_bundle(context.instance, paths, variant)
        expected = read_contract(paths.feature_contract).hash
        gates = load_gates(verification.gates_file) if verification.gates_file else None
        with bundle_lock(bundle):  # exclusive: no reader while it is verified and its record written
            report = verify_bundle(bundle, expected, val_h5=paths.h5("val"), gate_h5=paths.h5("test"), gates=gates,
                                   scalers_dir=paths.scalers_dir)
            failed = list(report.failed_checks)
            # the bundle the materialisation reported must be the one verified, unchanged since
            mat_path, _, mat_digest = latest_bundle_record(context.instance, variant)
            if mat_digest is not None and mat_path is not None and mat_path.resolve() == bundle.resolve() \
                    and mat_digest != report.manifest_digest:
                failed.append("materialised_manifest")
                context.log.error(f"{bundle.name}: manifest sha256 {report.manifest_digest} is not the one its "
                                  f"materialisation recorded ({mat_digest}): the bundle changed since it was written")
            passed = report.passed and not failed
            try:
                write_verification_record(bundle, report)
            except (OSError, ValueError) as exc:  # the verdict lives in the event log; the record is information
                context.log.warning(f"could not write the verification record of {bundle.name}: {exc}")
        context.log.info(report.render())
        rows = [{"check": c.name, "passed": c.passed, "detail": c.detail} for c in report.checks]
        metadata: dict[str, Any] = {
            "bundle": dg.MetadataValue.path(str(bundle)),
            "expected_hash": expected,
            MANIFEST_KEY: report.manifest_digest or "unreadable",
            "checks": md_table(rows),
            "failed_checks": ", ".join(failed) or "none",
        }
        metadata.update(onnx_parity_metadata(report.onnx_parity))
        if report.gate_results:
            metadata["gates"] = md_table(gate_rows(report.gate_results))
            for g in report.gate_results:
                if g.get("value") is not None:
                    metadata[f"gate_{g['name']}"] = round(float(g["value"]), 3)
        return dg.AssetCheckResult(
            passed=passed,
            metadata=metadata,
            description=None if passed else f"{bundle.name}: failed {', '.join(failed)}",
        )

    return _check


BUNDLE_CHECKS = [build_bundle_check(v) for v in VARIANTS]
