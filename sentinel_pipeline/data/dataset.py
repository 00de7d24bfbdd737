"""The labelled dataset: the features table and the labels table side by side, row for row.

The labels stage writes only its own columns (``labels.arrow``: the key columns ``symbol`` and
``timestamp`` followed by the label columns) instead of a copy of the features with the labels appended;
readers put the two files side by side. :class:`LabelledDataset` opens both (memory-mapped, see
``tables``) and checks that they describe the same rows in the same order: the same row count and the
same ``symbol`` and ``timestamp`` keys on every row; otherwise ``ValueError`` naming both files. Its
columns are the features' columns followed by the label columns (the keys once), i.e. the columns of the
single labelled table the stage used to write.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sentinel_pipeline.data import tables

KEY_COLUMNS: tuple[str, ...] = ("symbol", "timestamp")


class LabelledDataset:
    """``features`` and ``labels`` tables (IPC files) as one table with the features' columns first.

    Columns are mapped on demand and unmapped once the arrays handed out are dropped, so the pages a
    stage touched do not stay in its RSS (:meth:`columns`)."""

    def __init__(self, features_path: str | Path, labels_path: str | Path) -> None:
        self.features_path, self.labels_path = Path(features_path), Path(labels_path)
        self.feature_names = tables.schema_of(self.features_path).names
        label_schema = tables.schema_of(self.labels_path)
        self.label_names = [c for c in label_schema.names if c not in KEY_COLUMNS]
        self.names = [*self.feature_names, *self.label_names]
        self.num_rows = self._check_keys(label_schema.names)

    def _check_keys(self, label_columns: list[str]) -> int:
        where = f"{self.labels_path} (labels of {self.features_path})"
        missing = [k for k in KEY_COLUMNS if k not in label_columns or k not in self.feature_names]
        if missing:
            raise ValueError(f"{where}: key columns {missing} are missing; rebuild the labels")
        features = tables.open_table(self.features_path, list(KEY_COLUMNS))
        labels = tables.open_table(self.labels_path, list(KEY_COLUMNS))
        if labels.num_rows != features.num_rows:
            raise ValueError(f"{where}: {labels.num_rows} rows, the features have {features.num_rows}; "
                             f"rebuild the labels")
        for key in KEY_COLUMNS:
            if not labels.column(key).equals(features.column(key)):
                raise ValueError(f"{where}: the {key} column differs from the features' (not the same rows in the "
                                 f"same order); rebuild the labels")
        return int(features.num_rows)

    def _split(self, names: list[str]) -> tuple[list[str], list[str]]:
        missing = [c for c in names if c not in self.names]
        if missing:
            raise ValueError(f"{self.features_path} + {self.labels_path}: no columns {missing}")
        return [c for c in names if c not in self.label_names], [c for c in names if c in self.label_names]

    def columns(self, names: list[str]) -> dict[str, np.ndarray]:
        """``{name: NumPy array}``: views of a fresh mapping of the file where the type allows
        (``tables.column``), unmapped when the arrays are dropped. Mapped, not read into memory: the scaler
        stage, which takes its 27 feature columns one at a time, took 11.2 s at 10M bars with file-handle
        reads and 4.0-5.8 s mapped (noisy machine)."""
        feats, labs = self._split(list(names))
        out: dict[str, np.ndarray] = {}
        for path, part in ((self.features_path, feats), (self.labels_path, labs)):
            if part:
                table = tables.open_table(path, part)
                out.update({c: tables.column(table, c) for c in part})
        return {c: out[c] for c in names}

    def column(self, name: str) -> np.ndarray:
        return self.columns([name])[name]

    def frame(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The frame of ``columns`` (default all), as ``pd.read_parquet`` read the single labelled table."""
        names = self.names if columns is None else list(columns)
        feats, labs = self._split(names)
        parts = [tables.read_frame(path, part) for path, part in ((self.features_path, feats), (self.labels_path, labs))
                 if part]
        frame = parts[0] if len(parts) == 1 else pd.concat(parts, axis=1)
        return frame if list(frame.columns) == names else frame[names]


def open_dataset(features_path: str | Path, labels_path: str | Path) -> LabelledDataset:
    return LabelledDataset(features_path, labels_path)


def read_dataset(features_path: str | Path, labels_path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The labelled dataset's frame (``columns`` only): features and labels side by side, checked."""
    return LabelledDataset(features_path, labels_path).frame(columns)
