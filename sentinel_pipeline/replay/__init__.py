"""Production-style replay of a trained bundle on held-out bars, and its comparison.

- ``config``:         :class:`ReplayConfig`, the replay window, barrier parameters from ``label_params``
- ``trades``:         :func:`simulate_trades` (signal → next-open entries → triple-barrier exits),
  :func:`random_entry_baseline`
- ``metrics``:        :func:`trade_metrics` (counts, entry quality, hit rate, daily-equity Sharpe and
  drawdown, IC/rank IC), :func:`equity_curve`
- ``report``:         :func:`compare_reports`, :func:`plot_equity_curves`, :func:`write_replay_report`
- ``feature_config``: :func:`feature_config_from_contract` (the bundle's FeatureConfig, hash-checked)
- ``runtime``:        :func:`replay_bundle` (per-timestamp runtime), :func:`feature_parity`,
  :func:`replay_comparison`, :func:`write_replay_outputs`
"""

from sentinel_pipeline.replay.config import BarrierParams, ReplayConfig, barrier_params, replay_window_mask
from sentinel_pipeline.replay.feature_config import feature_config_from_contract
from sentinel_pipeline.replay.metrics import equity_curve, trade_metrics
from sentinel_pipeline.replay.report import compare_reports, plot_equity_curves, write_replay_report
from sentinel_pipeline.replay.runtime import (
    ReplayComparison,
    ReplayResult,
    feature_parity,
    replay_bundle,
    replay_comparison,
    scaled_feature_frame,
    write_replay_outputs,
)
from sentinel_pipeline.replay.trades import random_entry_baseline, simulate_trades

__all__ = [
    "BarrierParams",
    "ReplayComparison",
    "ReplayConfig",
    "ReplayResult",
    "barrier_params",
    "compare_reports",
    "equity_curve",
    "feature_config_from_contract",
    "feature_parity",
    "plot_equity_curves",
    "random_entry_baseline",
    "replay_bundle",
    "replay_comparison",
    "replay_window_mask",
    "scaled_feature_frame",
    "simulate_trades",
    "trade_metrics",
    "write_replay_outputs",
    "write_replay_report",
]
