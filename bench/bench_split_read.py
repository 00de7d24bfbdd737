"""Benchmark: read a whole split into NumPy from HDF5, the Arrow cache and parquet (reference).

Builds one synthetic split of ``--rows`` rows (default 2,000,000; ``--quick``: 200,000) with 24 seq,
12 snap, 2 ctx_cat and 2 ctx_cont features plus the 9 targets, writes it

- as HDF5 with ``hdf5_splits.write_split_file`` (contiguous, uncompressed: the project's layout),
- as HDF5 with 1 MiB row chunks (the alternative layout, to justify the choice),
- as the Arrow IPC cache with ``arrow_cache.build_cache``,
- as parquet, one column per feature, pyarrow defaults (snappy) - the reference,

then times reading the whole split into NumPy arrays (best of ``--repeat``):

- ``hdf5``: ``read_split`` (full read into fresh arrays),
- ``arrow open``: ``open_split`` (zero-copy memory map: only metadata is read),
- ``arrow copy``: ``open_split`` + ``np.array(copy=True)`` of every array (touches every page:
  the honest comparison with the readers that materialise the data),
- ``parquet``: ``pq.read_table`` + stacking the feature columns into (N, F) matrices.

GB/s = bytes of the split's arrays / seconds. The files were just written, so every read is served
from the OS page cache: this measures decoding/copy cost, not the disk. Run:
``python bench/bench_split_read.py [--quick] [--rows N] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout: make the repo importable
    sys.path.insert(0, str(REPO_ROOT))

from sentinel_pipeline.atomic_io import atomic_path  # noqa: E402
from sentinel_pipeline.data.arrow_cache import build_cache, cache_matches_source, open_split  # noqa: E402
from sentinel_pipeline.data.hdf5_splits import read_split, split_attrs, write_split_file  # noqa: E402
from sentinel_pipeline.data.split_arrays import ARRAY_DTYPES, TARGET_NAMES, SplitArrays  # noqa: E402

DIMS = {"seq": 24, "snap": 12, "ctx_cat": 2, "ctx_cont": 2}


def make_split(n_rows: int, seed: int = 0) -> SplitArrays:
    rng = np.random.default_rng(seed)
    n_symbols = 50
    per = n_rows // n_symbols
    symbol_idx = np.minimum(np.arange(n_rows) // max(per, 1), n_symbols - 1).astype(np.int32)
    seq_len = 30
    ends = np.flatnonzero(np.r_[np.zeros(seq_len - 1, bool), symbol_idx[seq_len - 1 :] == symbol_idx[: n_rows - seq_len + 1]])
    return SplitArrays(
        split="train",
        seq=rng.standard_normal((n_rows, DIMS["seq"]), dtype=np.float32),
        snap=rng.standard_normal((n_rows, DIMS["snap"]), dtype=np.float32),
        ctx_cat=rng.integers(0, 5, size=(n_rows, DIMS["ctx_cat"]), dtype=np.int32),
        ctx_cont=rng.standard_normal((n_rows, DIMS["ctx_cont"]), dtype=np.float32),
        targets=rng.standard_normal((n_rows, len(TARGET_NAMES)), dtype=np.float32),
        tb_label=rng.integers(-1, 2, size=n_rows, dtype=np.int8),
        symbol_idx=symbol_idx,
        timestamp=(np.arange(n_rows, dtype=np.int64) * 300_000_000_000),
        sample_end_rows=ends.astype(np.int64),
        feature_contract_hash="bench0000000000",
        feature_names={g: [f"{g}_{i}" for i in range(d)] for g, d in DIMS.items()},
        symbols=[f"S{i:03d}" for i in range(n_symbols)],
        seq_len=seq_len,
        attrs={"time_min": "", "time_max": "", "n_warmup_rows": 0},
    )


def write_chunked_h5(path: Path, arrays: SplitArrays, chunk_bytes: int = 1 << 20) -> None:
    attrs = split_attrs(arrays)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, dtype in ARRAY_DTYPES.items():
            a = getattr(arrays, name)
            row_bytes = max(a[:1].nbytes, 1)
            chunk_rows = max(1, min(len(a), chunk_bytes // row_bytes))
            f.create_dataset(name, data=a.astype(dtype, copy=False), chunks=(chunk_rows, *a.shape[1:]))
        for key, value in attrs.items():
            f.attrs[key] = value


def write_parquet(path: Path, arrays: SplitArrays) -> None:
    cols: dict[str, np.ndarray] = {}
    for group in (*DIMS, "targets"):
        matrix = getattr(arrays, group)
        for j in range(matrix.shape[1]):
            cols[f"{group}__{j}"] = matrix[:, j]
    for name in ("tb_label", "symbol_idx", "timestamp"):
        cols[name] = getattr(arrays, name)
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(cols), tmp)


def read_parquet(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    out = {}
    for group in (*DIMS, "targets"):
        names = [n for n in table.column_names if n.startswith(f"{group}__")]
        out[group] = np.column_stack([table.column(n).to_numpy() for n in names])
    for name in ("tb_label", "symbol_idx", "timestamp"):
        out[name] = table.column(name).to_numpy()
    return out


def best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        del result
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200k rows instead of 2M")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    args = parser.parse_args()
    n_rows = args.rows or (200_000 if args.quick else 2_000_000)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        arrays = make_split(n_rows)
        nbytes = sum(a.nbytes for a in arrays.arrays().values())
        h5_path = root / "hdf5" / "train.h5"
        t0 = time.perf_counter()
        write_split_file(h5_path, arrays)
        t_write_h5 = time.perf_counter() - t0
        chunked_path = root / "chunked" / "train.h5"
        write_chunked_h5(chunked_path, arrays)
        t0 = time.perf_counter()
        arrow_path = build_cache(h5_path)
        t_build = time.perf_counter() - t0
        parquet_path = root / "train.parquet"
        write_parquet(parquet_path, arrays)
        del arrays

        def arrow_copy() -> dict[str, np.ndarray]:
            split = open_split(arrow_path)
            return {k: np.array(v, copy=True) for k, v in split.arrays().items()}

        cases: list[tuple[str, Path, Callable[[], object]]] = [
            ("hdf5 contiguous (read_split)", h5_path, lambda: read_split(h5_path)),
            ("hdf5 1MiB chunks (read_split)", chunked_path, lambda: read_split(chunked_path)),
            ("arrow open_split (zero-copy)", arrow_path, lambda: open_split(arrow_path)),
            ("arrow open_split + copy", arrow_path, arrow_copy),
            ("parquet snappy (reference)", parquet_path, lambda: read_parquet(parquet_path)),
        ]
        print(f"split: {n_rows:,} rows, {sum(DIMS.values())} features + {len(TARGET_NAMES)} targets, "
              f"{nbytes / 1e9:.3f} GB of arrays; warm page cache; best of {args.repeat}")
        print(f"write hdf5 {t_write_h5:.2f}s, build arrow cache (incl. verified hdf5 read) {t_build:.2f}s")
        print(f"{'reader':34s} {'file MB':>9s} {'seconds':>9s} {'GB/s':>8s}")
        for label, path, fn in cases:
            seconds = best_of(fn, args.repeat)
            size = path.stat().st_size / 1e6
            print(f"{label:34s} {size:9.1f} {seconds:9.4f} {nbytes / 1e9 / seconds:8.2f}")
        t_match = best_of(lambda: cache_matches_source(h5_path, arrow_path), 1)
        t_cheap = best_of(lambda: cache_matches_source(h5_path, arrow_path, recompute=False), 1)
        print(f"cache_matches_source: {t_match:.3f}s with checksum recompute, {t_cheap:.3f}s without")


if __name__ == "__main__":
    main()
