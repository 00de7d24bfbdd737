"""Layers of the cross-sectional (graph) model family: graph attention, soft rank, rank loss, the net.

- :mod:`.graph_attention`: masked multi-head graph attention (GATv1) in plain torch, edge-list form
  (the one models use) and a dense masked form (kept for the benchmark and as a test oracle).
- :mod:`.soft_rank`: differentiable soft rank, soft Spearman, per-day rank normalisation.
- :mod:`.rank_loss`: the multi-horizon loss ``MSE + lambda * (1 - soft Spearman)`` per day and horizon.
- :mod:`.gat_multi_horizon_net`: temporal encoder per symbol -> graph attention -> one head per horizon.
"""

from sentinel_pipeline.training.layers.gat_multi_horizon_net import (
    DEFAULT_ARCH,
    GATMultiHorizonNet,
    build,
    resolve_arch,
)
from sentinel_pipeline.training.layers.graph_attention import GraphAttention, dense_adjacency
from sentinel_pipeline.training.layers.rank_loss import multi_horizon_rank_loss
from sentinel_pipeline.training.layers.soft_rank import (
    rank_normalise,
    soft_rank,
    soft_spearman,
    soft_spearman_days,
)

__all__ = [
    "DEFAULT_ARCH",
    "GATMultiHorizonNet",
    "GraphAttention",
    "build",
    "dense_adjacency",
    "multi_horizon_rank_loss",
    "rank_normalise",
    "resolve_arch",
    "soft_rank",
    "soft_spearman",
    "soft_spearman_days",
]
