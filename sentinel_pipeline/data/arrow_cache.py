"""Stage 7: an uncompressed Arrow IPC copy of each HDF5 split, memory-mapped and read zero-copy.

For ``<artifacts>/hdf5/<split>.h5`` the cache is ``<artifacts>/arrow_cache/<split>.arrow``
(``paths.arrow_cache_for``) plus the sidecar ``<split>.samples.arrow``:

- ``<split>.arrow``: Arrow IPC **file** format, no compression, exactly one record batch with one row
  per split row. ``seq``, ``snap``, ``ctx_cat``, ``ctx_cont`` and ``targets`` are
  ``FixedSizeList<float32|int32>[F]`` columns, so the child values buffer is the row-major ``(N, F)``
  matrix; ``tb_label`` (int8), ``symbol_idx`` (int32) and ``timestamp`` (int64 ns) are plain columns.
  A matrix with zero columns (e.g. context switched off) has no column at all: Arrow has no
  zero-width FixedSizeList, and the ``shapes`` metadata entry records ``(N, 0)``.
- ``<split>.samples.arrow``: one int64 column ``sample_end_rows``.

Schema metadata (every value JSON-encoded): the HDF5 file attributes (hash, feature/target names,
symbols, seq_len, label params, split, checksum, time range, counts), ``shapes`` ({array: shape}),
``source_content_checksum`` (the ``content_checksum`` of the HDF5 source) and ``source_path``.

``open_split`` memory-maps both files (``pa.memory_map`` + ``pa.ipc.open_file``) and hands out NumPy
views of the mapped buffers: nothing is copied, pages are read lazily by the OS and shared between
processes, and the arrays are **read-only**. Because files are replaced atomically (new inode), a
rebuild never changes the bytes under a process that still has the old cache mapped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sentinel_pipeline.atomic_io import atomic_path
from sentinel_pipeline.data.hdf5_splits import (
    FORMAT,
    JSON_ATTRS,
    READER_ATTRS,
    SplitFileError,
    check_hash,
    map_split,
    read_split,
    read_split_attrs,
    split_arrays_from_parts,
    split_attrs,
)
from sentinel_pipeline.data.split_arrays import ARRAY_DTYPES, SplitArrays, content_checksum
from sentinel_pipeline.data.tables import write_ipc
from sentinel_pipeline.paths import arrow_cache_for
from sentinel_pipeline.stage_cache import remember_digest

MATRICES: tuple[str, ...] = ("seq", "snap", "ctx_cat", "ctx_cont", "targets")
VECTORS: tuple[str, ...] = ("tb_label", "symbol_idx", "timestamp")
SAMPLES_COLUMN = "sample_end_rows"
_REQUIRED_META = ("format", "feature_contract_hash", "split", "shapes", "source_content_checksum", "n_samples")


def samples_path_for(arrow_path: str | Path) -> Path:
    """The sidecar holding ``sample_end_rows``: ``<split>.samples.arrow`` next to ``<split>.arrow``."""
    arrow_path = Path(arrow_path)
    return arrow_path.with_name(f"{arrow_path.stem}.samples.arrow")


def _encode_meta(meta: dict[str, Any]) -> dict[bytes, bytes]:
    return {k.encode(): json.dumps(v, sort_keys=True).encode() for k, v in meta.items()}


def _decode_meta(path: Path, raw: dict[bytes, bytes] | None) -> dict[str, Any]:
    try:
        meta = {k.decode(): json.loads(v) for k, v in (raw or {}).items()}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SplitFileError(f"{path}: schema metadata is not JSON: {exc}") from exc
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing or meta.get("format") != FORMAT:
        raise SplitFileError(
            f"{path}: not a split cache written by sentinel_pipeline "
            f"(missing metadata {missing}, format {meta.get('format')!r})"
        )
    return meta


def _write_ipc(tmp: Path, table: pa.Table) -> str:
    """Write one record batch, uncompressed; returns the file's sha256 (hashed while written, so the stage
    commit does not read the file again: ``stage_cache.remember_digest``)."""
    return write_ipc(table, tmp)


def _build(h5_path: Path, arrow_path: Path) -> tuple[SplitArrays, str]:
    """Write the cache of ``h5_path``; returns the split read from it and its recomputed checksum.

    The HDF5 data is memory-mapped (``hdf5_splits.map_split``), its checksum computed in a second thread
    while the cache is written (both release the GIL); the files are only renamed into place once it
    matches the stored one.
    """
    split = map_split(h5_path)  # views of the file's pages: nothing is copied into this process
    with ThreadPoolExecutor(max_workers=1) as pool:
        checksum = pool.submit(content_checksum, split.arrays())
        source_checksum = split.attrs["content_checksum"]
        attrs = split_attrs(split, checksum=source_checksum)  # the HDF5 attrs (JSON ones as strings)
        meta: dict[str, Any] = {k: (json.loads(v) if k in JSON_ATTRS else v) for k, v in attrs.items()}
        meta.update(
            {
                "shapes": {name: list(getattr(split, name).shape) for name in ARRAY_DTYPES},
                "source_content_checksum": source_checksum,
                "source_path": str(h5_path),
            }
        )
        columns: dict[str, pa.Array] = {}
        for name in MATRICES:
            a = getattr(split, name)
            if a.shape[1] > 0:
                columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
        for name in VECTORS:
            columns[name] = pa.array(getattr(split, name))
        main = pa.table(columns).replace_schema_metadata(_encode_meta(meta))
        side_meta = {k: meta[k] for k in ("format", "feature_contract_hash", "split", "source_content_checksum", "n_samples")}
        side_meta["shapes"] = {SAMPLES_COLUMN: meta["shapes"][SAMPLES_COLUMN]}
        samples = pa.table({SAMPLES_COLUMN: pa.array(split.sample_end_rows)})
        side_path = samples_path_for(arrow_path)
        with atomic_path(arrow_path) as main_tmp, atomic_path(side_path) as side_tmp:
            digests = {arrow_path: _write_ipc(main_tmp, main),
                       side_path: _write_ipc(side_tmp, samples.replace_schema_metadata(_encode_meta(side_meta)))}
            found = checksum.result()
            if found != source_checksum:  # nothing is renamed into place
                raise SplitFileError(f"{h5_path}: content checksum {found} != stored {source_checksum}")
        for path, digest in digests.items():
            remember_digest(path, digest)
    return split, found


def build_cache(h5_path: str | Path, arrow_path: str | Path | None = None) -> Path:
    """Write the Arrow cache of an HDF5 split (verified against its checksum first); returns the path."""
    h5_path = Path(h5_path)
    arrow_path = Path(arrow_path) if arrow_path is not None else arrow_cache_for(h5_path)
    _build(h5_path, arrow_path)
    return arrow_path


def build_and_check_cache(
    h5_path: str | Path, arrow_path: str | Path | None = None
) -> tuple[Path, bool, dict[str, Any]]:
    """:func:`build_cache` followed by :func:`cache_matches_source` (with ``recompute``), as
    ``(path, ok, details)``, reading the HDF5 file and checksumming its data once instead of twice."""
    h5_path = Path(h5_path)
    arrow_path = Path(arrow_path) if arrow_path is not None else arrow_cache_for(h5_path)
    split, h5_checksum = _build(h5_path, arrow_path)
    h5_attrs = {
        "n_rows": split.n_rows,
        "n_samples": split.n_samples,
        "feature_contract_hash": split.feature_contract_hash,
        "content_checksum": split.attrs["content_checksum"],
    }
    del split
    ok, details = _compare_with_cache(h5_path, arrow_path, h5_attrs, lambda: h5_checksum, recompute=True)
    return arrow_path, ok, details


def _map_batch(path: Path) -> tuple[pa.RecordBatch, dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Arrow cache file does not exist")
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    except (pa.ArrowInvalid, OSError) as exc:
        raise SplitFileError(f"{path}: not a readable Arrow IPC file: {exc}") from exc
    meta = _decode_meta(path, reader.schema.metadata)
    if reader.num_record_batches != 1:
        raise SplitFileError(f"{path}: expected exactly one record batch, found {reader.num_record_batches}")
    return reader.get_batch(0), meta


def _column_view(path: Path, batch: pa.RecordBatch, name: str, shape: list[int]) -> np.ndarray:
    dtype = np.dtype(ARRAY_DTYPES[name])
    if len(shape) == 2 and shape[1] == 0:
        return np.empty((shape[0], 0), dtype=dtype)
    if name not in batch.schema.names:
        raise SplitFileError(f"{path}: column {name!r} is missing")
    col = batch.column(name)
    try:
        values = col.values if len(shape) == 2 else col
        out = values.to_numpy(zero_copy_only=True)
    except (pa.ArrowInvalid, AttributeError) as exc:
        raise SplitFileError(f"{path}: column {name!r} cannot be viewed zero-copy: {exc}") from exc
    if out.dtype != dtype or out.size != int(np.prod(shape)):
        raise SplitFileError(f"{path}: column {name!r} is {out.dtype}[{out.size}], expected {dtype}{tuple(shape)}")
    return out.reshape(shape)


def open_split(arrow_path: str | Path, expected_hash: str | None = None) -> SplitArrays:
    """Memory-map a cached split and return zero-copy, read-only NumPy views as ``SplitArrays``.

    Raises ``ContractError`` naming the file and both hashes when ``expected_hash`` differs, and
    ``SplitFileError`` for a file that is not a cache of ours or whose sidecar belongs to another build.
    """
    arrow_path = Path(arrow_path)
    batch, meta = _map_batch(arrow_path)
    check_hash(arrow_path, meta["feature_contract_hash"], expected_hash)
    side_path = samples_path_for(arrow_path)
    side_batch, side_meta = _map_batch(side_path)
    for key in ("feature_contract_hash", "source_content_checksum", "n_samples", "split"):
        if side_meta[key] != meta[key]:
            raise SplitFileError(f"{side_path}: {key} {side_meta[key]!r} does not match {arrow_path} ({meta[key]!r})")
    shapes = meta["shapes"]
    data = {name: _column_view(arrow_path, batch, name, shapes[name]) for name in (*MATRICES, *VECTORS)}
    data[SAMPLES_COLUMN] = _column_view(side_path, side_batch, SAMPLES_COLUMN, side_meta["shapes"][SAMPLES_COLUMN])
    attrs = {k: v for k, v in meta.items() if k not in ("shapes", *READER_ATTRS)}
    return split_arrays_from_parts(arrow_path, attrs, data)


def cache_matches_source(
    h5_path: str | Path, arrow_path: str | Path | None = None, recompute: bool = True
) -> tuple[bool, dict[str, Any]]:
    """Does the Arrow cache hold exactly the HDF5 split? Returns ``(ok, details)`` (JSON-able details).

    Compares row and sample counts, the contract hash, the cache's recorded source checksum with the
    HDF5 ``content_checksum`` and, with ``recompute`` (default), the checksums recomputed from the
    data of both files (reads the whole HDF5 file and every page of the cache). Without
    ``recompute`` only metadata is read (milliseconds), which suffices to detect a stale cache since
    every HDF5 write stores the checksum of what it wrote.
    """
    h5_path = Path(h5_path)
    arrow_path = Path(arrow_path) if arrow_path is not None else arrow_cache_for(h5_path)
    try:
        h5_attrs: dict[str, Any] | str = read_split_attrs(h5_path)
    except (OSError, SplitFileError) as exc:
        h5_attrs = f"HDF5 source unreadable: {exc}"
    return _compare_with_cache(
        h5_path, arrow_path, h5_attrs, lambda: content_checksum(read_split(h5_path).arrays()), recompute
    )


def _compare_with_cache(
    h5_path: Path,
    arrow_path: Path,
    h5_attrs: dict[str, Any] | str,
    h5_checksum: Callable[[], str],
    recompute: bool,
) -> tuple[bool, dict[str, Any]]:
    """The comparison of :func:`cache_matches_source`, given the HDF5 file's attrs (or why they could not
    be read) and a function that returns the checksum recomputed from its data."""
    details: dict[str, Any] = {"h5_path": str(h5_path), "arrow_path": str(arrow_path), "problems": []}
    problems: list[str] = details["problems"]
    cache: SplitArrays | None = None
    if isinstance(h5_attrs, str):
        problems.append(h5_attrs)
    try:
        cache = open_split(arrow_path)
    except (OSError, SplitFileError, pa.ArrowException) as exc:
        problems.append(f"Arrow cache unreadable: {exc}")
    if isinstance(h5_attrs, str) or cache is None:
        return False, details
    details.update(
        {
            "h5_rows": h5_attrs["n_rows"],
            "arrow_rows": cache.n_rows,
            "h5_samples": h5_attrs["n_samples"],
            "arrow_samples": cache.n_samples,
            "h5_hash": h5_attrs["feature_contract_hash"],
            "arrow_hash": cache.feature_contract_hash,
            "h5_checksum": h5_attrs["content_checksum"],
            "arrow_source_checksum": cache.attrs["source_content_checksum"],
        }
    )
    for what in ("rows", "samples", "hash"):
        if details[f"h5_{what}"] != details[f"arrow_{what}"]:
            problems.append(f"{what} differ: HDF5 {details[f'h5_{what}']} vs Arrow {details[f'arrow_{what}']}")
    if details["h5_checksum"] != details["arrow_source_checksum"]:
        problems.append("the cache was built from different HDF5 content (stale cache)")
    if recompute:
        details["h5_checksum_recomputed"] = h5_checksum()
        details["arrow_checksum_recomputed"] = content_checksum(cache.arrays())
        if details["h5_checksum_recomputed"] != details["h5_checksum"]:
            problems.append("HDF5 data does not match its stored content_checksum")
        if details["arrow_checksum_recomputed"] != details["h5_checksum_recomputed"]:
            problems.append("Arrow data differs from the HDF5 data")
    return not problems, details
