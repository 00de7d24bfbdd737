"""The compiled window gather (``training.batchers.window_gather``) gives, byte for byte, the windows
that indexing a ``sliding_window_view`` gives, for shuffled and ordered starts, both array ends, odd
row widths, read-only (memory-mapped) arrays and empty batches, and refuses starts outside the array."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from sentinel_pipeline.training.batchers.window_gather import gather_windows, gather_windows_into


def _reference(rows: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    return sliding_window_view(rows, (seq_len, rows.shape[1]))[:, 0][starts]


@pytest.mark.parametrize(("n_rows", "n_features", "seq_len"), [(500, 32, 30), (97, 3, 1), (64, 5, 64), (300, 17, 7)])
def test_equals_the_strided_view_gather(n_rows: int, n_features: int, seq_len: int) -> None:
    rng = np.random.default_rng(n_rows)
    rows = rng.normal(size=(n_rows, n_features)).astype(np.float32)
    rows[3, 0] = np.nan  # NaN bits copied as they are
    last = n_rows - seq_len
    for starts in (rng.permutation(last + 1), np.arange(last + 1), np.array([0, last, 0, last]), rng.integers(0, last + 1, 5)):
        ours, ref = gather_windows(rows, starts, seq_len), _reference(rows, starts, seq_len)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype and ours.flags.c_contiguous
        assert ours.tobytes() == ref.tobytes()


def test_read_only_and_mapped_rows(tmp_path) -> None:
    rows = np.arange(40 * 6, dtype=np.float32).reshape(40, 6)
    rows.tofile(tmp_path / "rows.bin")
    mapped = np.memmap(tmp_path / "rows.bin", dtype=np.float32, mode="r", shape=(40, 6))
    starts = np.array([5, 0, 30, 12])
    assert not mapped.flags.writeable
    assert np.array_equal(gather_windows(mapped, starts, 10), _reference(rows, starts, 10))


def test_empty_batch_and_bounds() -> None:
    rows = np.ones((20, 4), dtype=np.float32)
    assert gather_windows(rows, np.zeros(0, np.int64), 5).shape == (0, 5, 4)
    for bad in ([16], [-1], [0, 3, 17]):
        with pytest.raises(IndexError):
            gather_windows(rows, np.array(bad), 5)
    with pytest.raises(ValueError, match="C-contiguous"):
        gather_windows(np.ones((4, 20), np.float32).T, np.array([0]), 2)
    starts = np.array([0, 1])
    for out in (np.empty((1, 5, 4), np.float32), np.empty((2, 6, 4), np.float32), np.empty((2, 5, 3), np.float32),
                np.empty((2, 5, 4), np.float64), np.empty((2, 5, 8), np.float32)[:, :, ::2]):
        with pytest.raises(ValueError):
            gather_windows_into(rows, starts, 5, out)
    with pytest.raises(ValueError):
        gather_windows_into(np.ones((20, 8), np.float32)[:, ::2], starts, 5, np.empty((2, 5, 4), np.float32))
