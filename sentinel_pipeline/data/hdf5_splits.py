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

Writers: :func:`write_splits` builds the files from an in-memory dataset one split at a time;
:func:`write_splits_from_dataset` writes the same files straight from the labelled dataset on disk in
row chunks (what the pipeline uses: neither the dataset nor a split is ever whole in memory). Readers:
:func:`read_split` copies a file into memory, :func:`map_split` views it in place (``mmap``).

Layout decision: datasets are **contiguous and uncompressed**. Training reads a whole split at once;
a contiguous dataset is one extent on disk that HDF5 copies with a single read (no chunk B-tree, no
per-chunk filter pipeline), which is the fastest full read HDF5 offers. Chunking would only pay off for
partial reads, compression or appendable datasets, none of which this file needs
(``bench/bench_split_read.py`` measures contiguous against 1 MiB chunks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from sentinel_pipeline.atomic_io import atomic_path
from sentinel_pipeline.data.dataset import LabelledDataset
from sentinel_pipeline.data.feature_contract import FEATURE_GROUPS, ContractError, FeatureContract
from sentinel_pipeline.data.scalers import FittedScalers, transform_filled_inplace
from sentinel_pipeline.data.split_arrays import (
    ARRAY_DTYPES,
    TARGET_NAMES,
    SplitArrays,
    checksum_header,
    content_checksum,
)
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
    # for r = seq_len-1 .. n-1 and lo = r-seq_len+1: n_bad[r+1] == n_bad[lo] and codes[lo] == codes[r] (slices)
    ok[seq_len - 1 :] = n_bad[seq_len:] == n_bad[: n - seq_len + 1]
    ok[seq_len - 1 :] &= symbol_codes[: n - seq_len + 1] == symbol_codes[seq_len - 1 :]
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
    own = np.flatnonzero(split_mask).astype(np.int64, copy=False)
    if own.size == 0:
        return own, np.zeros(0, dtype=bool)
    sym_start = np.flatnonzero(np.concatenate([[True], symbol_codes[1:] != symbol_codes[:-1]]))
    start_of_code = np.zeros(int(symbol_codes.max()) + 1, dtype=np.int64)
    start_of_code[symbol_codes[sym_start]] = sym_start
    own_codes = symbol_codes[own]  # sorted, as the rows are: each symbol's first own row starts a run
    first = own[np.flatnonzero(np.concatenate([[True], own_codes[1:] != own_codes[:-1]]))]
    warm_start = np.maximum(start_of_code[symbol_codes[first]], first - (seq_len - 1))
    # own rows and warm-up rows as one boolean mask: its nonzero rows are the sorted union
    in_rows = np.asarray(split_mask, dtype=bool).copy()
    in_rows[_ranges(warm_start, first - warm_start)] = True
    rows = np.flatnonzero(in_rows).astype(np.int64, copy=False)
    return rows, np.asarray(split_mask, dtype=bool)[rows]


def _label_params_dict(label_params: Any) -> dict[str, Any]:
    if label_params is None:
        return {}
    if is_dataclass(label_params) and not isinstance(label_params, type):
        return asdict(label_params)
    if isinstance(label_params, Mapping):
        return dict(label_params)
    raise TypeError(f"label_params must be a mapping or a dataclass, got {type(label_params).__name__}")


def _check_inputs(dataset_columns: list[str], n_rows: int, assignment: pd.DataFrame, contract: FeatureContract,
                  scalers: FittedScalers) -> None:
    if n_rows != len(assignment):
        raise ValueError(f"dataset has {n_rows} rows but the split assignment has {len(assignment)}")
    need = [*INDEX_COLUMNS, *TARGET_NAMES, *contract.all_names]
    missing = [c for c in need if c not in dataset_columns]
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


_CHUNK_ROWS = 1 << 16  # rows gathered (and scaled) at a time: bounds the temporaries
# the per-row dataset columns every split needs besides the feature matrices and targets
INDEX_COLUMNS: tuple[str, ...] = ("symbol", "timestamp", "feature_valid", "tb_label")
# the arrays gathered from several dataset columns each: the four feature groups, then the targets
_MATRICES: tuple[str, ...] = (*FEATURE_GROUPS, "targets")
assert _MATRICES == tuple(ARRAY_DTYPES)[: len(_MATRICES)], "matrices come first in the file/checksum order"


@dataclass
class _Plan:
    """What the three splits need besides the matrices: per-row arrays and each split's rows."""

    contract: FeatureContract
    scalers: FittedScalers
    symbols: list[str]
    codes: np.ndarray  # int32 symbol index per dataset row
    ts: np.ndarray  # int64 ns per dataset row
    tb_label: np.ndarray  # int8 per dataset row
    rows: dict[str, np.ndarray]  # split -> sorted dataset rows (own + warm-up)
    is_own: dict[str, np.ndarray]  # split -> per split row: a row of the split itself
    ends: dict[str, np.ndarray]  # split -> sample_end_rows
    label_params: dict[str, Any]

    def column_names(self, name: str) -> list[str]:
        """The dataset columns behind matrix ``name``, in order."""
        return list(TARGET_NAMES) if name == "targets" else self.contract.names(name)


def _codes_of(values: pd.Series, names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Per-row int32 index of ``str(value)`` in ``names`` (default: the sorted distinct ``str`` values;
    -1 where a value is not in ``names``), factorised without per-row Python strings."""
    local, uniques = pd.factorize(values, sort=False, use_na_sentinel=False)
    as_str = [str(u) for u in uniques]
    if names is None:
        names = sorted(set(as_str))
    index = {name: i for i, name in enumerate(names)}
    lookup = np.array([index.get(u, -1) for u in as_str] + [-1], dtype=np.int32)
    return lookup[local], names


def _plan(
    index: pd.DataFrame,
    dataset_columns: list[str],
    n_rows: int,
    assignment: pd.DataFrame,
    contract: FeatureContract,
    scalers: FittedScalers,
    label_params: Mapping[str, Any] | Any,
) -> _Plan:
    """Check the inputs and select each split's rows; ``index`` holds (at least) the ``INDEX_COLUMNS`` of
    the dataset, whose columns are ``dataset_columns`` and which has ``n_rows`` rows."""
    _check_inputs(dataset_columns, n_rows, assignment, contract, scalers)
    seq_len = contract.seq_len
    codes, symbols = _codes_of(index["symbol"])
    ts = _timestamps_ns(index["timestamp"])
    if len(ts) > 1:
        step_back = (codes[1:] < codes[:-1]) | ((codes[1:] == codes[:-1]) & (ts[1:] <= ts[:-1]))
        if step_back.any():
            i = int(np.flatnonzero(step_back)[0]) + 1
            raise ValueError(f"dataset is not sorted by (symbol, timestamp) with unique keys: row {i}")
    split_code, _ = _codes_of(assignment["split"], list(SPLITS))
    sample_ok = assignment["sample_ok"].to_numpy(dtype=bool)
    window_ok = window_ok_mask(codes, index["feature_valid"].to_numpy(dtype=bool), seq_len)
    plan = _Plan(contract=contract, scalers=scalers, symbols=symbols, codes=codes, ts=ts,
                 tb_label=index["tb_label"].to_numpy(dtype=np.int8), rows={}, is_own={}, ends={},
                 label_params=_label_params_dict(label_params))
    for k, split in enumerate(SPLITS):
        rows, is_own = split_rows(split_code == k, codes, seq_len)
        contiguous = np.zeros(len(rows), dtype=bool)
        if len(rows) >= seq_len:
            contiguous[seq_len - 1 :] = rows[seq_len - 1 :] - rows[: len(rows) - seq_len + 1] == seq_len - 1
        plan.rows[split], plan.is_own[split] = rows, is_own
        plan.ends[split] = np.flatnonzero(is_own & sample_ok[rows] & window_ok[rows] & contiguous).astype(np.int64, copy=False)
    return plan


def _build_matrices(plan: _Plan, split: str, block: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The matrices of a split from ``block`` (every dataset column name -> its values), in row chunks
    so that the only temporaries are one chunk's."""
    rows = plan.rows[split]
    out: dict[str, np.ndarray] = {}
    for name in _MATRICES:
        out[name] = np.empty((rows.size, len(plan.column_names(name))), dtype=ARRAY_DTYPES[name])
        for start in range(0, rows.size if out[name].shape[1] else 0, _CHUNK_ROWS):
            chunk_rows = rows[start : start + _CHUNK_ROWS]
            _fill_chunk(plan, name, out[name][start : start + chunk_rows.size], chunk_rows, block)
    return out


def _fill_chunk(plan: _Plan, name: str, chunk: np.ndarray, local_rows: np.ndarray, block: Mapping[str, np.ndarray]) -> None:
    """``chunk[i]`` = matrix ``name`` at block row ``local_rows[i]``, in final form: ``seq``/``snap``
    scaled (``scalers.transform_filled``), ``ctx_cont`` non-finite -> 0, narrowed to the array dtype."""
    for j, column in enumerate(plan.column_names(name)):
        chunk[:, j] = block[column][local_rows]
    if name in ("seq", "snap"):
        transform_filled_inplace(plan.scalers.scaler(name), chunk)
    elif name == "ctx_cont":
        np.nan_to_num(chunk, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def _finish(plan: _Plan, split: str, matrices: dict[str, np.ndarray]) -> SplitArrays:
    rows, ends = plan.rows[split], plan.ends[split]
    timestamp = plan.ts[rows]
    bad_targets = ~np.isfinite(matrices["targets"][ends]).all(axis=1)
    if bad_targets.any():
        raise ValueError(
            f"{split}: {int(bad_targets.sum())} rows flagged sample_ok have non-finite targets "
            f"(first at timestamp {_iso(timestamp[ends[bad_targets][0]])})"
        )
    return SplitArrays(
        split=split,
        **matrices,
        tb_label=plan.tb_label[rows],
        symbol_idx=plan.codes[rows],
        timestamp=timestamp,
        sample_end_rows=ends,
        feature_contract_hash=plan.contract.hash,
        feature_names={g: plan.contract.names(g) for g in FEATURE_GROUPS},
        target_names=list(TARGET_NAMES),
        symbols=plan.symbols,
        seq_len=plan.contract.seq_len,
        label_params=plan.label_params,
        attrs=_split_info(plan, split, timestamp),
    )


def _split_info(plan: _Plan, split: str, timestamp: np.ndarray) -> dict[str, Any]:
    """The ``SplitArrays.attrs`` of a split (``timestamp``: its rows' timestamps)."""
    is_own = plan.is_own[split]
    own_ts = timestamp[is_own]
    return {
        "format": FORMAT,
        "time_min": _iso(own_ts.min()) if own_ts.size else "",
        "time_max": _iso(own_ts.max()) if own_ts.size else "",
        "n_rows": int(len(plan.rows[split])),
        "n_warmup_rows": int((~is_own).sum()),
        "n_samples": int(len(plan.ends[split])),
    }


def _frame_block(dataset: pd.DataFrame, plan: _Plan) -> dict[str, np.ndarray]:
    """Every matrix column of an in-memory dataset as a NumPy array (views where the dtype allows)."""
    block: dict[str, np.ndarray] = {}
    for name in _MATRICES:
        kind = np.dtype(ARRAY_DTYPES[name]).kind
        for col in plan.column_names(name):
            values = dataset[col].to_numpy()
            block[col] = values if values.dtype.kind == kind else dataset[col].to_numpy(dtype=ARRAY_DTYPES[name])
    return block


def _frame_splits(
    dataset: pd.DataFrame,
    assignment: pd.DataFrame,
    contract: FeatureContract,
    scalers: FittedScalers,
    label_params: Mapping[str, Any] | Any,
) -> Iterator[SplitArrays]:
    """The splits of an in-memory dataset, built one at a time."""
    plan = _plan(dataset, list(dataset.columns), len(dataset), assignment, contract, scalers, label_params)
    block = _frame_block(dataset, plan)
    for split in SPLITS:
        yield _finish(plan, split, _build_matrices(plan, split, block))


def build_split_arrays(
    dataset: pd.DataFrame,
    assignment: pd.DataFrame,
    contract: FeatureContract,
    scalers: FittedScalers,
    label_params: Mapping[str, Any] | Any = None,
) -> dict[str, SplitArrays]:
    """The in-memory ``SplitArrays`` of train/val/test (what :func:`write_splits` writes)."""
    return {arrays.split: arrays for arrays in _frame_splits(dataset, assignment, contract, scalers, label_params)}


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def split_attrs(arrays: SplitArrays, checksum: str | None = None) -> dict[str, Any]:
    """The file attributes of a split (JSON strings for structured values), checksum included.

    ``checksum`` skips recomputing ``content_checksum`` when the caller already verified it.
    """
    return _file_attrs(
        arrays.attrs,
        split=arrays.split,
        feature_contract_hash=arrays.feature_contract_hash,
        feature_names=arrays.feature_names,
        target_names=list(arrays.target_names),
        symbols=list(arrays.symbols),
        seq_len=int(arrays.seq_len),
        label_params=arrays.label_params,
        n_rows=arrays.n_rows,
        n_samples=arrays.n_samples,
        checksum=checksum if checksum is not None else content_checksum(arrays.arrays()),
    )


def _file_attrs(
    extra: Mapping[str, Any],
    *,
    split: str,
    feature_contract_hash: str,
    feature_names: dict[str, list[str]],
    target_names: list[str],
    symbols: list[str],
    seq_len: int,
    label_params: dict[str, Any],
    n_rows: int,
    n_samples: int,
    checksum: str,
) -> dict[str, Any]:
    attrs: dict[str, Any] = {k: v for k, v in extra.items() if k not in _FIELD_ATTRS + READER_ATTRS}
    attrs.update(
        {
            "format": FORMAT,
            "split": split,
            "feature_contract_hash": feature_contract_hash,
            "feature_names": json.dumps(feature_names),
            "target_names": json.dumps(target_names),
            "symbols": json.dumps(symbols),
            "seq_len": seq_len,
            "label_params": json.dumps(label_params, sort_keys=True, default=str),
            "n_rows": n_rows,
            "n_samples": n_samples,
            "content_checksum": checksum,
        }
    )
    return attrs


def write_split_file(path: str | Path, arrays: SplitArrays) -> Path:
    """Write one split to ``path`` atomically (contiguous, uncompressed datasets)."""
    path = Path(path)
    # the checksum is computed in a second thread while the datasets are written (h5py and hashlib
    # both release the GIL); the attributes follow the datasets
    with ThreadPoolExecutor(max_workers=1) as pool, atomic_path(path) as tmp:
        checksum = pool.submit(content_checksum, arrays.arrays())
        with h5py.File(tmp, "w") as f:
            for name, dtype in ARRAY_DTYPES.items():
                f.create_dataset(name, data=np.ascontiguousarray(getattr(arrays, name), dtype=dtype))
            for key, value in split_attrs(arrays, checksum=checksum.result()).items():
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
    """Write ``train.h5``, ``val.h5``, ``test.h5`` into ``out_dir``; returns {split: path}.

    One split is in memory at a time (besides ``dataset``).
    """
    out_dir = Path(out_dir)
    return {
        arrays.split: write_split_file(out_dir / f"{arrays.split}.h5", arrays)
        for arrays in _frame_splits(dataset, assignment, contract, scalers, label_params)
    }


def write_splits_from_dataset(
    dataset: LabelledDataset,
    assignment: pd.DataFrame,
    contract: FeatureContract,
    scalers: FittedScalers,
    label_params: Mapping[str, Any] | Any,
    out_dir: str | Path,
) -> dict[str, Path]:
    """:func:`write_splits` for the labelled dataset on disk (features + labels side by side): the same
    files, written in row chunks from the memory-mapped columns, so neither the dataset nor a split is
    ever whole in memory (only the ``INDEX_COLUMNS`` and the columns of one matrix, mapped). Each matrix is
    written in one pass for all three files, so every file's content checksum is computed as its bytes
    are written, in file order. ``assignment`` needs ``split`` and ``sample_ok``. Errors name the
    features file."""
    out_dir = Path(out_dir)
    index = dataset.frame([c for c in INDEX_COLUMNS if c in dataset.names])
    try:
        plan = _plan(index, dataset.names, dataset.num_rows, assignment, contract, scalers, label_params)
    except ValueError as exc:  # ContractError included: same type, message names the file
        raise type(exc)(f"{dataset.features_path}: {exc}") from exc
    del index
    paths = {split: out_dir / f"{split}.h5" for split in SPLITS}
    with contextlib.ExitStack() as stack:
        writers = {}
        for split in SPLITS:  # each file is closed before it is renamed into place
            tmp = stack.enter_context(atomic_path(paths[split]))
            writers[split] = _StreamedSplit(plan, split, stack.enter_context(h5py.File(tmp, "w")))
        for name in _MATRICES:
            names = plan.column_names(name)
            for writer in writers.values():
                writer.begin_matrix(name)
            if names:
                block = dataset.columns(names)  # nulls -> NaN, as pandas reads them
                for writer in writers.values():
                    writer.add_rows(0, block)
                del block  # unmaps the columns' pages
            for writer in writers.values():
                writer.end_matrix()
        for writer in writers.values():
            writer.finish()
    return paths


class _StreamedSplit:
    """One split file written matrix by matrix in row chunks, hashed as written (the byte stream of
    ``split_arrays.content_checksum``: per array in ``ARRAY_DTYPES`` order its ``checksum_header``,
    then its C-order bytes)."""

    def __init__(self, plan: _Plan, split: str, f: h5py.File) -> None:
        self.plan, self.split, self.f = plan, split, f
        self.rows = plan.rows[split]
        self.hash = hashlib.sha256()
        self.name = ""
        self.buffer = np.empty((0, 0))
        self.bad_targets = 0
        self.first_bad_row = -1

    def _header(self, name: str, shape: tuple[int, ...]) -> None:
        self.hash.update(checksum_header(name, ARRAY_DTYPES[name], shape))

    def begin_matrix(self, name: str) -> None:
        shape = (int(self.rows.size), len(self.plan.column_names(name)))
        self.name = name
        self._header(name, shape)
        self.dataset = self.f.create_dataset(name, shape=shape, dtype=ARRAY_DTYPES[name])
        self.buffer = np.empty((min(_CHUNK_ROWS, shape[0]), shape[1]), dtype=ARRAY_DTYPES[name])

    def add_rows(self, offset: int, block: Mapping[str, np.ndarray]) -> None:
        """Write the split rows that fall in dataset rows ``offset .. offset + len(block)``."""
        n_block = len(next(iter(block.values())))
        lo, hi = (int(i) for i in np.searchsorted(self.rows, [offset, offset + n_block]))
        for start in range(lo, hi, _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, hi)
            chunk = self.buffer[: stop - start]
            _fill_chunk(self.plan, self.name, chunk, self.rows[start:stop] - offset, block)
            if self.name == "targets":
                self._check_targets(start, chunk)
            self.dataset[start:stop] = chunk
            self.hash.update(chunk.reshape(-1).view(np.uint8))

    def _check_targets(self, start: int, chunk: np.ndarray) -> None:
        ends = self.plan.ends[self.split]
        at = ends[np.searchsorted(ends, start) : np.searchsorted(ends, start + len(chunk))] - start
        bad = ~np.isfinite(chunk[at]).all(axis=1)
        if bad.any():
            self.first_bad_row = int(at[bad][0]) + start if self.first_bad_row < 0 else self.first_bad_row
            self.bad_targets += int(bad.sum())

    def end_matrix(self) -> None:
        if self.name == "targets" and self.bad_targets:
            ts = self.plan.ts[self.rows[self.first_bad_row]]
            raise ValueError(
                f"{self.split}: {self.bad_targets} rows flagged sample_ok have non-finite targets "
                f"(first at timestamp {_iso(ts)})"
            )
        self.buffer = np.empty((0, 0))

    def finish(self) -> None:
        plan, rows = self.plan, self.rows
        timestamp = plan.ts[rows]
        vectors = {"tb_label": plan.tb_label[rows], "symbol_idx": plan.codes[rows], "timestamp": timestamp,
                   "sample_end_rows": plan.ends[self.split]}
        for name, values in vectors.items():  # the rest of ARRAY_DTYPES, in order
            values = np.ascontiguousarray(values, dtype=ARRAY_DTYPES[name])
            self._header(name, values.shape)
            self.f.create_dataset(name, data=values)
            self.hash.update(values.reshape(-1).view(np.uint8))
        attrs = _file_attrs(
            _split_info(plan, self.split, timestamp),
            split=self.split,
            feature_contract_hash=plan.contract.hash,
            feature_names={g: plan.contract.names(g) for g in FEATURE_GROUPS},
            target_names=list(TARGET_NAMES),
            symbols=list(plan.symbols),
            seq_len=int(plan.contract.seq_len),
            label_params=plan.label_params,
            n_rows=int(rows.size),
            n_samples=int(plan.ends[self.split].size),
            checksum=self.hash.hexdigest(),
        )
        for key, value in attrs.items():
            self.f.attrs[key] = value


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


def map_split(path: str | Path, expected_hash: str | None = None) -> SplitArrays:
    """:func:`read_split` without copying: read-only NumPy views of the file's pages (``mmap``).

    Every dataset this module writes is contiguous and uncompressed, i.e. one extent of the file in
    native byte order, so it can be viewed in place: pages are read lazily and shared with the OS page
    cache (nothing is copied into the process). A file whose datasets are not laid out that way is
    read with :func:`read_split` instead. Same checks (hash, attributes, shapes) as ``read_split``.
    """
    path = Path(path)
    extents: dict[str, tuple[int, tuple[int, ...]]] = {}
    with _open_h5(path) as f:
        attrs = _read_attrs(path, f)
        check_hash(path, attrs["feature_contract_hash"], expected_hash)
        for name, dtype in ARRAY_DTYPES.items():
            ds = f[name]
            offset = ds.id.get_offset()
            if ds.chunks is not None or ds.dtype != np.dtype(dtype) or (offset is None and ds.size):
                return read_split(path, expected_hash)
            extents[name] = (int(offset or 0), tuple(int(d) for d in ds.shape))
    with open(path, "rb") as fh:
        pages = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # the arrays keep it open
    data = {}
    for name, (offset, shape) in extents.items():
        count = int(np.prod(shape))
        data[name] = np.frombuffer(pages, dtype=ARRAY_DTYPES[name], count=count, offset=offset if count else 0).reshape(shape)
    return split_arrays_from_parts(path, attrs, data)


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
