"""Compile the pipeline's numba kernels once, so that the first real run loads them from numba's cache.

Every kernel is ``@njit(cache=True)``: compiled on first use and cached next to its module (in
``__pycache__``). A cold cache cost the first run 37 s and +2 GB of peak RSS at 10M bars; this script
pays the compilation on a tiny input instead (about 20-40 s once, seconds when the cache is warm):
the whole data half in both presets, on a small synthetic market (20 symbols x 60 days; intraday
features and labels) and on a small synthetic panel (daily features with cross-sectional ranks,
labels in trading days), in a temp directory, the replay's trade simulation on the market's bars, and
the training batcher's window gather.
It then lists any kernel of the package that was compiled but not written to numba's cache (none
should be). ``scripts/setup.sh`` runs it after installing.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _dispatchers() -> list[tuple[str, object]]:
    """Every numba kernel (dispatcher) of the package's loaded modules."""
    import numba.core.registry

    out = []
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("sentinel_pipeline"):
            out += [(f"{module.__name__}.{k}", v) for k, v in vars(module).items()
                    if isinstance(v, numba.core.registry.CPUDispatcher)]
    return out


def main() -> int:
    import numpy as np

    from sentinel_pipeline import data_half
    from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig
    from sentinel_pipeline.data.synthetic_panel import SyntheticPanelConfig
    from sentinel_pipeline.data.tables import read_frame
    from sentinel_pipeline.paths import ArtifactPaths
    from sentinel_pipeline.replay.trades import simulate_trades
    from sentinel_pipeline.training.batchers.window_gather import gather_windows

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sentinel_warm_") as tmp:
        paths = ArtifactPaths(data_dir=Path(tmp) / "data", models_dir=Path(tmp) / "models")
        cfg = data_half.DataHalfConfig()
        cfg.synthetic = SyntheticMarketConfig(n_symbols=20, n_days=60)
        data_half.run_data_half(paths, cfg, log=lambda _msg: None)
        panel = ArtifactPaths(data_dir=Path(tmp) / "panel", models_dir=Path(tmp) / "models")
        data_half.run_data_half(panel, data_half.panel_config(synthetic_panel=SyntheticPanelConfig(n_symbols=40, n_days=260)),
                                log=lambda _msg: None)
        bars = read_frame(paths.bars).sort_values(["symbol", "timestamp"], kind="stable").reset_index(drop=True)
        rng = np.random.default_rng(0)
        atr = (bars["high"] - bars["low"]).to_numpy(np.float64) + 1e-3
        simulate_trades(bars, rng.normal(size=len(bars)), atr, cfg.labels)
    # the batcher's window gather, for a split in memory and for one mapped read-only from the Arrow cache
    rows = np.zeros((8, 2), dtype=np.float32)
    gather_windows(rows, np.arange(3), 4)
    rows.flags.writeable = False
    gather_windows(rows, np.arange(3), 4)
    uncached = [name for name, d in _dispatchers() if d.stats.cache_misses and not getattr(d._cache, "cache_path", None)]
    print(f"[setup] numba kernels compiled and cached in {time.perf_counter() - t0:.1f}s"
          + (f"; NOT cacheable: {uncached}" if uncached else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
