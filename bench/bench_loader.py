"""Benchmark: the vectorised WindowBatcher vs a per-sample Dataset + default DataLoader.

Both produce the same batches (``seq`` windows, ``snap``, ``ctx_*``, targets, labels, ids) from the
same synthetic split; the reference is the textbook approach: a map-style ``Dataset`` whose
``__getitem__`` slices one window and ``DataLoader(batch_size=256)`` collating sample dicts.
Prints samples/s of both (shuffled order, like training), their ratio, and the batcher's peak extra
memory per batch (tracemalloc) next to the B·L·F window size and the N·L·F a pre-windowed array
would need. Single-threaded, ``num_workers=0`` for both.

    python bench/bench_loader.py            # 200k rows, 32 seq features, seq_len 30, batch 256
    python bench/bench_loader.py --quick    # 50k rows
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout: make the repo importable
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sentinel_pipeline.data.split_arrays import TARGET_NAMES, SplitArrays  # noqa: E402
from sentinel_pipeline.training.data_loader import BATCH_KEYS, WindowBatcher  # noqa: E402


def synthetic_split(n_rows: int, n_seq: int, seq_len: int, n_symbols: int = 50, seed: int = 0) -> SplitArrays:
    rng = np.random.default_rng(seed)
    symbol_idx = np.sort(rng.integers(0, n_symbols, size=n_rows)).astype(np.int32)
    pos = np.arange(n_rows) - np.searchsorted(symbol_idx, symbol_idx)
    return SplitArrays(
        split="bench",
        seq=rng.normal(size=(n_rows, n_seq)).astype(np.float32),
        snap=rng.normal(size=(n_rows, 10)).astype(np.float32),
        ctx_cat=rng.integers(0, 5, size=(n_rows, 5)).astype(np.int32),
        ctx_cont=rng.normal(size=(n_rows, 2)).astype(np.float32),
        targets=rng.normal(size=(n_rows, len(TARGET_NAMES))).astype(np.float32),
        tb_label=rng.integers(-1, 2, size=n_rows).astype(np.int8),
        symbol_idx=symbol_idx,
        timestamp=(pos * 300_000_000_000).astype(np.int64),
        sample_end_rows=np.flatnonzero(pos >= seq_len - 1).astype(np.int64),
        feature_contract_hash="0" * 16,
        feature_names={},
        symbols=[f"S{i}" for i in range(n_symbols)],
        seq_len=seq_len,
    )


class PerSampleDataset(torch.utils.data.Dataset):
    """The reference: one window per ``__getitem__``, collated by the default DataLoader."""

    def __init__(self, split: SplitArrays, seq_len: int) -> None:
        self.s, self.seq_len = split, seq_len

    def __len__(self) -> int:
        return self.s.n_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, end = self.s, int(self.s.sample_end_rows[i])
        return {
            "seq": torch.from_numpy(s.seq[end - self.seq_len + 1 : end + 1]),
            "snap": torch.from_numpy(s.snap[end]),
            "ctx_cat": torch.from_numpy(s.ctx_cat[end].astype(np.int64)),
            "ctx_cont": torch.from_numpy(s.ctx_cont[end]),
            "targets": torch.from_numpy(s.targets[end]),
            "tb_class": torch.tensor(int(s.tb_label[end]) + 1),
            "end_rows": torch.tensor(end),
            "timestamp": torch.tensor(int(s.timestamp[end])),
            "symbol_idx": torch.tensor(int(s.symbol_idx[end])),
        }


def rate(batches, max_samples: int) -> tuple[float, int]:
    """samples/s over the iterable, stopping after ``max_samples`` samples."""
    n = 0
    t0 = time.perf_counter()
    for b in batches:
        n += b["seq"].shape[0]
        if n >= max_samples:
            break
    return n / (time.perf_counter() - t0), n


def peak_batch_bytes(batcher: WindowBatcher, n_batches: int = 5) -> int:
    tracemalloc.start()
    try:
        worst = 0
        for i in range(n_batches):
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            batch = batcher.batch(i)
            _, peak = tracemalloc.get_traced_memory()
            worst = max(worst, peak - base)
            del batch
    finally:
        tracemalloc.stop()
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50k rows instead of 200k")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--seq-features", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument(
        "--reference-samples", type=int, default=None, help="cap on samples timed for the reference"
    )
    args = ap.parse_args()
    n_rows = args.rows or (50_000 if args.quick else 200_000)
    ref_cap = args.reference_samples or (10_000 if args.quick else 25_000)
    torch.set_num_threads(1)
    L, B, F = args.seq_len, args.batch_size, args.seq_features

    split = synthetic_split(n_rows, F, L)
    batcher = WindowBatcher(split, seq_len=L, batch_size=B, shuffle=True, seed=1)
    reference = torch.utils.data.DataLoader(
        PerSampleDataset(split, L), batch_size=B, shuffle=True, generator=torch.Generator().manual_seed(1)
    )

    # sanity: both give the same content for the same samples (the batcher's first batch, which
    # without shuffling is in global time order, against the reference's items for those samples)
    ordered = WindowBatcher(split, seq_len=L, batch_size=B)
    ours_first = ordered.batch(0)
    indices = np.searchsorted(split.sample_end_rows, ordered.batch_end_rows(0))
    dataset = PerSampleDataset(split, L)
    ref_first = torch.utils.data.default_collate([dataset[int(i)] for i in indices])
    assert all(torch.equal(ref_first[k], ours_first[k]) for k in BATCH_KEYS), "batches differ"

    rate(batcher, B * 4)  # warm-up
    ours, n_ours = rate(batcher, split.n_samples)
    theirs, n_theirs = rate(reference, ref_cap)
    peak = peak_batch_bytes(batcher)
    window = B * L * F * 4
    full = split.n_samples * L * F * 4

    print(
        f"rows={n_rows:,} samples={split.n_samples:,} seq_len={L} seq_features={F} batch={B} threads=1 workers=0"
    )
    print(f"  WindowBatcher (vectorised)      : {ours:12,.0f} samples/s  ({n_ours:,} samples, shuffled)")
    print(f"  per-sample Dataset + DataLoader : {theirs:12,.0f} samples/s  ({n_theirs:,} samples, shuffled)")
    print(f"  speed-up                        : {ours / theirs:8.1f}x   (target >= 30x)")
    print(
        f"  batcher peak extra memory/batch : {peak / 2**20:8.2f} MiB   "
        f"(B*L*F window {window / 2**20:.2f} MiB; pre-windowed N*L*F would be {full / 2**20:,.0f} MiB)"
    )


if __name__ == "__main__":
    main()
