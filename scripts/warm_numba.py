"""Compile the pipeline's numba kernels once, so that the first real run loads them from numba's cache.

Every kernel is ``@njit(cache=True)``: compiled on first use and cached next to its module (in
``__pycache__``). A cold cache cost the first run 37 s and +2 GB of peak RSS at 10M bars; this script
pays the compilation on a tiny input instead (about 20-40 s once, seconds when the cache is warm):
the data half (synthetic market, features, labels) on a small market (20 symbols x 60 days) in a temp directory, and the
replay's trade simulation on its bars. ``scripts/setup.sh`` runs it after installing.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main() -> int:
    import numpy as np

    from sentinel_pipeline import data_half
    from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig
    from sentinel_pipeline.data.tables import read_frame
    from sentinel_pipeline.paths import ArtifactPaths
    from sentinel_pipeline.replay.trades import simulate_trades

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sentinel_warm_") as tmp:
        paths = ArtifactPaths(data_dir=Path(tmp) / "data", models_dir=Path(tmp) / "models")
        cfg = data_half.DataHalfConfig()
        cfg.synthetic = SyntheticMarketConfig(n_symbols=20, n_days=60)
        data_half.run_data_half(paths, cfg, log=lambda _msg: None)
        bars = read_frame(paths.bars).sort_values(["symbol", "timestamp"], kind="stable").reset_index(drop=True)
        rng = np.random.default_rng(0)
        atr = (bars["high"] - bars["low"]).to_numpy(np.float64) + 1e-3
        simulate_trades(bars, rng.normal(size=len(bars)), atr, cfg.labels)
    print(f"[setup] numba kernels compiled and cached in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
