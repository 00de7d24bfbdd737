"""Where each stage reads and writes. Plain Python; the Dagster layer builds one from its resource."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ArtifactPaths:
    """The on-disk layout of one pipeline instance.

    ``data_dir``/raw            landing zone of raw OHLCV parquet (synthetic default generated here if empty)
    ``data_dir``/artifacts/...  everything the data half produces, one folder per stage
    ``models_dir``              trained bundles, one directory per bundle
    """

    data_dir: Path = Path("data")
    models_dir: Path = Path("models")
    raw_dir_override: Path | None = None

    @property
    def raw_dir(self) -> Path:
        return self.raw_dir_override if self.raw_dir_override is not None else self.data_dir / "raw"

    @property
    def artifacts(self) -> Path:
        return self.data_dir / "artifacts"

    # stage 1: raw bars
    @property
    def raw_bars_dir(self) -> Path:
        return self.artifacts / "raw_bars"

    @property
    def bars(self) -> Path:
        return self.raw_bars_dir / "bars.parquet"

    @property
    def quarantine(self) -> Path:
        return self.raw_bars_dir / "quarantine.parquet"

    @property
    def quality_report(self) -> Path:
        return self.raw_bars_dir / "quality_report.json"

    @property
    def bar_flags(self) -> Path:
        return self.raw_bars_dir / "bar_flags.parquet"

    # stage 2: features + contract
    @property
    def features_dir(self) -> Path:
        return self.artifacts / "features"

    @property
    def features(self) -> Path:
        return self.features_dir / "features.parquet"

    @property
    def feature_contract(self) -> Path:
        return self.features_dir / "feature_contract.json"

    @property
    def feature_schema(self) -> Path:
        return self.features_dir / "feature_schema.txt"

    # stage 3: labels
    @property
    def labelled_dataset(self) -> Path:
        return self.artifacts / "labels" / "dataset.parquet"

    # stage 4: splits
    @property
    def split_assignment(self) -> Path:
        return self.artifacts / "splits" / "assignment.parquet"

    @property
    def split_summary(self) -> Path:
        return self.artifacts / "splits" / "splits.json"

    # stage 5: scalers
    @property
    def scalers_dir(self) -> Path:
        return self.artifacts / "scalers"

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
        return self.artifacts / "hdf5"

    def h5(self, split: str) -> Path:
        return self.hdf5_dir / f"{split}.h5"

    # stage 7: Arrow IPC cache
    @property
    def arrow_dir(self) -> Path:
        return self.artifacts / "arrow_cache"

    def arrow(self, split: str) -> Path:
        return self.arrow_dir / f"{split}.arrow"


def arrow_cache_for(h5_path: str | Path) -> Path:
    """The Arrow cache that belongs to an HDF5 split: ``<artifacts>/arrow_cache/<split>.arrow``."""
    h5_path = Path(h5_path)
    return h5_path.parent.parent / "arrow_cache" / f"{h5_path.stem}.arrow"
