"""Every numba kernel of the data half, the replay and the training batcher is cached on disk, so the warm-up of
``scripts/warm_numba.py`` (run by ``scripts/setup.sh`` over both data-half presets) leaves the first
real run nothing to compile."""

from __future__ import annotations

import importlib

import numba.core.registry

MODULES = ("sentinel_pipeline.data.features", "sentinel_pipeline.data.labels", "sentinel_pipeline.data.synthetic_market",
           "sentinel_pipeline.data.raw_bars", "sentinel_pipeline.data.bar_quality", "sentinel_pipeline.data.splits",
           "sentinel_pipeline.data.scalers", "sentinel_pipeline.data.hdf5_splits", "sentinel_pipeline.replay.trades",
           "sentinel_pipeline.training.batchers.window_gather")


def test_every_kernel_is_cached_on_disk() -> None:
    kernels = {}
    for name in MODULES:
        module = importlib.import_module(name)
        kernels.update({f"{name}.{k}": v for k, v in vars(module).items()
                        if isinstance(v, numba.core.registry.CPUDispatcher) and v.__module__ == name})
    assert len(kernels) >= 10, sorted(kernels)
    not_cached = sorted(k for k, d in kernels.items() if type(d._cache).__name__ == "NullCache")
    assert not not_cached, f"kernels without cache=True (compiled again in every process): {not_cached}"
