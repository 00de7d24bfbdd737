"""Day batches: every batch holds whole cross-sections (all eligible symbols of one or more timestamps).

A cross-sectional model (graph attention over a day's symbols, a per-day rank loss) needs each batch to
be complete days. The split's rows are stored **instrument-major** (sorted by (symbol, timestamp),
``data/split_arrays.py``), so a day's rows are scattered across the file, one per symbol block. Grouping
*consecutive* rows into "days" (what Qlib's ``DailyBatchSampler`` does: per-day counts from
``groupby("datetime").size()``, then contiguous ranges ``arange(start, start + count)``, which is only
correct for datetime-major storage; qlib issue 2319) would silently give one symbol over several
consecutive dates per batch on this layout. Here the days are found from the timestamps themselves:

- once, at construction: the eligible end rows (``split.sample_end_rows``) sorted by
  (timestamp, symbol_idx) (one ``np.lexsort``), and the start of each distinct timestamp in that order
  (``np.unique``); days with fewer than ``min_symbols`` eligible symbols are left out (counted in
  ``skipped_days``);
- per batch: its days are slices of that order (one vectorised range concatenation), the ``(n, L)``
  window index matrix ``end - L + 1 .. end`` is one ``np.take`` over the flat ``seq`` rows (never an
  ``N x L x F`` array for the split), and the edges of each day come from the symbol graph
  (:meth:`SymbolGraph.edges_for_day`), shifted by the day's node offset.

Batch (``dict[str, torch.Tensor]``), nodes sorted by (day, symbol_idx):

==============  ===============  =======  ============================================================
key             shape            dtype    meaning
==============  ===============  =======  ============================================================
``seq``         (n, L, F_seq)    float32  window ending at the node's row (when "seq" in ``keys``)
``snap``        (n, F_snap)      float32  snapshot features (when requested in ``keys``)
``ctx_cat``     (n, C)           int64    context codes (when requested in ``keys``)
``ctx_cont``    (n, C2)          float32  continuous context (when requested in ``keys``)
``targets``     (n, T)           float32  ``split_arrays.TARGET_NAMES`` order
``tb_class``    (n,)             int64    ``tb_label + 1``
``timestamp``   (n,)             int64    ns since epoch, UTC
``symbol_idx``  (n,)             int64    index into ``split.symbols``
``end_rows``    (n,)             int64    row of the node in the split
``day``         (n,)             int64    local day id 0..D-1
``day_ptr``     (D+1,)           int64    CSR offsets of each day's nodes
``edge_index``  (2, E)           int64    local node ids [source; target], same day, no self loops
``edge_weight`` (E,)             float32  > 0
==============  ===============  =======  ============================================================

Day order: chronological (val/test), or with ``shuffle=True`` a permutation of the days drawn from
``numpy.random.default_rng([seed, epoch])`` (train); the days inside one batch are in chronological
order. ``graph=None`` gives no edges (E = 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from sentinel_pipeline.data.split_arrays import TARGET_NAMES, SplitArrays

Batch = dict[str, torch.Tensor]
FEATURE_KEYS: tuple[str, ...] = ("seq", "snap", "ctx_cat", "ctx_cont")
DEFAULT_KEYS: tuple[str, ...] = FEATURE_KEYS
ALWAYS_KEYS: tuple[str, ...] = ("targets", "tb_class", "timestamp", "symbol_idx", "end_rows", "day", "day_ptr",
                                "edge_index", "edge_weight")


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for each pair, vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offset = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total, dtype=np.int64) - offset)


class DayBatcher:
    """Batches of ``days_per_batch`` whole days over ``split`` (see the module docstring).

    ``limit_days`` keeps the first K days (chronologically, after dropping days with fewer than
    ``min_symbols`` eligible symbols). ``len(b)`` is the number of batches per epoch; ``b.batch(i)``
    builds batch ``i`` of the current epoch (``b.set_epoch(e)``); iteration yields each batch once.
    """

    def __init__(
        self,
        split: SplitArrays,
        *,
        seq_len: int,
        days_per_batch: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        graph: Any = None,
        keys: tuple[str, ...] | list[str] = DEFAULT_KEYS,
        min_symbols: int = 5,
        limit_days: int | None = None,
    ) -> None:
        name = split.attrs.get("path", split.split)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if seq_len > split.seq_len:
            raise ValueError(f"split {name!r}: seq_len {seq_len} is longer than the split's seq_len {split.seq_len}; "
                             "its warm-up rows only cover windows of up to that length")
        if days_per_batch < 1:
            raise ValueError(f"days_per_batch must be >= 1, got {days_per_batch}")
        if min_symbols < 1:
            raise ValueError(f"min_symbols must be >= 1, got {min_symbols}")
        if limit_days is not None and limit_days < 0:
            raise ValueError(f"limit_days must be >= 0, got {limit_days}")
        unknown = [k for k in keys if k not in FEATURE_KEYS and k not in ALWAYS_KEYS]
        if unknown:
            raise ValueError(f"unknown batch keys {unknown}; feature keys are {list(FEATURE_KEYS)} (always present: "
                             f"{list(ALWAYS_KEYS)})")
        missing = [t for t in TARGET_NAMES if t not in split.target_names]
        if missing:
            raise ValueError(f"split {name!r}: targets {missing} missing (has {split.target_names})")
        if graph is not None and getattr(graph, "feature_contract_hash", split.feature_contract_hash) != \
                split.feature_contract_hash:
            raise ValueError(f"split {name!r}: the symbol graph was built for feature contract "
                             f"{graph.feature_contract_hash}, the split has {split.feature_contract_hash}")
        self.split = split
        self.seq_len = int(seq_len)
        self.days_per_batch = int(days_per_batch)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.graph = graph
        self.keys = tuple(k for k in FEATURE_KEYS if k in keys)
        self.min_symbols = int(min_symbols)
        cols = [list(split.target_names).index(t) for t in TARGET_NAMES]
        self._target_cols = None if cols == list(range(split.targets.shape[1])) else np.asarray(cols)
        self._offsets = np.arange(-self.seq_len + 1, 1, dtype=np.int64)
        self._symbols = list(split.symbols)

        ends = np.asarray(split.sample_end_rows, dtype=np.int64)
        ts = np.asarray(split.timestamp)[ends]
        sym = np.asarray(split.symbol_idx)[ends]
        order = np.lexsort((sym, ts))  # by (timestamp, symbol_idx), whatever the storage order
        ends, ts = ends[order], ts[order]
        days, starts, counts = np.unique(ts, return_index=True, return_counts=True)
        big = counts >= self.min_symbols
        self.skipped_days = int((~big).sum())
        self.skipped_samples = int(counts[~big].sum())
        days, starts, counts = days[big], starts[big], counts[big]
        if limit_days is not None:
            days, starts, counts = days[:limit_days], starts[:limit_days], counts[:limit_days]
        self.end_rows = ends  # (timestamp, symbol)-ordered eligible ends (including those of skipped days)
        self.day_timestamps = days.astype(np.int64)
        self.day_starts = starts.astype(np.int64)
        self.day_counts = counts.astype(np.int64)
        self._check_windows(name)
        self.epoch = 0
        self._order = np.arange(self.n_days)
        self.set_epoch(0)

    def _check_windows(self, name: str) -> None:
        ends = self.end_rows[_ranges(self.day_starts, self.day_counts)]
        if ends.size == 0:
            return
        first = ends - (self.seq_len - 1)
        if first.min() < 0 or ends.max() >= self.split.n_rows:
            raise ValueError(f"split {name!r}: sample end rows leave the row range [0, {self.split.n_rows})")
        crossing = np.flatnonzero(self.split.symbol_idx[first] != self.split.symbol_idx[ends])
        if crossing.size:  # rows sorted by (symbol, time): same symbol at both ends => one symbol throughout
            raise ValueError(f"split {name!r}: {crossing.size} windows of {self.seq_len} bars cross a symbol "
                             f"boundary (first at end row {int(ends[crossing[0]])})")

    @property
    def n_days(self) -> int:
        return int(self.day_timestamps.size)

    @property
    def n_samples(self) -> int:
        """Eligible nodes served per epoch (days left out by ``min_symbols``/``limit_days`` excluded)."""
        return int(self.day_counts.sum())

    def __len__(self) -> int:
        return math.ceil(self.n_days / self.days_per_batch)

    def set_epoch(self, epoch: int) -> None:
        """Use the day order of ``epoch``: a permutation seeded by (seed, epoch) when shuffling."""
        self.epoch = int(epoch)
        if self.shuffle:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_days)
        else:
            self._order = np.arange(self.n_days)

    def day_order(self) -> np.ndarray:
        """The global day ids (index into ``day_timestamps``) of this epoch, in serving order."""
        return self._order.copy()

    def batch_days(self, i: int) -> np.ndarray:
        """The global day ids of batch ``i``, chronological."""
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} out of range (0..{len(self) - 1})")
        return np.sort(self._order[i * self.days_per_batch: (i + 1) * self.days_per_batch])

    def batch(self, i: int) -> Batch:
        """Build batch ``i``: one gather per array (O(n·L·F) memory), edges per day from the graph."""
        days = self.batch_days(i)
        counts = self.day_counts[days]
        ends = self.end_rows[_ranges(self.day_starts[days], counts)]
        s = self.split
        n = ends.size
        day_ptr = np.zeros(days.size + 1, np.int64)
        np.cumsum(counts, out=day_ptr[1:])
        sym = np.take(s.symbol_idx, ends).astype(np.int64)
        out: dict[str, np.ndarray] = {}
        if "seq" in self.keys:
            window = (ends[:, None] + self._offsets).reshape(-1)
            out["seq"] = np.take(s.seq, window, axis=0).reshape(n, self.seq_len, s.seq.shape[1]).astype(np.float32, copy=False)
        if "snap" in self.keys:
            out["snap"] = np.take(s.snap, ends, axis=0).astype(np.float32, copy=False)
        if "ctx_cat" in self.keys:
            out["ctx_cat"] = np.take(s.ctx_cat, ends, axis=0).astype(np.int64)
        if "ctx_cont" in self.keys:
            out["ctx_cont"] = np.take(s.ctx_cont, ends, axis=0).astype(np.float32, copy=False)
        targets = np.take(s.targets, ends, axis=0)
        if self._target_cols is not None:
            targets = targets[:, self._target_cols]
        out["targets"] = targets.astype(np.float32, copy=False)
        out["tb_class"] = np.take(s.tb_label, ends).astype(np.int64) + 1
        out["timestamp"] = np.repeat(self.day_timestamps[days], counts)
        out["symbol_idx"] = sym
        out["end_rows"] = ends
        out["day"] = np.repeat(np.arange(days.size, dtype=np.int64), counts)
        out["day_ptr"] = day_ptr
        out["edge_index"], out["edge_weight"] = self._edges(days, day_ptr, sym)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}

    def _edges(self, days: np.ndarray, day_ptr: np.ndarray, sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.graph is None:
            return np.zeros((2, 0), np.int64), np.zeros(0, np.float32)
        index, weight = [], []
        for d in range(days.size):
            lo, hi = int(day_ptr[d]), int(day_ptr[d + 1])
            ei, ew = self.graph.edges_for_day(int(self.day_timestamps[days[d]]), sym[lo:hi], self._symbols)
            index.append(np.asarray(ei, dtype=np.int64) + lo)
            weight.append(np.asarray(ew, dtype=np.float32))
        return np.concatenate(index, axis=1), np.concatenate(weight)

    def __iter__(self) -> Iterator[Batch]:
        for i in range(len(self)):
            yield self.batch(i)
