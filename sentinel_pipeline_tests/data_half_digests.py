"""Digests of everything the data half produces, to prove that a change of its I/O left the outputs as
they were: per table and column (name, dtype, values), the HDF5 splits (arrays and attributes), the
Arrow cache (arrays and metadata), the scaler parameters and the split assignment and summary.

``test_data_half_identical.py`` pins the digests that the data half gave on two small inputs before
its intermediate files changed format (labels in their own file, Arrow IPC instead of parquet).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pandas as pd

from sentinel_pipeline.data.arrow_cache import open_split
from sentinel_pipeline.data.hdf5_splits import read_split
from sentinel_pipeline.data.split_arrays import ARRAY_DTYPES
from sentinel_pipeline.paths import SPLITS, ArtifactPaths


def _short(h: Any) -> str:
    return h.hexdigest()[:16]


def column_digest(values: pd.Series) -> str:
    """sha256 of a column's dtype and values (strings and categories by value, NaN/NaT by position)."""
    h = hashlib.sha256(str(values.dtype).encode())
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        h.update(np.ascontiguousarray(pd.DatetimeIndex(values).asi8).view(np.uint8))
    elif values.dtype.kind in "biufcmM":
        h.update(np.ascontiguousarray(values.to_numpy()).view(np.uint8))
    else:
        h.update(pd.util.hash_pandas_object(values.astype(object), index=False).to_numpy().view(np.uint8))
    return _short(h)


def frame_digests(frame: pd.DataFrame) -> dict[str, str]:
    """``{"#columns": the column names in order, "#rows": row count, column: its digest}``."""
    out = {"#columns": _short(hashlib.sha256(json.dumps(list(map(str, frame.columns))).encode())),
           "#rows": str(len(frame))}
    out.update({str(c): column_digest(frame[c]) for c in frame.columns})
    return out


def _arrays_digest(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    out = {}
    for name in ARRAY_DTYPES:
        a = np.ascontiguousarray(arrays[name])
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))
        out[name] = _short(h)
    return out


def _json_digest(obj: Any) -> str:
    return _short(hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()))


def artefact_digests(paths: ArtifactPaths, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """Digests of the data half's outputs under ``paths``; ``tables`` are its bar-ordered tables as
    frames (bars, bar flags, features, the labelled dataset, the split assignment), read by the caller."""
    out: dict[str, Any] = {name: frame_digests(frame) for name, frame in tables.items()}
    info = json.loads(paths.scalers_info.read_text())
    out["scalers"] = {k: _json_digest(info[k]) for k in sorted(info) if k != "sklearn_version"}
    out["split_summary"] = _json_digest(json.loads(paths.split_summary.read_text()))
    for s in SPLITS:
        h5 = read_split(paths.h5(s), verify_checksum=True)
        out[f"h5_{s}"] = {**_arrays_digest(h5.arrays()),
                          "attrs": _json_digest({k: v for k, v in h5.attrs.items() if k != "path"})}
        cache = open_split(paths.arrow(s))
        out[f"arrow_{s}"] = {**_arrays_digest(cache.arrays()),
                             "meta": _json_digest({k: v for k, v in cache.attrs.items()
                                                   if k not in ("path", "source_path")})}
    return out
