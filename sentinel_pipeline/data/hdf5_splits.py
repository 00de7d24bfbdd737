"""Stage 6: ``train.h5`` / ``val.h5`` / ``test.h5``, the training contract (writer + reader).

One HDF5 file per split holds flat per-bar rows (never pre-built windows), with one dataset per
:class:`~sentinel_pipeline.data.split_arrays.SplitArrays` array: ``seq, snap, ctx_cat, ctx_cont,
targets, tb_label, symbol_idx, timestamp, sample_end_rows``.

Rows of a split: the split's own bars plus, per symbol, the ``seq_len - 1`` bars immediately before
the symbol's first bar of the split (warm-up rows, taken from the previous split; never rows after the
split). Rows stay sorted by (symbol, timestamp). ``seq``/``snap`` are scaled with the train-fitted
scalers; rows with invalid features get non-finite inputs replaced by the scaled centre (0) so the file
is NaN-free (such rows are never inside a sample window). ``ctx_cont`` is stored unscaled (non-finite
values -> 0 likewise), ``targets`` are float32 in ``TARGET_NAMES`` order (NaN where a row has no
label). ``symbol_idx`` indexes the ``symbols`` attribute: the sorted symbols of the whole dataset, the
same list in all three files. ``sample_end_rows`` are the rows of the split itself (not warm-up) with
``sample_ok`` whose ``seq_len``-row window lies inside one symbol, is contiguous in the source
dataset and has ``feature_valid`` on every row.

File attributes: ``feature_contract_hash``, ``feature_names`` (JSON {group: [names]}),
``target_names`` (JSON), ``symbols`` (JSON), ``seq_len``, ``label_params`` (JSON), ``split``,
``content_checksum`` (``split_arrays.content_checksum``), ``time_min``/``time_max`` (ISO-8601 UTC of
the split's own bars, "" when empty), ``n_samples``, plus ``format``, ``n_rows``, ``n_warmup_rows``.

Layout decision: datasets are **contiguous and uncompressed**. Training reads a whole split at once;
a contiguous dataset is one extent on disk that HDF5 copies with a single read (no chunk B-tree, no
per-chunk filter pipeline), which is the fastest full read HDF5 offers. Chunking would only pay off for
partial reads, compression or appendable datasets, none of which this file needs
(``bench/bench_split_read.py`` measures contiguous against 1 MiB chunks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from sentinel_pipeline.atomic_io import atomic_path
from sentinel_pipeline.data.feature_contract import FEATURE_GROUPS, ContractError, FeatureContract
from sentinel_pipeline.data.scalers import FittedScalers, transform_filled
from sentinel_pipeline.data.split_arrays import ARRAY_DTYPES, TARGET_NAMES, SplitArrays, content_checksum
from sentinel_pipeline.paths import SPLITS

FORMAT = "sentinel-split/1"
JSON_ATTRS: tuple[str, ...] = ("feature_names", "target_names", "symbols", "label_params")
REQUIRED_ATTRS: tuple[str, ...] = (
    "feature_contract_hash",
    "feature_names",
    "target_names",
    "symbols",
    "seq_len",
    "label_params",
    "split",
    "content_checksum",
    "time_min",
    "time_max",
    "n_samples",
)
# attrs that become SplitArrays fields; everything else goes to SplitArrays.attrs
_FIELD_ATTRS = ("feature_contract_hash", "feature_names", "target_names", "symbols", "seq_len", "label_params", "split")
# attrs a reader adds to SplitArrays.attrs that are never written back to a file
READER_ATTRS = ("path",)


class SplitFileError(ValueError):
    """A file is not a readable split written by this module (or is internally inconsistent)."""


# ---------------------------------------------------------------------------------------------
# building the arrays (no IO)
# ---------------------------------------------------------------------------------------------


def _timestamps_ns(ts: pd.Series) -> np.ndarray:
    if not isinstance(ts.dtype, pd.DatetimeTZDtype):
        raise ValueError(f"timestamp column must be tz-aware UTC datetimes, got dtype {ts.dtype}")
    return pd.DatetimeIndex(ts).tz_convert("UTC").as_unit("ns").asi8.astype(np.int64, copy=False)


def _iso(ns: int) -> str:
    return pd.Timestamp(int(ns), tz="UTC").isoformat()


def window_ok_mask(symbol_codes: np.ndarray, feature_valid: np.ndarray, seq_len: int) -> np.ndarray:
    """``ok[r]``: rows ``r-seq_len+1 .. r`` exist, share ``symbol_codes[r]`` and all have valid features."""
    n = len(symbol_codes)
    ok = np.zeros(n, dtype=bool)
    if n < seq_len:
        return ok
    n_bad = np.concatenate([[0], np.cumsum(~feature_valid.astype(bool), dtype=np.int64)])
    r = np.arange(seq_len - 1, n)
    lo = r - seq_len + 1
    ok[seq_len - 1 :] = (n_bad[r + 1] == n_bad[lo]) & (symbol_codes[lo] == symbol_codes[r])
    return ok


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for each pair, vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    group_offset = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total) - group_offset)


def split_rows(
    split_mask: np.ndarray, symbol_codes: np.ndarray, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one split: its own rows plus per symbol the ``seq_len-1`` rows before its first row.

    Returns ``(rows, is_own)``: sorted dataset row indices and whether each is a row of the split
    itself (False for warm-up rows). ``symbol_codes`` must be sorted (rows sorted by symbol).
    """
    own = np.flatnonzero(split_mask).astype(np.int64)
    if own.size == 0:
        return own, np.zeros(0, dtype=bool)
    n = len(symbol_codes)
    sym_start = np.flatnonzero(np.concatenate([[True], symbol_codes[1:] != symbol_codes[:-1]]))
    start_of_code = np.zeros(int(symbol_codes.max()) + 1, dtype=np.int64)
    start_of_code[symbol_codes[sym_start]] = sym_start
    _, first_idx = np.unique(symbol_codes[own], return_index=True)
    first = own[first_idx]
    warm_start = np.maximum(start_of_code[symbol_codes[first]], first - (seq_len - 1))
    warm = _ranges(warm_start, first - warm_start)
    rows = np.union1d(own, warm).astype(np.int64)
    is_own = np.zeros(n, dtype=bool)
    is_own[own] = True
    return rows, is_own[rows]


def _label_params_dict(label_params: Any) -> dict[str, Any]:
    if label_params is None:
        return {}
    if is_dataclass(label_params) and not isinstance(label_params, type):
        return asdict(label_params)
    if isinstance(label_params, Mapping):
        return dict(label_params)
    raise TypeError(f"label_params must be a mapping or a dataclass, got {type(label_params).__name__}")


def _check_inputs(dataset: pd.DataFrame, assignment: pd.DataFrame, contract: FeatureContract,
                  scalers: FittedScalers) -> None:
    if len(dataset) != len(assignment):
        raise ValueError(f"dataset has {len(dataset)} rows but the split assignment has {len(assignment)}")
    need = ["symbol", "timestamp", "feature_valid", "tb_label", *TARGET_NAMES, *contract.all_names]
    missing = [c for c in need if c not in dataset.columns]
    if missing:
        raise ValueError(f"dataset lacks columns {missing}")
    missing = [c for c in ("split", "sample_ok") if c not in assignment.columns]
    if missing:
        raise ValueError(f"split assignment lacks columns {missing}")
    unknown = sorted(set(pd.unique(assignment["split"])) - set(SPLITS))
    if unknown:
        raise ValueError(f"split assignment has unknown split names {unknown}")
    fitted_hash = scalers.info.get("feature_contract_hash")
    if fitted_hash != contract.hash:
        raise ContractError(f"scalers were fitted for feature contract {fitted_hash}, dataset contract is {contract.hash}")
    for group in ("seq", "snap"):
        if scalers.scaler(group).n_features_in_ != len(contract.names(group)):
            raise ContractError(
                f"{group} scaler has {scalers.scaler(group).n_features_in_} features, "
                f"contract {contract.hash} has {len(contract.names(group))}"
            )


def build_split_arrays(
    dataset: pd.DataFrame,
    assignment: pd.DataFrame,
    contract: FeatureContract,
    scalers: FittedScalers,
    label_params: Mapping[str, Any] | Any = None,
) -> dict[str, SplitArrays]:
    """The in-memory ``SplitArrays`` of train/val/test (what :func:`write_splits` writes)."""
    _check_inputs(dataset, assignment, contract, scalers)
    seq_len = contract.seq_len
    symbols = sorted(str(s) for s in pd.unique(dataset["symbol"]))
    codes = pd.Categorical(dataset["symbol"].astype(str), categories=symbols).codes.astype(np.int32)
    ts = _timestamps_ns(dataset["timestamp"])
    if len(ts) > 1:
        step_back = (codes[1:] < codes[:-1]) | ((codes[1:] == codes[:-1]) & (ts[1:] <= ts[:-1]))
        if step_back.any():
            i = int(np.flatnonzero(step_back)[0]) + 1
            raise ValueError(f"dataset is not sorted by (symbol, timestamp) with unique keys: row {i}")
    valid = dataset["feature_valid"].to_numpy(dtype=bool)
    sample_ok = assignment["sample_ok"].to_numpy(dtype=bool)
    split_col = assignment["split"].astype(str).to_numpy()
    window_ok = window_ok_mask(codes, valid, seq_len)

    full = {
        "seq": transform_filled(scalers.seq, dataset[contract.names("seq")].to_numpy(dtype=np.float32)),
        "snap": transform_filled(scalers.snap, dataset[contract.names("snap")].to_numpy(dtype=np.float32)),
        "ctx_cat": dataset[contract.names("ctx_cat")].to_numpy(dtype=np.int32),
        "ctx_cont": np.nan_to_num(
            dataset[contract.names("ctx_cont")].to_numpy(dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0
        ),
        "targets": dataset[list(TARGET_NAMES)].to_numpy(dtype=np.float32),
        "tb_label": dataset["tb_label"].to_numpy(dtype=np.int8),
        "symbol_idx": codes,
        "timestamp": ts,
    }
    feature_names = {g: contract.names(g) for g in FEATURE_GROUPS}
    params = _label_params_dict(label_params)

    out: dict[str, SplitArrays] = {}
    for split in SPLITS:
        in_split = split_col == split
        rows, is_own = split_rows(in_split, codes, seq_len)
        contiguous = np.zeros(len(rows), dtype=bool)
        if len(rows) >= seq_len:
            contiguous[seq_len - 1 :] = rows[seq_len - 1 :] - rows[: len(rows) - seq_len + 1] == seq_len - 1
        ends = np.flatnonzero(is_own & sample_ok[rows] & window_ok[rows] & contiguous).astype(np.int64)
        arrays = {name: np.ascontiguousarray(a[rows]) for name, a in full.items()}
        bad_targets = ~np.isfinite(arrays["targets"][ends]).all(axis=1)
        if bad_targets.any():
            raise ValueError(
                f"{split}: {int(bad_targets.sum())} rows flagged sample_ok have non-finite targets "
                f"(first at timestamp {_iso(arrays['timestamp'][ends[bad_targets][0]])})"
            )
        own_ts = ts[in_split]
        out[split] = SplitArrays(
            split=split,
            **arrays,
            sample_end_rows=ends,
            feature_contract_hash=contract.hash,
            feature_names=feature_names,
            target_names=list(TARGET_NAMES),
            symbols=symbols,
            seq_len=seq_len,
            label_params=params,
            attrs={
                "format": FORMAT,
                "time_min": _iso(own_ts.min()) if own_ts.size else "",
                "time_max": _iso(own_ts.max()) if own_ts.size else "",
                "n_rows": int(len(rows)),
                "n_warmup_rows": int((~is_own).sum()),
                "n_samples": int(len(ends)),
            },
        )
    return out


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def split_attrs(arrays: SplitArrays, checksum: str | None = None) -> dict[str, Any]:
    """The file attributes of a split (JSON strings for structured values), checksum included.

    ``checksum`` skips recomputing ``content_checksum`` when the caller already verified it.
    """
    attrs: dict[str, Any] = {k: v for k, v in arrays.attrs.items() if k not in _FIELD_ATTRS + READER_ATTRS}
    attrs.update(
        {
            "format": FORMAT,
            "split": arrays.split,
            "feature_contract_hash": arrays.feature_contract_hash,
            "feature_names": json.dumps(arrays.feature_names),
            "target_names": json.dumps(list(arrays.target_names)),
            "symbols": json.dumps(list(arrays.symbols)),
            "seq_len": int(arrays.seq_len),
            "label_params": json.dumps(arrays.label_params, sort_keys=True, default=str),
            "n_rows": arrays.n_rows,
            "n_samples": arrays.n_samples,
            "content_checksum": checksum if checksum is not None else content_checksum(arrays.arrays()),
        }
    )
    return attrs


def write_split_file(path: str | Path, arrays: SplitArrays) -> Path:
    """Write one split to ``path`` atomically (contiguous, uncompressed datasets)."""
    path = Path(path)
    attrs = split_attrs(arrays)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, dtype in ARRAY_DTYPES.items():
                f.create_dataset(name, data=np.ascontiguousarray(getattr(arrays, name), dtype=dtype))
            for key, value in attrs.items():
                f.attrs[key] = value
    return path


def write_splits(
    dataset: pd.DataFrame,
    assignment: pd.DataFrame,
    contract: FeatureContract,
    scalers: FittedScalers,
    label_params: Mapping[str, Any] | Any,
    out_dir: str | Path,
) -> dict[str, Path]:
    """Write ``train.h5``, ``val.h5``, ``test.h5`` into ``out_dir``; returns {split: path}."""
    out_dir = Path(out_dir)
    built = build_split_arrays(dataset, assignment, contract, scalers, label_params)
    return {split: write_split_file(out_dir / f"{split}.h5", arrays) for split, arrays in built.items()}


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise SplitFileError(f"{path}: not a readable HDF5 file: {exc}") from exc


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_attrs(path: Path, f: h5py.File) -> dict[str, Any]:
    missing_attrs = [a for a in REQUIRED_ATTRS if a not in f.attrs]
    missing_sets = [d for d in ARRAY_DTYPES if d not in f]
    if missing_attrs or missing_sets:
        raise SplitFileError(
            f"{path}: not a split file written by sentinel_pipeline "
            f"(missing attributes {missing_attrs}, missing datasets {missing_sets})"
        )
    attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
    for key in JSON_ATTRS:
        try:
            attrs[key] = json.loads(attrs[key])
        except (TypeError, json.JSONDecodeError) as exc:
            raise SplitFileError(f"{path}: attribute {key!r} is not valid JSON: {exc}") from exc
    return attrs


def check_hash(path: str | Path, found: str, expected_hash: str | None) -> None:
    """Raise ``ContractError`` naming ``path`` and both hashes when ``expected_hash`` is set and differs."""
    if expected_hash is not None and found != expected_hash:
        raise ContractError(f"{path}: feature contract hash {found} != expected {expected_hash}")


def validate_split_arrays(path: str | Path, arrays: SplitArrays) -> None:
    """Check dtypes, shapes and index ranges of a split read from ``path``; raise ``SplitFileError``."""
    problems: list[str] = []
    n = arrays.n_rows
    for name, dtype in ARRAY_DTYPES.items():
        a = getattr(arrays, name)
        if a.dtype != np.dtype(dtype):
            problems.append(f"{name} has dtype {a.dtype}, expected {dtype}")
        if name != "sample_end_rows" and a.shape[0] != n:
            problems.append(f"{name} has {a.shape[0]} rows, seq has {n}")
    for group in FEATURE_GROUPS:  # the four feature matrices are named after their groups
        width = len(arrays.feature_names.get(group, []))
        a = getattr(arrays, group)
        if a.ndim != 2 or a.shape[1] != width:
            problems.append(f"{group} has shape {a.shape}, feature_names list {width} {group} features")
    if arrays.targets.ndim != 2 or arrays.targets.shape[1] != len(arrays.target_names):
        problems.append(f"targets has shape {arrays.targets.shape}, target_names list {len(arrays.target_names)}")
    ends = arrays.sample_end_rows
    if ends.size and (ends.min() < arrays.seq_len - 1 or ends.max() >= n or (np.diff(ends) <= 0).any()):
        problems.append("sample_end_rows are not sorted, unique row indices with a full window")
    if arrays.symbol_idx.size and (arrays.symbol_idx.min() < 0 or arrays.symbol_idx.max() >= len(arrays.symbols)):
        problems.append("symbol_idx outside the symbols list")
    if problems:
        raise SplitFileError(f"{path}: inconsistent split file: " + "; ".join(problems))


def split_arrays_from_parts(path: str | Path, attrs: dict[str, Any], arrays: dict[str, np.ndarray]) -> SplitArrays:
    """Assemble and validate a ``SplitArrays`` from decoded file attributes and arrays.

    ``attrs`` of the result holds every non-field attribute plus ``path`` (the file it came from).
    """
    result = SplitArrays(
        split=str(attrs["split"]),
        **arrays,
        feature_contract_hash=str(attrs["feature_contract_hash"]),
        feature_names={g: list(attrs["feature_names"].get(g, [])) for g in FEATURE_GROUPS},
        target_names=list(attrs["target_names"]),
        symbols=list(attrs["symbols"]),
        seq_len=int(attrs["seq_len"]),
        label_params=dict(attrs["label_params"]),
        attrs={**{k: v for k, v in attrs.items() if k not in _FIELD_ATTRS}, "path": str(path)},
    )
    validate_split_arrays(path, result)
    return result


def read_split(path: str | Path, expected_hash: str | None = None, verify_checksum: bool = False) -> SplitArrays:
    """Read a whole split file into NumPy arrays.

    Raises ``ContractError`` (naming the file and both hashes) when ``expected_hash`` differs from the
    file's feature contract hash, ``SplitFileError`` for a file that is not one of ours or is
    inconsistent, and with ``verify_checksum`` also when the stored content checksum does not match.
    """
    path = Path(path)
    with _open_h5(path) as f:
        attrs = _read_attrs(path, f)
        check_hash(path, attrs["feature_contract_hash"], expected_hash)
        data = {}
        for name in ARRAY_DTYPES:
            ds = f[name]
            out = np.empty(ds.shape, dtype=ds.dtype)
            if out.size:
                ds.read_direct(out)
            data[name] = out
    result = split_arrays_from_parts(path, attrs, data)
    if verify_checksum:
        found = content_checksum(result.arrays())
        if found != attrs["content_checksum"]:
            raise SplitFileError(f"{path}: content checksum {found} != stored {attrs['content_checksum']}")
    return result


def read_split_attrs(path: str | Path) -> dict[str, Any]:
    """The decoded attributes of a split file without reading its arrays.

    ``n_rows`` and ``n_samples`` are taken from the dataset shapes (not from the stored attrs).
    """
    path = Path(path)
    with _open_h5(path) as f:
        attrs = _read_attrs(path, f)
        attrs["n_rows"] = int(f["seq"].shape[0])
        attrs["n_samples"] = int(f["sample_end_rows"].shape[0])
    return attrs


def split_summary(path: str | Path) -> dict[str, Any]:
    """Small JSON-able summary of a split file for UI metadata (reads only labels and sample ends)."""
    path = Path(path)
    with _open_h5(path) as f:
        attrs = _read_attrs(path, f)
        ends = f["sample_end_rows"][()]
        labels = f["tb_label"][()][ends] if ends.size else np.zeros(0, dtype=np.int8)
        n_rows = int(f["seq"].shape[0])
    counts = {str(k): int((labels == k).sum()) for k in (-1, 0, 1)}
    return {
        "split": attrs["split"],
        "path": str(path),
        "n_rows": n_rows,
        "n_warmup_rows": int(attrs.get("n_warmup_rows", 0)),
        "n_samples": int(ends.size),
        "n_symbols": len(attrs["symbols"]),
        "time_min": attrs["time_min"],
        "time_max": attrs["time_max"],
        "file_size_bytes": path.stat().st_size,
        "label_balance": counts,
        "label_fraction": {k: (v / ends.size if ends.size else 0.0) for k, v in counts.items()},
        "feature_contract_hash": attrs["feature_contract_hash"],
        "content_checksum": attrs["content_checksum"],
    }
