"""Where each stage reads and writes. Plain Python; the Dagster layer builds one from its resource."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

SPLITS = ("train", "val", "test")
# the data half's stage directories under ``artifacts/`` (each holds its outputs and its ``.stage.json``)
STAGE_DIRS: dict[str, str] = {
    "raw_bars": "raw_bars",
    "features": "features",
    "labels": "labels",
    "splits": "splits",
    "scalers": "scalers",
    "hdf5_splits": "hdf5",
    "arrow_cache": "arrow_cache",
}


@dataclass(frozen=True)
class ArtifactPaths:
    """The on-disk layout of one pipeline instance.

    ``data_dir``/raw            the user's landing zone of raw OHLCV files (parquet or CSV); only ever read
    ``data_dir``/synthetic      the embedded synthetic default market, generated here (never into the
                                landing zone) and used only when the landing zone is empty or absent
    ``data_dir``/artifacts/...  everything the data half produces, one folder per stage; the bar-ordered
                                tables are Arrow IPC files (``data.tables``)
    ``models_dir``              trained bundles, one directory per bundle

    ``staged(stage, directory)`` gives the same layout with one stage's folder moved to ``directory``: a
    stage is built into a temporary folder and committed into its real folder only once it succeeded
    (``stage_cache.build_stage``).
    """

    data_dir: Path = Path("data")
    models_dir: Path = Path("models")
    raw_dir_override: Path | None = None
    stage_dir_overrides: tuple[tuple[str, Path], ...] = ()

    @property
    def raw_dir(self) -> Path:
        return self.raw_dir_override if self.raw_dir_override is not None else self.data_dir / "raw"

    @property
    def synthetic_dir(self) -> Path:
        return self.data_dir / "synthetic"

    @property
    def artifacts(self) -> Path:
        return self.data_dir / "artifacts"

    def stage_dir(self, stage: str) -> Path:
        """The folder of a data-half stage (a key of ``STAGE_DIRS``), or its override."""
        if stage not in STAGE_DIRS:
            raise KeyError(f"unknown stage {stage!r}; stages: {sorted(STAGE_DIRS)}")
        return dict(self.stage_dir_overrides).get(stage, self.artifacts / STAGE_DIRS[stage])

    def staged(self, stage: str, directory: str | Path) -> ArtifactPaths:
        """These paths with ``stage``'s outputs written to ``directory`` (every other stage unchanged)."""
        self.stage_dir(stage)  # validates the name
        others = tuple((k, v) for k, v in self.stage_dir_overrides if k != stage)
        return replace(self, stage_dir_overrides=(*others, (stage, Path(directory))))

    # stage 1: raw bars
    @property
    def raw_bars_dir(self) -> Path:
        return self.stage_dir("raw_bars")

    @property
    def bars(self) -> Path:
        return self.raw_bars_dir / "bars.arrow"

    @property
    def quarantine(self) -> Path:
        return self.raw_bars_dir / "quarantine.parquet"

    @property
    def quality_report(self) -> Path:
        return self.raw_bars_dir / "quality_report.json"

    @property
    def bar_flags(self) -> Path:
        return self.raw_bars_dir / "bar_flags.arrow"

    # stage 2: features + contract
    @property
    def features_dir(self) -> Path:
        return self.stage_dir("features")

    @property
    def features(self) -> Path:
        return self.features_dir / "features.arrow"

    # the contract is its own asset (feature_contract), written beside the features: never staged
    @property
    def feature_contract(self) -> Path:
        return self.artifacts / STAGE_DIRS["features"] / "feature_contract.json"

    @property
    def feature_schema(self) -> Path:
        return self.artifacts / STAGE_DIRS["features"] / "feature_schema.txt"

    # stage 3: labels
    @property
    def labels_dir(self) -> Path:
        return self.stage_dir("labels")

    @property
    def labels(self) -> Path:
        """The label columns (with the ``symbol``/``timestamp`` keys), row for row beside :attr:`features`:
        the labelled dataset is the two side by side (``data.dataset``)."""
        return self.labels_dir / "labels.arrow"

    # stage 4: splits
    @property
    def splits_dir(self) -> Path:
        return self.stage_dir("splits")

    @property
    def split_assignment(self) -> Path:
        return self.splits_dir / "assignment.arrow"

    @property
    def split_summary(self) -> Path:
        return self.splits_dir / "splits.json"

    # stage 5: scalers
    @property
    def scalers_dir(self) -> Path:
        return self.stage_dir("scalers")

    @property
    def seq_scaler(self) -> Path:
        return self.scalers_dir / "seq_scaler.joblib"

    @property
    def snap_scaler(self) -> Path:
        return self.scalers_dir / "snap_scaler.joblib"

    @property
    def scalers_info(self) -> Path:
        return self.scalers_dir / "scalers.json"

    # stage 6: HDF5 splits (the training contract)
    @property
    def hdf5_dir(self) -> Path:
        return self.stage_dir("hdf5_splits")

    def h5(self, split: str) -> Path:
        return self.hdf5_dir / f"{split}.h5"

    # stage 7: Arrow IPC cache
    @property
    def arrow_dir(self) -> Path:
        return self.stage_dir("arrow_cache")

    def arrow(self, split: str) -> Path:
        return self.arrow_dir / f"{split}.arrow"


def arrow_cache_for(h5_path: str | Path) -> Path:
    """The Arrow cache that belongs to an HDF5 split: ``<artifacts>/arrow_cache/<split>.arrow``."""
    h5_path = Path(h5_path)
    return h5_path.parent.parent / "arrow_cache" / f"{h5_path.stem}.arrow"
