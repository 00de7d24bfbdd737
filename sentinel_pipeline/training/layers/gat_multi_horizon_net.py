"""``GATMultiHorizonNet``: temporal encoder per symbol -> graph attention across the day -> one head per horizon.

Input: a day batch (the shared format of ``training/batchers/day_batches.py``): ``seq`` (n, L, F_seq),
optionally ``snap`` (n, F_snap), ``edge_index`` (2, E) local ids [source; target] within a day,
``edge_weight`` (E,) (> 0). Output ``{"ret_1", "ret_5", "ret_10", "ret_20"}`` (one per horizon of
``arch["horizons"]``), each (n,): scores on the cross-sectionally rank-normalised targets.

1. Encoder per symbol over its window: ``"gru"`` (GRU, last hidden state of the top layer) or
   ``"transformer"`` (input projection + learned positional embedding + pre-norm Transformer encoder,
   read at the last bar, LayerNorm); optional ``snap`` branch (``use_snap`` and ``snap_dim > 0``):
   ``h = GELU(Linear([h, snap]))``.
2. ``graph_layers`` blocks of :class:`GraphAttention` (``gat_heads`` heads of ``hidden_dim / gat_heads``
   channels, concatenated): ``h = LayerNorm(h + Dropout(ELU(GAT(h))))``. Edges never cross days (the
   batcher guarantees it), so several days in one batch stay independent. ``graph_layers = 0`` is the
   same model without the graph (the benchmark's reference).
3. One ``Linear(hidden_dim, 1)`` per horizon.

All layers have deterministic CPU kernels. The architecture dict is JSON-able and complete
(:func:`resolve_arch`), so a checkpoint's stored arch rebuilds the model (:func:`build`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sentinel_pipeline.training.layers.graph_attention import EDGE_WEIGHT_MODES, GraphAttention

# hyper-parameters; ``resolve_arch`` adds the data dims (seq_dim, seq_len, snap_dim)
DEFAULT_ARCH: dict[str, Any] = {
    "encoder": "gru",  # "gru" | "transformer"
    "hidden_dim": 48,
    "encoder_layers": 1,
    "transformer_heads": 4,
    "graph_layers": 1,
    "gat_heads": 4,
    "negative_slope": 0.2,
    "edge_weight_mode": "log",  # "log" | "linear" | "none" (see graph_attention)
    "dropout": 0.1,
    "attn_dropout": 0.1,
    "use_snap": False,
    "horizons": [1, 5, 10, 20],
}
DATA_KEYS = ("seq_dim", "seq_len", "snap_dim")
ENCODERS = ("gru", "transformer")


def resolve_arch(
    seq_dim: int, seq_len: int, snap_dim: int = 0, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The complete architecture: :data:`DEFAULT_ARCH`, the overrides, and the data dims."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DEFAULT_ARCH) - set(DATA_KEYS))
    if unknown:
        raise ValueError(f"gat_multi_horizon: unknown architecture keys {unknown} "
                         f"(known: {sorted(DEFAULT_ARCH)})")
    arch = {**DEFAULT_ARCH, **overrides, "seq_dim": int(seq_dim), "seq_len": int(seq_len),
            "snap_dim": int(snap_dim)}
    arch["horizons"] = [int(h) for h in arch["horizons"]]
    _validate(arch)
    return arch


def _validate(arch: dict[str, Any]) -> None:
    missing = sorted((set(DEFAULT_ARCH) | set(DATA_KEYS)) - set(arch))
    if missing:
        raise ValueError(f"gat_multi_horizon: architecture lacks keys {missing}")
    if arch["encoder"] not in ENCODERS:
        raise ValueError(f"gat_multi_horizon: encoder must be one of {ENCODERS}, got {arch['encoder']!r}")
    if arch["edge_weight_mode"] not in EDGE_WEIGHT_MODES:
        raise ValueError(f"gat_multi_horizon: edge_weight_mode must be one of {EDGE_WEIGHT_MODES}")
    hidden = arch["hidden_dim"]
    if arch["graph_layers"] > 0 and hidden % arch["gat_heads"]:
        raise ValueError(f"gat_multi_horizon: hidden_dim {hidden} is not a multiple of gat_heads "
                         f"{arch['gat_heads']}")
    if arch["encoder"] == "transformer" and hidden % arch["transformer_heads"]:
        raise ValueError(f"gat_multi_horizon: hidden_dim {hidden} is not a multiple of transformer_heads "
                         f"{arch['transformer_heads']}")
    if not arch["horizons"]:
        raise ValueError("gat_multi_horizon: no horizons")
    if arch["seq_dim"] < 1 or arch["seq_len"] < 1:
        raise ValueError(f"gat_multi_horizon: seq_dim and seq_len must be >= 1, got "
                         f"{arch['seq_dim']} and {arch['seq_len']}")


class _GRUEncoder(nn.Module):
    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        layers = arch["encoder_layers"]
        self.gru = nn.GRU(arch["seq_dim"], arch["hidden_dim"], num_layers=layers, batch_first=True,
                          dropout=arch["dropout"] if layers > 1 else 0.0)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(seq)
        return h[-1]


class _TransformerEncoder(nn.Module):
    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        d = arch["hidden_dim"]
        self.input_proj = nn.Linear(arch["seq_dim"], d)
        self.pos_embedding = nn.Parameter(torch.zeros(1, arch["seq_len"], d))
        nn.init.normal_(self.pos_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(d, arch["transformer_heads"], dim_feedforward=2 * d,
                                           dropout=arch["dropout"], activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, arch["encoder_layers"], enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(seq) + self.pos_embedding[:, -seq.shape[1]:]
        return self.norm(self.encoder(x)[:, -1])


class GATMultiHorizonNet(nn.Module):
    """See the module docstring. ``arch``: a complete dict from :func:`resolve_arch`."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        _validate(arch)
        self.arch = dict(arch)
        hidden = arch["hidden_dim"]
        self.encoder = _GRUEncoder(arch) if arch["encoder"] == "gru" else _TransformerEncoder(arch)
        self.snap_fuse = None
        if arch["use_snap"] and arch["snap_dim"] > 0:
            self.snap_fuse = nn.Linear(hidden + arch["snap_dim"], hidden)
        self.graph = nn.ModuleList(
            GraphAttention(hidden, hidden // arch["gat_heads"], arch["gat_heads"], concat=True,
                           negative_slope=arch["negative_slope"], dropout=arch["attn_dropout"],
                           edge_weight_mode=arch["edge_weight_mode"])
            for _ in range(arch["graph_layers"])
        )
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(arch["graph_layers"]))
        self.dropout = nn.Dropout(arch["dropout"])
        self.horizons = tuple(arch["horizons"])
        self.heads = nn.ModuleDict({f"ret_{h}": nn.Linear(hidden, 1) for h in self.horizons})

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seq = batch["seq"]
        if seq.dim() != 3 or seq.shape[-1] != self.arch["seq_dim"]:
            raise ValueError(f"gat_multi_horizon: seq must be (n, L, {self.arch['seq_dim']}), "
                             f"got {tuple(seq.shape)}")
        h = self.encoder(seq)
        if self.snap_fuse is not None:
            if "snap" not in batch:
                raise ValueError("gat_multi_horizon: the architecture uses snap but the batch has no 'snap'")
            h = F.gelu(self.snap_fuse(torch.cat([h, batch["snap"]], dim=-1)))
        if len(self.graph):
            edge_index = batch.get("edge_index")
            if edge_index is None:
                edge_index = torch.zeros(2, 0, dtype=torch.int64, device=h.device)
            edge_weight = batch.get("edge_weight")
            for gat, norm in zip(self.graph, self.norms, strict=True):
                h = norm(h + self.dropout(F.elu(gat(h, edge_index, edge_weight))))
        return {name: head(h).squeeze(-1) for name, head in self.heads.items()}


def build(arch: dict[str, Any]) -> GATMultiHorizonNet:
    """Build the model from a complete architecture dict (as stored in a checkpoint)."""
    return GATMultiHorizonNet(arch)
