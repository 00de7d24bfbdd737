"""Benchmark: the WindowBatcher against a plain strided gather and a per-sample Dataset + DataLoader.

For each sample order (shuffled, as training; in time order: the chronological end rows, the order of
``shuffle=False``) and each key set (every key of ``BATCH_KEYS``, and the train keys of each window
variant, ``WindowModels.batch_keys``), one run prints:

- ours: ``WindowBatcher(keys=...)`` samples/s;
- strided: the plainest vectorised gather of the same keys, written here in a few lines: a
  ``sliding_window_view`` of ``seq`` indexed by the batch's start rows and ``np.take`` of each per-row
  key (cast where the batch dtype differs), ``torch.from_numpy``; ratio ours / strided (target >= 0.9x);
- per-sample: a map-style ``Dataset`` whose ``__getitem__`` returns one sample's keys and
  ``DataLoader(batch_size=256, num_workers=0)`` collating them; ratio ours / per-sample (target >= 30x);
- the batcher's peak extra memory per batch (tracemalloc) next to the B·L·F window block and the N·L·F
  a pre-windowed array would take;
- a ceiling: one contiguous ``np.copyto`` per batch of as many bytes as the batch holds, read from a
  256 MiB buffer into one reused destination (no gather, no index, no allocation); memcpy/s divided by
  the per-sample rate is the most any one-thread loader could reach against that reference on this core.

All three are given the same end-row order (the batcher's) and the first batches of all three are
asserted identical. Rounds are interleaved (ours, strided, per-sample, rotating who goes first; each
round on fresh batches) and the median of each is reported, so a busy machine slows all three alike;
beside each ratio of medians, the lowest and highest ratio of a single round.
Single-threaded (torch and BLAS at 1 thread), ``num_workers=0``.

    python bench/bench_loader.py            # 1,000,000 rows x 32 seq features float32 (128 MB), L 30, B 256
    python bench/bench_loader.py --quick    # 200,000 rows, fewer rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout: make the repo importable
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from numpy.lib.stride_tricks import sliding_window_view  # noqa: E402

from sentinel_pipeline.data.split_arrays import TARGET_NAMES, SplitArrays  # noqa: E402
from sentinel_pipeline.training.data_loader import BATCH_KEYS, WindowBatcher  # noqa: E402
from sentinel_pipeline.training.families.window_models import FAMILY  # noqa: E402

Batch = dict[str, torch.Tensor]
COPY_SOURCE_BYTES = 256 * 2**20  # the memcpy ceiling reads from a buffer this size: larger than the caches


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


# -- the two references (their own code, not the project's) -------------------------------------------


def strided_gather(split: SplitArrays, seq_len: int, keys: tuple[str, ...]) -> Callable[[np.ndarray], Batch]:
    """Reference 1: a sliding_window_view gather of ``seq`` plus ``np.take`` of the per-row keys."""
    s = split
    windows = sliding_window_view(s.seq, (seq_len, s.seq.shape[1]))[:, 0]
    make = {
        "seq": lambda e: windows[e - seq_len + 1],
        "snap": lambda e: np.take(s.snap, e, axis=0),
        "ctx_cat": lambda e: np.take(s.ctx_cat, e, axis=0).astype(np.int64),
        "ctx_cont": lambda e: np.take(s.ctx_cont, e, axis=0),
        "targets": lambda e: np.take(s.targets, e, axis=0),
        "tb_class": lambda e: np.take(s.tb_label, e).astype(np.int64) + 1,
        "end_rows": lambda e: e.copy(),
        "timestamp": lambda e: np.take(s.timestamp, e),
        "symbol_idx": lambda e: np.take(s.symbol_idx, e).astype(np.int64),
    }
    return lambda e: {k: torch.from_numpy(make[k](e)) for k in keys}


class PerSampleDataset(torch.utils.data.Dataset):
    """Reference 2: one sample per ``__getitem__`` (item ``i`` = the sample ending at ``ends[i]``),
    collated by the default ``DataLoader``."""

    def __init__(self, split: SplitArrays, seq_len: int, ends: np.ndarray, keys: tuple[str, ...]) -> None:
        self.s, self.seq_len, self.ends, self.keys = split, seq_len, ends, keys

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, end = self.s, int(self.ends[i])
        item = {
            "seq": lambda: torch.from_numpy(s.seq[end - self.seq_len + 1 : end + 1]),
            "snap": lambda: torch.from_numpy(s.snap[end]),
            "ctx_cat": lambda: torch.from_numpy(s.ctx_cat[end].astype(np.int64)),
            "ctx_cont": lambda: torch.from_numpy(s.ctx_cont[end]),
            "targets": lambda: torch.from_numpy(s.targets[end]),
            "tb_class": lambda: torch.tensor(int(s.tb_label[end]) + 1),
            "end_rows": lambda: torch.tensor(end),
            "timestamp": lambda: torch.tensor(int(s.timestamp[end])),
            "symbol_idx": lambda: torch.tensor(int(s.symbol_idx[end])),
        }
        return {k: item[k]() for k in self.keys}


# -- timing -----------------------------------------------------------------------------------------------


def _timed(run: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    n = run()
    return n / (time.perf_counter() - t0)


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


def bench_case(split: SplitArrays, L: int, B: int, keys: tuple[str, ...], shuffle: bool, rounds: int,
               round_s: float, ref_batches: int) -> dict[str, float]:
    batcher = WindowBatcher(split, seq_len=L, batch_size=B, shuffle=shuffle, seed=1, keys=keys)
    n_batches = len(batcher) - 1  # full batches only
    order = np.concatenate([batcher.batch_end_rows(i) for i in range(len(batcher))])  # the batcher's order
    ref = strided_gather(split, L, keys)
    dataset = PerSampleDataset(split, L, order, keys)

    def per_sample_loader(first: int) -> torch.utils.data.DataLoader:
        """The reference loader over batches first, first + 1, ... (the same order as the batcher's)."""
        first %= n_batches - ref_batches
        return torch.utils.data.DataLoader(dataset, batch_size=B, sampler=range(first * B, len(order)),
                                           num_workers=0)

    # sanity: the three give identical batches (the first two and one from the middle)
    it = iter(per_sample_loader(0))
    per_sample = [next(it), next(it)]
    for i in (0, 1, n_batches // 2):
        ours, theirs = batcher.batch(i), ref(order[i * B : (i + 1) * B])
        assert list(ours) == list(keys) and list(theirs) == list(keys)
        assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in keys), (keys, i)
        if i < 2:
            assert all(torch.equal(ours[k], per_sample[i][k]) for k in keys), (keys, i)

    def run_ours(first: int, count: int) -> Callable[[], int]:
        def go() -> int:
            for i in range(first, first + count):
                batcher.batch(i % n_batches)
            return count * B
        return go

    def run_ref(first: int, count: int) -> Callable[[], int]:
        def go() -> int:
            for i in range(first, first + count):
                j = i % n_batches
                ref(order[j * B : (j + 1) * B])
            return count * B
        return go

    def run_per_sample(first: int) -> Callable[[], int]:
        def go() -> int:
            n = 0
            for n, _ in enumerate(per_sample_loader(first), start=1):  # noqa: B007
                if n == ref_batches:
                    break
            return n * B
        return go

    # ceiling: one contiguous memcpy per batch of as many bytes as the batch holds (no gather at all),
    # read from a source larger than the caches, into one reused destination
    batch_bytes = sum(t.numel() * t.element_size() for t in batcher.batch(0).values())
    source = np.ones(max(COPY_SOURCE_BYTES, 4 * batch_bytes), dtype=np.uint8)
    dest = np.empty(batch_bytes, dtype=np.uint8)
    per_source = source.nbytes // batch_bytes

    def run_copy(first: int, count: int) -> Callable[[], int]:
        def go() -> int:
            for i in range(first, first + count):
                at = (i % per_source) * batch_bytes
                np.copyto(dest, source[at : at + batch_bytes])
            return count * B
        return go

    # batches per round: about round_s seconds of ours (wrapping round the epoch for the cheap key sets)
    run_ref(0, 20)()  # warm-up
    count = max(20, int(round_s * _timed(run_ours(0, 20)) / B))
    rates: dict[str, list[float]] = {"ours": [], "strided": [], "per_sample": [], "copy": []}
    for r in range(rounds):
        first = 20 + r * count  # each round on batches not read before in this case (until the epoch wraps)
        jobs = [("ours", run_ours(first, count)), ("strided", run_ref(first, count)),
                ("per_sample", run_per_sample(first)), ("copy", run_copy(first, count))]
        for name, job in jobs[r % 4:] + jobs[: r % 4]:
            rates[name].append(_timed(job))
    out = {k: statistics.median(v) for k, v in rates.items()}
    # the ratios round by round (the three ran back to back in each round): their spread says how far
    # the machine moved the medians' ratio
    for ref_name in ("strided", "per_sample"):
        per_round = [o / r for o, r in zip(rates["ours"], rates[ref_name], strict=True)]
        out[f"{ref_name}_ratio_lo"], out[f"{ref_name}_ratio_hi"] = min(per_round), max(per_round)
    out["peak"] = peak_batch_bytes(batcher)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200k rows and 3 rounds instead of 1M and 7")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--seq-features", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    n_rows = args.rows or (200_000 if args.quick else 1_000_000)
    rounds = args.rounds or (3 if args.quick else 7)
    round_s, ref_batches = (0.1, 8) if args.quick else (0.25, 16)
    torch.set_num_threads(1)
    L, B, F = args.seq_len, args.batch_size, args.seq_features

    split = synthetic_split(n_rows, F, L)
    key_sets = [("all keys", BATCH_KEYS)] + [(spec.name, FAMILY.batch_keys(spec)) for spec in FAMILY.variants]
    print(
        f"rows={n_rows:,} (seq {n_rows * F * 4 / 2**20:,.0f} MiB float32) samples={split.n_samples:,} seq_len={L} "
        f"seq_features={F} batch={B} threads=1 workers=0 rounds={rounds} (median) "
        f"loadavg={'/'.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    for name, keys in key_sets:
        print(f"  {name:16s}: {', '.join(keys)}")
    print(f"{'order':9s} {'keys':16s} {'ours/s':>11s} {'strided/s':>11s} {'ratio':>6s} {'rounds':>11s} "
          f"{'per-sample/s':>12s} {'ratio':>6s} {'rounds':>9s} {'MiB/batch':>9s} {'memcpy/s':>11s} {'ceiling':>7s}")
    for shuffle in (True, False):
        for name, keys in key_sets:
            r = bench_case(split, L, B, keys, shuffle, rounds, round_s, ref_batches)
            print(
                f"{'shuffled' if shuffle else 'time':9s} {name:16s} {r['ours']:11,.0f} {r['strided']:11,.0f} "
                f"{r['ours'] / r['strided']:5.2f}x {r['strided_ratio_lo']:5.2f}-{r['strided_ratio_hi']:4.2f}x "
                f"{r['per_sample']:12,.0f} {r['ours'] / r['per_sample']:5.0f}x "
                f"{r['per_sample_ratio_lo']:4.0f}-{r['per_sample_ratio_hi']:3.0f}x "
                f"{r['peak'] / 2**20:9.2f} {r['copy']:11,.0f} {r['copy'] / r['per_sample']:6.0f}x",
                flush=True,
            )
    print(f"targets: ratio to strided >= 0.9x, to per-sample >= 30x. B*L*F window block {B * L * F * 4 / 2**20:.2f} "
          f"MiB; a pre-windowed N*L*F array would take {split.n_samples * L * F * 4 / 2**20:,.0f} MiB")
    print("ratio: of the medians; rounds: the lowest and highest ratio of a single round (ours and the reference "
          "timed back to back)")
    print("memcpy/s: one contiguous copy per batch of the batch's bytes (no gather) on this core; ceiling: "
          "memcpy/s / per-sample/s, the ratio a one-thread loader could reach if gathering cost nothing")


if __name__ == "__main__":
    main()
