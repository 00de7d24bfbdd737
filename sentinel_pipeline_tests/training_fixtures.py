"""Tiny but realistic training inputs for the training/bundle tests.

:func:`make_training_data` lays out the artefacts of stages 2-7 under ``root`` exactly like
``paths.ArtifactPaths`` (``artifacts/features/feature_contract.json`` + ``feature_schema.txt``,
``artifacts/scalers/``, ``artifacts/hdf5/{train,val,test}.h5`` and optionally
``artifacts/arrow_cache/``), built from ``dataset_factory.make_labelled_dataset`` with the real
scaler and HDF5 writers.

With ``signal > 0`` a learnable relation is planted: ``seq_f0`` is set equal to ``snap_f0`` (so every
variant sees it, the MLP through snap and the sequence models at the window's last bar) and, on
label-eligible rows, ``early_move`` and ``tb_return_atr`` are ``signal * z + noise`` and ``tb_label``
is the thresholded sign of ``d = signal * z + noise``, where ``z`` is the standardised ``snap_f0`` and the
noise is standard normal; the forward returns follow the same ``d`` (``fwd_ret_h = 0.002 * sqrt(h / 20)
* d``), so the directional gate sees the skill too. With ``signal = 0`` the targets are pure noise.

The verification gate needs at least 10 independent label windows of 20 bars on the test split
(:data:`GATE_BARS` bars per symbol give that).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sentinel_pipeline.data import hdf5_splits, scalers
from sentinel_pipeline.data.feature_contract import FeatureContract
from sentinel_pipeline.paths import ArtifactPaths
from sentinel_pipeline.training.config import TrainConfig
from sentinel_pipeline_tests.dataset_factory import LABEL_PARAMS, make_labelled_dataset


@dataclass(frozen=True)
class TrainingData:
    paths: ArtifactPaths
    contract: FeatureContract
    train_h5: Path
    val_h5: Path
    test_h5: Path
    schema: Path
    contract_path: Path
    scalers_dir: Path

    @property
    def hash(self) -> str:
        return self.contract.hash


def plant_signal(df: pd.DataFrame, signal: float, seed: int = 0) -> pd.DataFrame:
    """Return a copy of ``df`` whose targets depend on ``snap_f0`` with strength ``signal`` (see module doc)."""
    rng = np.random.default_rng(seed + 10_000)
    out = df.copy()
    x = out["snap_f0"].to_numpy(dtype=np.float64)
    out["seq_f0"] = out["snap_f0"]
    z = (x - np.nanmean(x)) / np.nanstd(x)
    z = np.nan_to_num(z, nan=0.0)
    eligible = out["label_eligible"].to_numpy(dtype=bool)
    n = len(out)
    early = signal * z + rng.normal(size=n)
    quality = signal * z + rng.normal(size=n)
    direction = signal * z + rng.normal(size=n)
    offset = np.abs(rng.normal(0.0, 0.1, size=n))
    columns = {
        "early_move": early,
        "mfe_6": np.maximum(early, 0.0) + offset,
        "mae_6": np.maximum(-early, 0.0) + offset,
        "tb_return_atr": quality,
    }
    for h in (1, 5, 10, 20):
        columns[f"fwd_ret_{h}"] = 0.002 * np.sqrt(h / 20) * direction
    for name, values in columns.items():
        out[name] = np.where(eligible, values, np.nan)
    label = np.where(direction > 0.5, 1, np.where(direction < -0.5, -1, 0))
    out["tb_label"] = np.where(eligible, label, 0).astype(np.int8)
    return out


# bars per symbol whose test split (15 %) holds >= 10 independent 20-bar label windows
GATE_BARS = 2000


def make_training_data(
    root: str | Path,
    *,
    n_symbols: int = 6,
    n_bars: int = 300,
    seq_len: int = 8,
    context: bool = True,
    seed: int = 0,
    signal: float | None = None,
    arrow: bool = False,
) -> TrainingData:
    """Write contract, schema, scalers and HDF5 splits (and with ``arrow`` the Arrow cache) under ``root``."""
    paths = ArtifactPaths(data_dir=Path(root))
    df, assignment, contract = make_labelled_dataset(
        n_symbols=n_symbols, n_bars=n_bars, seq_len=seq_len, context=context, seed=seed
    )
    if signal is not None:
        df = plant_signal(df, signal, seed)
    contract.write(paths.features_dir)
    fitted = scalers.fit_scalers(df, assignment, contract)
    scalers.save_scalers(paths.scalers_dir, fitted)
    written = hdf5_splits.write_splits(df, assignment, contract, fitted, LABEL_PARAMS, paths.hdf5_dir)
    if arrow:
        from sentinel_pipeline.data import arrow_cache

        for split in ("train", "val"):
            arrow_cache.build_cache(written[split])
    return TrainingData(
        paths=paths,
        contract=contract,
        train_h5=written["train"],
        val_h5=written["val"],
        test_h5=written["test"],
        schema=paths.feature_schema,
        contract_path=paths.feature_contract,
        scalers_dir=paths.scalers_dir,
    )


def train_config(data: TrainingData, out_dir: str | Path, **overrides: object) -> TrainConfig:
    """A small, fast :class:`TrainConfig` on ``data`` (1 thread, seq_len of the contract, 2 epochs)."""
    fields: dict[str, object] = {
        "train_h5": data.train_h5,
        "val_h5": data.val_h5,
        "feature_schema": data.schema,
        "out_dir": out_dir,
        "seq_len": data.contract.seq_len,
        "epochs": 2,
        "device": "cpu",
        "threads": 1,
        "log_every": 10,
    }
    fields.update(overrides)
    return TrainConfig(**fields)  # type: ignore[arg-type]
