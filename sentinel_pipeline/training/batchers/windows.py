"""Lazy window batches over a split's flat rows: the batcher of the ``"windows"`` batch kind.

A split (:class:`~sentinel_pipeline.data.split_arrays.SplitArrays`) holds one row per bar and the
list of rows at which a sample ends; it never holds pre-built windows. The window ending at row
``end`` is the contiguous block of rows ``end - L + 1 .. end`` of the row-major ``(N, F_seq)`` array,
so :class:`WindowBatcher` copies each window as one ``L x F_seq`` block into the ``(B, L, F_seq)``
batch (``window_gather.gather_windows``: a compiled loop of block copies that prefetches the windows
two places ahead, byte for byte what indexing a ``sliding_window_view`` gives; a split whose ``seq``
is not a C-contiguous float32 array goes through that view instead). Memory per batch is O(B·L·F);
the split itself is only read (it may be a read-only memory map of the Arrow cache). Measured on 1M
rows x 32 features, shuffled: the NumPy fancy index of the strided view reached 3.3-3.4M windows/s,
the prefetching kernel 4.6-4.7M; a per-row ``np.take`` with a ``(B, L)`` index matrix (128-byte
copies) was ~15 % slower than the fancy index, numba element-copy loops 20-70 % slower, and two
threads (numba ``prange``, ``torch.index_select``) no faster on 2 shared cores. ``bench/bench_loader.py``
compares the batcher with a plain strided gather and a per-sample ``DataLoader``.

``keys`` selects the batch keys to build (default: all of :data:`BATCH_KEYS`); a batcher built for a
variant gathers only what its model, losses and metrics read (``ModelFamily.batch_keys``). Each key is
bit-identical whatever the selection. Batches are ``dict[str, torch.Tensor]`` (:data:`Batch`) with
the selected keys, in :data:`BATCH_KEYS` order:

=============  ==============  =======  =================================================
key            shape           dtype    meaning
=============  ==============  =======  =================================================
``seq``        (B, L, F_seq)   float32  the window of seq features ending at the sample row
``snap``       (B, F_snap)     float32  snap features of the sample row
``ctx_cat``    (B, C)          int64    context category codes of the sample row
``ctx_cont``   (B, C2)         float32  continuous context of the sample row
``targets``    (B, T)          float32  float targets in ``TARGET_NAMES`` order
``tb_class``   (B,)            int64    ``tb_label + 1``: 0 = down, 1 = neutral, 2 = up
``end_rows``   (B,)            int64    row index of the sample in the split
``timestamp``  (B,)            int64    ns since epoch (UTC) of the sample row
``symbol_idx`` (B,)            int64    index into ``split.symbols``
=============  ==============  =======  =================================================

The sample order is chronological across the whole universe (by timestamp, then symbol), or with
``shuffle=True`` a permutation drawn from ``numpy.random.default_rng([seed, epoch])``: the same (seed,
epoch) always gives the same batches. (The split's rows are stored by (symbol, time); iterating them
in that order would feed a model one symbol after another, and SGD would end each epoch fitted to
the last symbols.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from sentinel_pipeline.data.split_arrays import TARGET_NAMES, SplitArrays
from sentinel_pipeline.training.batchers.window_gather import gather_windows

Batch = dict[str, torch.Tensor]
BATCH_KEYS: tuple[str, ...] = (
    "seq",
    "snap",
    "ctx_cat",
    "ctx_cont",
    "targets",
    "tb_class",
    "end_rows",
    "timestamp",
    "symbol_idx",
)


def chronological_end_rows(split: SplitArrays, limit: int | None = None) -> np.ndarray:
    """The split's sample end rows ordered by (timestamp, symbol); with ``limit`` only the earliest K."""
    ends = np.asarray(split.sample_end_rows, dtype=np.int64)
    order = np.argsort(split.timestamp[ends], kind="stable")  # rows are (symbol, time)-sorted: ties by symbol
    ends = ends[order]
    return ends[:limit] if limit is not None else ends


class WindowBatcher:
    """Batches of ``seq_len``-bar windows over the sample end rows of ``split`` (see module docstring).

    ``limit_samples`` keeps the first K sample end rows in chronological order (before shuffling);
    ``keys`` the batch keys to build (``None``: all of :data:`BATCH_KEYS`).
    ``len(batcher)`` is the number of batches; ``batcher.batch(i)`` builds batch ``i`` of the current
    epoch's order and iteration yields every batch once.
    """

    def __init__(
        self,
        split: SplitArrays,
        *,
        seq_len: int,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        limit_samples: int | None = None,
        drop_last: bool = False,
        keys: Sequence[str] | None = None,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if limit_samples is not None and limit_samples < 0:
            raise ValueError(f"limit_samples must be >= 0, got {limit_samples}")
        if keys is not None:
            unknown = sorted(set(keys) - set(BATCH_KEYS))
            if unknown:
                raise ValueError(f"unknown batch keys {unknown} (known: {list(BATCH_KEYS)})")
        name = split.attrs.get("path", split.split)
        if seq_len > split.seq_len:
            raise ValueError(
                f"split {name!r}: seq_len {seq_len} is longer than the split's seq_len {split.seq_len}; "
                "its warm-up rows only cover windows of up to that length"
            )
        missing = [t for t in TARGET_NAMES if t not in split.target_names]
        if missing:
            raise ValueError(f"split {name!r}: targets {missing} missing (has {split.target_names})")
        self.split = split
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.end_rows = chronological_end_rows(split, limit_samples)
        self._check_windows(name)
        cols = [list(split.target_names).index(t) for t in TARGET_NAMES]
        self._target_cols = None if cols == list(range(split.targets.shape[1])) else np.asarray(cols)
        self.keys: tuple[str, ...] = BATCH_KEYS if keys is None else tuple(k for k in BATCH_KEYS if k in keys)
        self._gathers = [(key, self._gather_of(key)) for key in self.keys]
        n = self.n_samples
        self._n_batches = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        self.epoch = 0
        self._epoch_ends = self.end_rows  # the end rows in this epoch's sample order
        self.set_epoch(0)

    def _gather_of(self, key: str) -> Callable[[np.ndarray], np.ndarray]:
        """The function that builds ``key`` of a batch from its end rows (chosen once, not per batch;
        no dtype cast where the split's dtype is already the batch's)."""
        s, lag = self.split, self.seq_len - 1
        if key == "seq":
            if s.n_rows < self.seq_len:  # no window fits, so no sample either: the batcher is empty
                return lambda ends: np.empty((0, self.seq_len, s.seq.shape[1]), np.float32)
            if s.seq.dtype == np.float32 and s.seq.ndim == 2 and s.seq.flags.c_contiguous:
                rows, seq_len = s.seq, self.seq_len  # one block copy per window, the next ones prefetched
                return lambda ends: gather_windows(rows, ends - lag, seq_len)
            # (N - L + 1, L, F_seq) strided view (no copy): item r is the window of rows r .. r + L - 1;
            # fancy indexing copies one contiguous L x F_seq block per sample
            windows = sliding_window_view(s.seq, (self.seq_len, s.seq.shape[1]))[:, 0]
            return lambda ends: windows[ends - lag].astype(np.float32)
        if key == "targets" and self._target_cols is not None:
            cols = self._target_cols
            return lambda ends: np.take(np.take(s.targets, ends, axis=0), cols, axis=1).astype(np.float32, copy=False)
        if key == "tb_class":
            # the class index (label + 1) as int64 for every row, made once: a batch is then one take
            # instead of a take, a widening copy and an add (8 bytes a row beside the F-wide rows)
            classes = s.tb_label.astype(np.int64)
            classes += 1
            return lambda ends: np.take(classes, ends)
        if key == "end_rows":
            return lambda ends: ends.copy()  # ends is a view of the epoch's order: the batch gets its own
        source = {"snap": s.snap, "ctx_cat": s.ctx_cat, "ctx_cont": s.ctx_cont, "targets": s.targets,
                  "timestamp": s.timestamp, "symbol_idx": s.symbol_idx}[key]
        dtype = np.int64 if key in ("ctx_cat", "timestamp", "symbol_idx") else np.float32
        if source.dtype == dtype:
            return lambda ends: np.take(source, ends, axis=0)
        return lambda ends: np.take(source, ends, axis=0).astype(dtype)

    def _check_windows(self, name: str) -> None:
        ends = self.end_rows
        if ends.size == 0:
            return
        first = ends - (self.seq_len - 1)
        if first.min() < 0 or ends.max() >= self.split.n_rows:
            raise ValueError(f"split {name!r}: sample end rows leave the row range [0, {self.split.n_rows})")
        # rows are sorted by (symbol, timestamp): equal symbols at both ends => one symbol throughout
        crossing = np.flatnonzero(self.split.symbol_idx[first] != self.split.symbol_idx[ends])
        if crossing.size:
            raise ValueError(
                f"split {name!r}: {crossing.size} windows of {self.seq_len} bars cross a symbol boundary "
                f"(first at end row {int(ends[crossing[0]])})"
            )

    @property
    def n_samples(self) -> int:
        return int(self.end_rows.shape[0])

    def __len__(self) -> int:
        return self._n_batches

    def set_epoch(self, epoch: int) -> None:
        """Use the sample order of ``epoch``: a permutation seeded by (seed, epoch) when shuffling."""
        self.epoch = int(epoch)
        if self.shuffle:
            self._epoch_ends = self.end_rows[np.random.default_rng([self.seed, self.epoch]).permutation(self.n_samples)]
        else:
            self._epoch_ends = self.end_rows

    def batch_end_rows(self, i: int) -> np.ndarray:
        """The sample end rows of batch ``i`` (in batch order; a view, not to be written to)."""
        if not 0 <= i < self._n_batches:
            raise IndexError(f"batch {i} out of range (0..{self._n_batches - 1})")
        return self._epoch_ends[i * self.batch_size : (i + 1) * self.batch_size]

    def batch(self, i: int) -> Batch:
        """Build batch ``i``: one vectorised gather per selected key, O(B·L·F) memory."""
        ends = self.batch_end_rows(i)
        return {key: torch.from_numpy(gather(ends)) for key, gather in self._gathers}

    def __iter__(self) -> Iterator[Batch]:
        for i in range(len(self)):
            yield self.batch(i)
