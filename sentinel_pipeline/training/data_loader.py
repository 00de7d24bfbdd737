"""Opening a split for training and feeding a batcher's batches to the device.

:func:`load_split_for_training` opens a split (the Arrow cache when valid, else the HDF5 file, after a
memory check); :func:`make_dataloader` optionally runs any batcher (``families.base.Batcher``: the
window batcher, the day batcher, ...) in worker processes (one batch per item), and :func:`to_device`
moves a batch to the training device, asynchronously when its memory is pinned.

The window batcher lives in ``training/batchers/windows.py``; its names (``WindowBatcher``,
``BATCH_KEYS``, ``chronological_end_rows``, ``Batch``) are re-exported here for existing imports.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import torch

from sentinel_pipeline.data import arrow_cache, hdf5_splits
from sentinel_pipeline.data.feature_contract import ContractError
from sentinel_pipeline.data.split_arrays import TARGET_NAMES, SplitArrays
from sentinel_pipeline.paths import arrow_cache_for
from sentinel_pipeline.training import runtime
from sentinel_pipeline.training.batchers.windows import (
    BATCH_KEYS,
    Batch,
    WindowBatcher,
    chronological_end_rows,
)

if TYPE_CHECKING:
    from sentinel_pipeline.training.families.base import Batcher

log = logging.getLogger(__name__)



def _h5_content_checksum(h5_path: Path) -> str | None:
    """The ``content_checksum`` attribute of an HDF5 split (attributes only, no data read)."""
    if not h5_path.is_file():
        raise FileNotFoundError(f"{h5_path}: split file does not exist")
    try:
        with h5py.File(h5_path, "r") as f:
            value = f.attrs.get("content_checksum")
    except OSError as exc:
        raise hdf5_splits.SplitFileError(f"{h5_path}: not a readable HDF5 file: {exc}") from exc
    return value.decode("utf-8") if isinstance(value, bytes) else (None if value is None else str(value))


# share of the memory still available (cgroup-aware) that a split read whole into RAM may take
MEMORY_BUDGET_FRACTION = 0.8


class SplitTooLargeError(MemoryError):
    """An HDF5 split would not fit in the memory this process may still use."""


def h5_split_nbytes(h5_path: Path) -> int:
    """Bytes the datasets of an HDF5 split take once read into NumPy (shapes only, no data read)."""
    with h5py.File(h5_path, "r") as f:
        return int(sum(ds.size * ds.dtype.itemsize for ds in f.values() if isinstance(ds, h5py.Dataset)))


def check_fits_in_memory(h5_path: Path, available: int | None = None) -> int:
    """Refuse to read ``h5_path`` whole when it needs more than ``MEMORY_BUDGET_FRACTION`` of the
    memory still available to this process (``runtime.available_memory_bytes``: the container's
    cgroup limit, not the host's ``free``). Returns the split's size in bytes."""
    need = h5_split_nbytes(h5_path)
    available = runtime.available_memory_bytes() if available is None else available
    if need > MEMORY_BUDGET_FRACTION * available:
        raise SplitTooLargeError(
            f"{h5_path}: reading this split needs {need / 2**20:.0f} MiB but only {available / 2**20:.0f} MiB "
            f"are available to this process (container memory limit included); build the Arrow cache "
            f"(memory-mapped, read lazily) or give the run more memory"
        )
    return need


def load_split_for_training(
    h5_path: str | Path, expected_hash: str, prefer_arrow: bool = True
) -> tuple[SplitArrays, str]:
    """Open a split for training: the Arrow cache when it is valid, else the HDF5 file.

    The Arrow cache ``paths.arrow_cache_for(h5_path)`` is used when ``prefer_arrow`` and it exists,
    its contract hash equals ``expected_hash`` and its recorded source checksum equals the HDF5
    file's ``content_checksum`` attribute (only the attribute is read: the check costs no data I/O).
    Otherwise the HDF5 file is read whole (``ContractError`` naming the file on a hash mismatch),
    after checking that it fits in the memory this process may use (``SplitTooLargeError`` if not).
    Returns the split and ``"arrow"`` or ``"hdf5"``.
    """
    h5_path = Path(h5_path)
    if prefer_arrow:
        arrow_path = arrow_cache_for(h5_path)
        h5_checksum = _h5_content_checksum(h5_path)
        if arrow_path.exists():
            try:
                cached = arrow_cache.open_split(arrow_path, expected_hash)
            except (ContractError, hdf5_splits.SplitFileError, OSError) as exc:
                log.warning("%s: Arrow cache not usable, reading %s: %s", arrow_path, h5_path, exc)
            else:
                cache_checksum = cached.attrs.get("source_content_checksum")
                if h5_checksum is not None and cache_checksum == h5_checksum:
                    return cached, "arrow"
                log.warning(
                    "%s: Arrow cache was built from content %s, %s holds %s; reading HDF5",
                    arrow_path,
                    cache_checksum,
                    h5_path,
                    h5_checksum,
                )
    check_fits_in_memory(h5_path)
    return hdf5_splits.read_split(h5_path, expected_hash), "hdf5"


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style view of a batcher: item ``i`` is batch ``i`` (for ``DataLoader(batch_size=None)``)."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def __len__(self) -> int:
        return len(self.batcher)

    def __getitem__(self, i: int) -> Batch:
        return self.batcher.batch(i)


def _single_thread_worker(worker_id: int) -> None:
    """``worker_init_fn``: one compute thread per loader worker (workers only gather and copy)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    torch.set_num_threads(1)


def make_dataloader(
    batcher: Batcher, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int | None = None
) -> Iterable[Batch]:
    """An iterable of the batcher's batches, in the batcher's order.

    ``num_workers == 0`` (and no pinning) returns the batcher itself. Otherwise a
    ``torch.utils.data.DataLoader(batch_size=None)`` over a map-style dataset whose item ``i`` is
    batch ``i``; workers are started per ``iter()`` (not persistent), so call
    ``batcher.set_epoch(e)`` before iterating an epoch and the workers see that epoch's order.
    ``pin_memory`` pins each batch in page-locked memory (only meaningful with CUDA).
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if num_workers == 0 and not pin_memory:
        return batcher
    return torch.utils.data.DataLoader(
        _BatchDataset(batcher),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        worker_init_fn=_single_thread_worker if num_workers > 0 else None,
        persistent_workers=False,
    )


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """Move a batch to ``device``; tensors in pinned memory go with ``non_blocking=True``."""
    device = torch.device(device)
    out: Batch = {}
    for key, tensor in batch.items():
        non_blocking = device.type == "cuda" and tensor.is_pinned()
        out[key] = tensor.to(device, non_blocking=non_blocking)
    return out


__all__ = [
    "BATCH_KEYS",
    "TARGET_NAMES",
    "Batch",
    "MEMORY_BUDGET_FRACTION",
    "SplitTooLargeError",
    "WindowBatcher",
    "check_fits_in_memory",
    "chronological_end_rows",
    "h5_split_nbytes",
    "load_split_for_training",
    "make_dataloader",
    "to_device",
]
