"""The bar-ordered intermediate tables of the data half as Arrow IPC files (Feather v2, uncompressed).

Bars, bar flags, features, labels and the split assignment are written once by their stage and read
back by the stages after it, never edited. Measured on 2M rows of the 43-column features table (2 cores,
noisy): parquet (snappy, no dictionary for floats) wrote in 0.59 s and was read back to pandas in 1.0-2.0
s; uncompressed IPC wrote in 0.27 s (1.3x the bytes), and a stage reads its columns from the
memory-mapped file without decoding or copying (lz4 IPC: 1.56 s to write; zstd 1.03 s). So the tables are
uncompressed IPC: a write is a copy into the page cache, a read maps the pages.

:func:`write_table` writes atomically (``atomic_io.atomic_path``: temporary file, fsync, rename) and
hashes the bytes as it writes them, so the stage commit (``stage_cache.build_stage``) and the
fingerprints of later stages find the file's sha256 without reading it again
(``stage_cache.remember_digest``). :func:`read_frame` gives the frame ``pd.read_parquet`` gave for the
same table (the pandas metadata travels with the schema); :func:`open_table` maps a file and
:func:`column` hands out a column as a NumPy array (a read-only view of the mapped pages where the type
allows). A file that is not a readable IPC file raises ``ValueError`` naming it.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc

from sentinel_pipeline.atomic_io import atomic_path
from sentinel_pipeline.stage_cache import remember_digest

SUFFIX = ".arrow"
_ATTRS_KEY = b"PANDAS_ATTRS"  # where pandas' to_parquet keeps DataFrame.attrs; kept the same here


class _HashingSink:
    """A binary file that hashes every byte written to it (for ``pa.PythonFile``), in a second thread:
    sha256 (user time) runs beside the copy into the page cache (kernel time), both without the GIL.
    Every chunk stays referenced until it is hashed (large ones arrive as Arrow buffers, not copies), and
    one worker hashes them in the order they were written."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.hash = hashlib.sha256()
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: list[Future[None]] = []
        self.position = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.pending.append(self.pool.submit(self.hash.update, view))
        self.fh.write(view)
        self.position += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.fh.close()
            finally:
                self.pool.shutdown(wait=True)

    def hexdigest(self) -> str:
        """The sha256 of everything written (after :meth:`close`)."""
        for done in self.pending:
            done.result()
        return self.hash.hexdigest()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


def write_ipc(table: pa.Table, path: str | Path) -> str:
    """Write ``table`` to ``path`` as one uncompressed IPC file with one record batch (no atomicity: the
    caller's temporary path); returns the sha256 of the file's bytes, computed as they were written."""
    sink = _HashingSink(Path(path))
    try:
        with pa.PythonFile(sink, mode="w") as out, ipc.new_file(out, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(table.num_rows, 1))
    finally:
        sink.close()
    return sink.hexdigest()


def _float_array(values: np.ndarray) -> pa.Array | None:
    """A float column as ``pa.Table.from_pandas`` converts it (NaN marked null, the NaN kept in the data
    buffer), without copying the values: the array's data buffer is ``values`` itself and only the
    validity bitmap is new (1 bit per row). None when ``values`` is not a contiguous float array."""
    if values.dtype.kind != "f" or values.ndim != 1 or not values.flags.c_contiguous:
        return None
    nan = np.isnan(values)
    n_null = int(np.count_nonzero(nan))
    if n_null == 0:
        return pa.array(values)  # zero-copy: a primitive NumPy array without nulls
    validity = pa.py_buffer(np.packbits(~nan, bitorder="little"))
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [validity, pa.py_buffer(values)],
                                 null_count=n_null)


def to_arrow(data: pd.DataFrame | pa.Table) -> pa.Table:
    """The Arrow table of a frame, as ``DataFrame.to_parquet`` converts it (no index, ``attrs`` kept).

    The float columns (most of the features and labels tables) are handed to Arrow without a copy
    (:func:`_float_array`), which writes the same bytes as ``pa.Table.from_pandas`` (tested) without
    allocating and filling a second copy of each column: at 10M bars that copy was 1.6 GB of fresh
    memory in the features stage alone. The other columns go through ``pa.array(from_pandas=True)``
    with the type ``pa.Schema.from_pandas`` gives, as ``from_pandas`` converts them."""
    if isinstance(data, pa.Table):
        return data
    if data.columns.is_unique and all(isinstance(c, str) for c in data.columns):
        schema = pa.Schema.from_pandas(data, preserve_index=False)
        arrays = []
        for name, field in zip(data.columns, schema, strict=True):
            col = data[name]
            values = col.to_numpy(copy=False) if isinstance(col.dtype, np.dtype) and col.dtype.kind == "f" else None
            array = _float_array(values) if values is not None else None
            arrays.append(array if array is not None else pa.array(col, type=field.type, from_pandas=True))
        table = pa.Table.from_arrays(arrays, schema=schema)
    else:
        table = pa.Table.from_pandas(data, preserve_index=False)
    if data.attrs:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), _ATTRS_KEY: json.dumps(data.attrs)})
    return table


def write_table(data: pd.DataFrame | pa.Table, path: str | Path) -> Path:
    """Write a frame (without its index) or an Arrow table as one uncompressed IPC file, atomically,
    hashing it as it is written; returns ``path``."""
    path = Path(path)
    table = to_arrow(data)
    with atomic_path(path) as tmp:
        digest = write_ipc(table, tmp)
    remember_digest(path, digest)
    return path


def schema_of(path: str | Path) -> pa.Schema:
    """The schema of an IPC file (reads its footer only); ``ValueError`` naming the file when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: table file does not exist")
    try:
        return ipc.open_file(pa.memory_map(str(path), "r")).schema
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Arrow IPC file: {exc}") from exc


def open_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The table of an IPC file, memory-mapped (``columns`` only); ``ValueError`` naming the file when it
    is missing columns or is not a readable IPC file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: table file does not exist")
    try:
        reader = ipc.open_file(pa.memory_map(str(path), "r"))
        if columns is None:
            return reader.read_all()
        missing = [c for c in columns if c not in reader.schema.names]
        if missing:
            raise ValueError(f"{path}: table lacks columns {missing}")
        return reader.read_all().select(columns)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Arrow IPC file: {exc}") from exc


def frame_of(table: pa.Table) -> pd.DataFrame:
    """The pandas frame of an Arrow table as ``pd.read_parquet`` builds it (pandas metadata, ``attrs``)."""
    frame = table.to_pandas()
    raw = (table.schema.metadata or {}).get(_ATTRS_KEY)
    if raw:
        frame.attrs = json.loads(raw)
    return frame


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The table of an IPC file read into memory through a file handle (``columns`` only, in that order);
    nothing points into the file afterwards."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: table file does not exist")
    try:
        with pa.OSFile(str(path), "r") as source:
            names = ipc.open_file(source).schema.names
            missing = [c for c in columns or () if c not in names]
            if missing:
                raise ValueError(f"{path}: table lacks columns {missing}")
            wanted = None if columns is None else [names.index(c) for c in columns]
            table = ipc.open_file(source, options=ipc.IpcReadOptions(included_fields=wanted)).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Arrow IPC file: {exc}") from exc
    return table if columns is None else table.select(columns)


def read_frame(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The frame of an IPC table file (``columns`` only, in that order): what ``pd.read_parquet`` gave
    for the same table in parquet (same dtypes and values). Read into memory through a file handle
    (:func:`read_table`), not mapped: the frame's string columns would otherwise keep pointing into the
    file, and copying columns out of a mapping (page faults) measured slower here (10M bars: 1.1-2.9 s
    against 0.14-1.7 s for the 7 columns of the bars; 0.38-0.49 s against 0.20-0.49 s for 6 of the 43
    feature columns)."""
    table = read_table(path, columns)
    try:
        return frame_of(table)
    finally:
        del table
        pa.default_memory_pool().release_unused()


def column(table: pa.Table, name: str) -> np.ndarray:
    """Column ``name`` as a NumPy array, equal to ``table.column(name).to_numpy()`` (nulls -> NaN for
    floats, as pandas reads them): a read-only view of the mapped file for a numeric column in one chunk
    whose null slots (if any) already hold NaN in the data buffer, which is how a frame's NaN arrive
    (``pa.Table.from_pandas`` marks them null and keeps the values), else a converted copy."""
    col = table.column(name)
    if col.num_chunks == 1:
        chunk = col.chunk(0)
        numeric = pa.types.is_floating(chunk.type) or pa.types.is_integer(chunk.type)
        if numeric and chunk.null_count == 0:
            return chunk.to_numpy(zero_copy_only=True)
        if pa.types.is_floating(chunk.type) and chunk.offset == 0:
            values = np.frombuffer(chunk.buffers()[1], dtype=chunk.type.to_pandas_dtype(), count=len(chunk))
            null_rows = np.flatnonzero(~chunk.is_valid().to_numpy(zero_copy_only=False))
            if np.isnan(values[null_rows]).all():
                return values
    return col.to_numpy()
