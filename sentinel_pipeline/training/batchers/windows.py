"""Lazy window batches over a split's flat rows: the batcher of the ``"windows"`` batch kind.

A split (:class:`~sentinel_pipeline.data.split_arrays.SplitArrays`) holds one row per bar and the
list of rows at which a sample ends; it never holds pre-built windows. :class:`WindowBatcher` turns
the end rows of one batch into the ``(B, L, F_seq)`` window tensor in a single vectorised gather
(``np.take`` with a ``(B, L)`` index matrix ``end - L + 1 .. end``), so memory per batch is
O(B·L·F) and the split itself is only read (it may be a read-only memory map of the Arrow cache).

Batches are ``dict[str, torch.Tensor]`` (:data:`Batch`) with the keys of :data:`BATCH_KEYS`:

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
from collections.abc import Iterator

import numpy as np
import torch

from sentinel_pipeline.data.split_arrays import TARGET_NAMES, SplitArrays

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

    ``limit_samples`` keeps the first K sample end rows in chronological order (before shuffling).
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
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if limit_samples is not None and limit_samples < 0:
            raise ValueError(f"limit_samples must be >= 0, got {limit_samples}")
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
        self._offsets = np.arange(-self.seq_len + 1, 1, dtype=np.int64)
        self.epoch = 0
        self._order: np.ndarray | None = None
        self.set_epoch(0)

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
        if self.drop_last:
            return self.n_samples // self.batch_size
        return math.ceil(self.n_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Use the sample order of ``epoch``: a permutation seeded by (seed, epoch) when shuffling."""
        self.epoch = int(epoch)
        if self.shuffle:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_samples)
        else:
            self._order = None

    def batch_end_rows(self, i: int) -> np.ndarray:
        """The sample end rows of batch ``i`` (in batch order)."""
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} out of range (0..{len(self) - 1})")
        sel = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.end_rows[sel] if self._order is None else self.end_rows[self._order[sel]]

    def batch(self, i: int) -> Batch:
        """Build batch ``i``: one vectorised gather per array, O(B·L·F) memory."""
        ends = self.batch_end_rows(i)
        s = self.split
        b = ends.shape[0]
        window_rows = (ends[:, None] + self._offsets).reshape(-1)
        seq = np.take(s.seq, window_rows, axis=0).reshape(b, self.seq_len, s.seq.shape[1])
        targets = np.take(s.targets, ends, axis=0)
        if self._target_cols is not None:
            targets = targets[:, self._target_cols]
        arrays = {
            "seq": seq.astype(np.float32, copy=False),
            "snap": np.take(s.snap, ends, axis=0).astype(np.float32, copy=False),
            "ctx_cat": np.take(s.ctx_cat, ends, axis=0).astype(np.int64),
            "ctx_cont": np.take(s.ctx_cont, ends, axis=0).astype(np.float32, copy=False),
            "targets": targets.astype(np.float32, copy=False),
            "tb_class": np.take(s.tb_label, ends).astype(np.int64) + 1,
            "end_rows": ends.copy(),
            "timestamp": np.take(s.timestamp, ends).astype(np.int64, copy=False),
            "symbol_idx": np.take(s.symbol_idx, ends).astype(np.int64),
        }
        return {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in BATCH_KEYS}

    def __iter__(self) -> Iterator[Batch]:
        for i in range(len(self)):
            yield self.batch(i)
