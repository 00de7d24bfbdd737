"""Helpers for the Dagster-level tests: a small, fast pipeline instance and ways to tamper with it.

A :class:`PipelineHome` is one pipeline instance on disk: ``data/`` (raw landing zone + artefacts),
``models/`` (bundles) and ``dagster_home/`` (the Dagster instance: run history, materialisations,
check evaluations), all under one root. The Dagster history records absolute bundle paths, so a
snapshot of an instance is restored *in place* (same root) rather than copied elsewhere.

The settings are small: :data:`SMALL_MARKET` (20 symbols x 150 days of hourly bars; a strong planted
signal of 0.3 and a 10-bar label horizon, so that the label balance check passes and the test split
holds the >= 10 independent label windows the statistical gates need) and :data:`TRAINING` (2 epochs;
the transformer on its first 1000 training samples), with :data:`PLUMBING_GATES` (the default gates
without the classifiers' shift null; see that file).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from sentinel_pipeline.bundles import MANIFEST_NAME, build_manifest, list_bundles
from sentinel_pipeline.data.features import FeatureConfig, build_contract
from sentinel_pipeline.definitions import ASSETS, CHECKS
from sentinel_pipeline.orchestration.bundle_checks import VerificationSettings
from sentinel_pipeline.orchestration.data_assets import DataHalfSettings
from sentinel_pipeline.orchestration.jobs import checks_only, ci_gate, full_pipeline, nightly_rebuild
from sentinel_pipeline.orchestration.settings import PipelineSettings
from sentinel_pipeline.paths import ArtifactPaths
from sentinel_pipeline.training.families import variants_of_kind

# the variants of the intraday graph (window families); the panel job trains the others
VARIANTS = variants_of_kind("windows")

SMALL_MARKET: dict[str, Any] = {
    "synthetic_n_symbols": 20,
    "synthetic_n_days": 150,
    "signal_strength": 0.3,
    "horizon": 10,
}
PLUMBING_GATES = Path(__file__).with_name("plumbing_gates.yaml")
TRAINING: dict[str, Any] = {"epochs": 2, "batch_size": 256, "threads": 1, "log_every": 100_000}
# the transformer is the slow variant: it trains on the first 1000 samples (validation has fewer, so
# it is evaluated on the whole validation split all the same)
TRAINING_OVERRIDES: dict[str, dict[str, Any]] = {"transformer_tbm": {"limit_samples": 1000}}
# the data-half assets that reuse a fresh stage (and say so in their ``reused`` metadata)
DATA_STAGES: tuple[str, ...] = (
    "raw_bars",
    "features",
    "labelled_dataset",
    "dataset_splits",
    "seq_scaler",
    "snap_scaler",
    "hdf5_splits",
    "arrow_cache",
)


def run_config() -> dict[str, Any]:
    """Op config of every training asset: the small training settings."""
    return {
        "ops": {f"bundle_{v}": {"config": {**TRAINING, **TRAINING_OVERRIDES.get(v, {})}} for v in VARIANTS}
    }


def cli_run_config() -> dict[str, Any]:
    """Run config for ``dagster job execute -c``: the small market as resource config and the training
    ops (the code location's executor runs the whole run in one process)."""
    return {
        "resources": {
            "data_settings": {"config": dict(SMALL_MARKET)},
            "verification": {"config": {"gates_file": str(PLUMBING_GATES)}},
        },
        **run_config(),
    }


@dataclass(frozen=True)
class PipelineHome:
    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    @property
    def paths(self) -> ArtifactPaths:
        return ArtifactPaths(data_dir=self.data_dir, models_dir=self.models_dir)

    def resources(self, gates_file: str | Path | None = None) -> dict[str, Any]:
        return {
            "settings": PipelineSettings(
                data_dir=str(self.data_dir), models_dir=str(self.models_dir), raw_dir=None
            ),
            "data_settings": DataHalfSettings(**SMALL_MARKET),
            "verification": VerificationSettings(gates_file=str(gates_file or PLUMBING_GATES)),
            "pipes_client": dg.PipesSubprocessClient(),
        }

    def defs(self, gates_file: str | Path | None = None) -> dg.Definitions:
        """The project's assets, checks, jobs and schedule, bound to this instance's directories."""
        return dg.Definitions(
            assets=ASSETS,
            asset_checks=CHECKS,
            jobs=[full_pipeline, ci_gate, checks_only],
            schedules=[nightly_rebuild],
            resources=self.resources(gates_file),
        )

    def open_instance(self) -> dg.DagsterInstance:
        self.dagster_home.mkdir(parents=True, exist_ok=True)
        return dg.DagsterInstance.from_config(str(self.dagster_home))

    def run(
        self,
        instance: dg.DagsterInstance,
        job: str = "full_pipeline",
        *,
        gates_file: str | Path | None = None,
        selection: list[dg.AssetKey] | None = None,
    ) -> dg.ExecuteInProcessResult:
        """Execute one of the project's jobs in process with the small settings (never raises)."""
        job_def = self.defs(gates_file).resolve_job_def(job)
        return job_def.execute_in_process(
            run_config=run_config() if job != "checks_only" else {},
            instance=instance,
            asset_selection=selection,
            raise_on_error=False,
        )

    def bundles(self, variant: str | None = None) -> list[Path]:
        return list_bundles(self.models_dir, variant)


def restore(snapshot: Path, home: PipelineHome) -> None:
    """Put ``home`` back to the state saved in ``snapshot`` (no Dagster instance may be open on it)."""
    if home.root.exists():
        shutil.rmtree(home.root)
    shutil.copytree(snapshot, home.root)


def leftover_temp_files(root: Path) -> list[Path]:
    """Temp files/dirs of ``atomic_io`` (``.<name>.tmp-*`` / ``.<name>.old-*``) under ``root``."""
    return sorted(p for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


# -- tampering -----------------------------------------------------------------------------------


def rewrite_manifest(bundle: Path) -> None:
    """Recompute the bundle's manifest over its current files (a tamperer covering their tracks). The
    signature is left as it was, so it no longer matches: the tamperer has no key."""
    (bundle / MANIFEST_NAME).write_text(json.dumps(build_manifest(bundle)))


def flip_byte(bundle: Path) -> str:
    """One byte of ``model_best.pt`` changed, the manifest left alone; returns the check that must fail."""
    path = bundle / "model_best.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return "manifest"


def swap_scaler(bundle: Path) -> str:
    """The seq scaler's centres moved (a scaler of another dataset with the same contract: the issue's
    case), the manifest rewritten to match; the signature then fails first."""
    info = json.loads((bundle / "scalers.json").read_text())
    info["center"]["seq"] = [c + 0.23 for c in info["center"]["seq"]]
    (bundle / "scalers.json").write_text(json.dumps(info))
    rewrite_manifest(bundle)
    return "signature"


def swap_contract(bundle: Path, scratch: Path) -> str:
    """``feature_contract.json`` of another feature set (context features off), manifest rewritten (the
    signature then fails first)."""
    build_contract(FeatureConfig(context_features=False)).write(scratch)
    shutil.copyfile(scratch / "feature_contract.json", bundle / "feature_contract.json")
    rewrite_manifest(bundle)
    return "signature"


# -- reading results -----------------------------------------------------------------------------


def raw_metadata(metadata: Any) -> dict[str, Any]:
    return {k: getattr(v, "value", v) for k, v in metadata.items()}


def materializations(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    """{asset key: {metadata key: raw value}} of the run's materialisations."""
    return {
        ev.materialization.asset_key.to_user_string(): raw_metadata(ev.materialization.metadata)
        for ev in result.get_asset_materialization_events()
    }


def check_evaluations(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    """{"asset:check": AssetCheckEvaluation} of the run."""
    return {f"{e.asset_key.to_user_string()}:{e.check_name}": e for e in result.get_asset_check_evaluations()}


def started_steps(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}


def step_failures(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    """{step key: error message} of the run's failed steps."""
    out = {}
    for ev in result.get_step_failure_events():
        error = ev.step_failure_data.error
        out[ev.step_key] = error.to_string() if error is not None else ""
    return out
