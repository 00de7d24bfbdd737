"""The in-memory form of one split (train/val/test): flat per-bar rows, never pre-built windows.

Both readers (``hdf5_splits.read_split`` and ``arrow_cache.open_split``) return a ``SplitArrays``;
the training loader only ever sees this type. Row ``i`` is one bar of one symbol; rows are sorted by
(symbol, timestamp). ``sample_end_rows`` lists the rows at which a sample ends: for each of them the
``seq_len`` rows ``[end - seq_len + 1, end]`` belong to the same symbol and have valid features (the
warm-up rows a window needs are part of the split's rows, but are never sample ends themselves).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# the float targets stored per row, in this order (column j of ``targets``)
TARGET_NAMES: tuple[str, ...] = (
    "fwd_ret_1",
    "fwd_ret_5",
    "fwd_ret_10",
    "fwd_ret_20",
    "mfe_6",
    "mae_6",
    "early_move",
    "tb_return",
    "tb_return_atr",
)

# arrays that make up a split, with their dtypes; the checksum covers exactly these, in this order
ARRAY_DTYPES: dict[str, str] = {
    "seq": "float32",
    "snap": "float32",
    "ctx_cat": "int32",
    "ctx_cont": "float32",
    "targets": "float32",
    "tb_label": "int8",
    "symbol_idx": "int32",
    "timestamp": "int64",
    "sample_end_rows": "int64",
}


@dataclass
class SplitArrays:
    split: str
    seq: np.ndarray  # (N, F_seq) float32, scaled with the train-fitted seq scaler
    snap: np.ndarray  # (N, F_snap) float32, scaled with the train-fitted snap scaler
    ctx_cat: np.ndarray  # (N, C_cat) int32, category codes 0..cardinality-1 (C_cat = 0 when context is off)
    ctx_cont: np.ndarray  # (N, C_cont) float32
    targets: np.ndarray  # (N, len(target_names)) float32, NaN where a row has no label window
    tb_label: np.ndarray  # (N,) int8 in {-1, 0, 1}; 0 for rows without a label (never sample ends)
    symbol_idx: np.ndarray  # (N,) int32 index into ``symbols``
    timestamp: np.ndarray  # (N,) int64 nanoseconds since epoch, UTC
    sample_end_rows: np.ndarray  # (M,) int64 sorted row indices of eligible sample ends
    feature_contract_hash: str
    feature_names: dict[str, list[str]]  # group -> names, in contract order
    target_names: list[str] = field(default_factory=lambda: list(TARGET_NAMES))
    symbols: list[str] = field(default_factory=list)
    seq_len: int = 30
    label_params: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)  # everything else the file carried

    @property
    def n_rows(self) -> int:
        return int(self.seq.shape[0])

    @property
    def n_samples(self) -> int:
        return int(self.sample_end_rows.shape[0])

    def target(self, name: str) -> np.ndarray:
        return self.targets[:, self.target_names.index(name)]

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAY_DTYPES}


def content_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the shapes, dtypes and bytes of a split's arrays (in ``ARRAY_DTYPES`` order).

    Used to prove that the Arrow cache holds exactly what its HDF5 source holds.
    """
    h = hashlib.sha256()
    for name in ARRAY_DTYPES:
        a = np.ascontiguousarray(arrays[name])
        h.update(checksum_header(name, a.dtype, a.shape))
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def checksum_header(name: str, dtype: np.dtype | str, shape: tuple[int, ...]) -> bytes:
    """The bytes :func:`content_checksum` hashes before an array's data (for writers that hash as they
    write, one chunk at a time)."""
    return f"{name}:{np.dtype(dtype).str}:{tuple(shape)};".encode()
