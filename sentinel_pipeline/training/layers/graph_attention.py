"""Masked multi-head graph attention (GATv1, Velickovic et al. 2018) in plain torch.

Same computation as ``torch_geometric.nn.GATConv`` (``add_self_loops=True``; tested against it with
identical weights), written here so that the model needs no compiled extension, runs with
deterministic CPU kernels and stays exportable:

    h = x W                                              (n, H, C)   one projection, no bias
    e_ji = LeakyReLU(a_src . h_j + a_dst . h_i) [+ edge term]       for every edge j -> i
    alpha_ji = softmax over the incoming edges of target i, its self-loop included
    out_i = concat_h or mean_h ( sum_j alpha_ji h_j ) + bias

Message passing: ``edge_index[0]`` holds sources, ``edge_index[1]`` targets; a target attends to its
sources. Every node gets a self-loop here; self-loops already present in ``edge_index`` are masked out
(their logit set to -inf, so they carry no weight) rather than removed, which keeps every shape static.

Edge weights (``edge_weight``, shape (E,), > 0) enter according to ``edge_weight_mode``:

- ``"log"`` (default): ``alpha_ji ~ w_ji^beta_h * exp(e_ji)``, i.e. ``beta_h * log(w_ji)`` is added to the
  logit after the LeakyReLU, with one learned ``beta_h`` per head (starts at 1). The self-loop weighs
  the mean weight of the target's incoming edges (1 for a node without any). With ``beta = 1`` the
  prior edge strength (a correlation or a sector link) multiplies the content score: a neighbour twice
  as strongly linked gets twice the attention at equal content; ``beta -> 0`` lets the model ignore
  the prior, ``beta > 1`` sharpen it. Rescaling all weights by a constant changes nothing (it cancels
  in each target's softmax, self-loop included), which suits weights whose scale depends on the graph
  builder's settings, and it costs H parameters. Chosen as the default for those reasons.
- ``"linear"``: ``torch_geometric``'s ``edge_dim=1`` path: ``e_ji += a_edge . (w_ji W_edge)``, self-loop
  weight = the mean weight of the target's incoming edges (0 for a node without any), i.e. a learned
  per-head term ``c_h * w`` added to the logit: the attention then varies like ``exp(c_h w)``, which is
  not invariant to the weights' scale. Kept because it is the reference layer's behaviour (tested).
- ``"none"``: weights are ignored (plain GATv1).

Implementation: the edge-list form (:meth:`GraphAttention.forward`) works on the E + n edges only:
a segment softmax over targets with the per-target maximum subtracted first (``scatter_reduce`` amax,
detached: it cancels mathematically and only guards ``exp`` against overflow, as in torch_geometric),
sums by ``scatter_add``, then messages gathered from sources (``index_select``) and summed into targets
by ``scatter_add``. Memory and time are O(E H C). :meth:`GraphAttention.forward_dense` computes the same
thing with an (n x n) mask and (H, n, n) logits: O(n^2 H) memory; it exists for the benchmark
(``bench/bench_graph_attention.py``) and as a test oracle. Only out-of-place ``scatter_add`` /
``scatter_reduce`` / ``index_select`` / ``where`` are used (no boolean-mask indexing, no data-dependent
shapes), all with deterministic CPU kernels (``torch.use_deterministic_algorithms(True)`` runs them,
tested). Export, tested: ``torch.export`` traces the layer, and ``torch.onnx.export`` (opset 18,
dynamic node and edge counts) gives a model whose onnxruntime outputs equal torch's on graphs of other
sizes, with duplicate targets and given self-loops. The sums use ``scatter_add`` (ONNX ScatterElements
with reduction "add") rather than ``index_add``, which torch.onnx exports without the reduction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EDGE_WEIGHT_MODES = ("log", "linear", "none")


def _check_graph(x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None) -> None:
    """Validate shapes and ranges (skipped while tracing/exporting: the checks read tensor values)."""
    if x.dim() != 2:
        raise ValueError(f"graph attention: node features must be (n, d), got shape {tuple(x.shape)}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"graph attention: edge_index must be (2, E), got shape {tuple(edge_index.shape)}")
    if edge_index.dtype != torch.int64:
        raise ValueError(f"graph attention: edge_index must be int64, got {edge_index.dtype}")
    n = x.shape[0]
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= n):
        raise ValueError(
            f"graph attention: edge_index holds node ids outside [0, {n}) "
            f"(min {int(edge_index.min())}, max {int(edge_index.max())})"
        )
    if edge_weight is not None:
        if edge_weight.shape != (edge_index.shape[1],):
            raise ValueError(
                f"graph attention: edge_weight must be ({edge_index.shape[1]},), got {tuple(edge_weight.shape)}"
            )
        if edge_weight.numel() and not bool(torch.isfinite(edge_weight).all() and (edge_weight > 0).all()):
            raise ValueError("graph attention: edge_weight must be finite and > 0")


def dense_adjacency(
    edge_index: torch.Tensor, n: int, edge_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n, n) mask ``adj[i, j]`` = edge j -> i or i == j, and the matching weight matrix (the diagonal =
    the mean incoming weight, 1 without incoming edges, as in ``"log"`` mode).

    For :meth:`GraphAttention.forward_dense` in ``"log"`` / ``"none"`` mode. Duplicate edges collapse
    into one entry (the edge-list form would count them twice; the batches hold no duplicates).
    """
    adj = torch.zeros(n, n, dtype=torch.bool, device=edge_index.device)
    adj[edge_index[1], edge_index[0]] = True
    adj.fill_diagonal_(True)
    if edge_weight is None:
        return adj, None
    w = torch.ones(n, n, dtype=edge_weight.dtype, device=edge_weight.device)
    w[edge_index[1], edge_index[0]] = edge_weight
    w.diagonal().copy_(_mean_incoming(edge_index, edge_weight, n, empty=1.0))
    return adj, w


def _segment_sum(src: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """``out[index[e]] += src[e]`` along dim 0 into ``n`` rows, by ``scatter_add`` (ONNX ScatterElements with
    reduction "add"; ``index_add`` is exported by torch.onnx without the reduction and gets duplicate
    indices wrong, checked with onnxruntime)."""
    idx = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
    return torch.zeros((n, *src.shape[1:]), dtype=src.dtype, device=src.device).scatter_add(0, idx, src)


def _mean_incoming(edge_index: torch.Tensor, edge_weight: torch.Tensor, n: int, empty: float) -> torch.Tensor:
    """Mean weight of each node's incoming edges (given self-loops excluded); ``empty`` without any."""
    real = (edge_index[0] != edge_index[1]).to(edge_weight.dtype)
    s = _segment_sum(edge_weight * real, edge_index[1], n)
    c = _segment_sum(real, edge_index[1], n)
    return torch.where(c > 0, s / c.clamp_min(1.0), torch.full_like(s, empty))


class GraphAttention(nn.Module):
    """Multi-head GATv1 layer; parameters named and shaped as in ``torch_geometric``'s ``GATConv``.

    ``lin`` (Linear d -> H*C, no bias), ``att_src`` / ``att_dst`` (1, H, C), ``bias`` (H*C if ``concat``
    else C), in ``"linear"`` edge mode ``lin_edge`` (Linear 1 -> H*C, no bias) and ``att_edge``
    (1, H, C), in ``"log"`` mode ``edge_beta`` (H,). Glorot initialisation, bias zero.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        heads: int = 1,
        *,
        concat: bool = True,
        negative_slope: float = 0.2,
        dropout: float = 0.0,
        bias: bool = True,
        edge_weight_mode: str = "log",
    ) -> None:
        super().__init__()
        if edge_weight_mode not in EDGE_WEIGHT_MODES:
            raise ValueError(f"graph attention: edge_weight_mode must be one of {EDGE_WEIGHT_MODES}, "
                             f"got {edge_weight_mode!r}")
        self.in_dim, self.out_dim, self.heads = in_dim, out_dim, heads
        self.concat, self.negative_slope, self.dropout = concat, negative_slope, dropout
        self.edge_weight_mode = edge_weight_mode
        self.lin = nn.Linear(in_dim, heads * out_dim, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_dim))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_dim))
        if edge_weight_mode == "linear":
            self.lin_edge = nn.Linear(1, heads * out_dim, bias=False)
            self.att_edge = nn.Parameter(torch.empty(1, heads, out_dim))
        else:
            self.lin_edge = None
            self.register_parameter("att_edge", None)
        if edge_weight_mode == "log":
            self.edge_beta = nn.Parameter(torch.ones(heads))
        else:
            self.register_parameter("edge_beta", None)
        total = heads * out_dim if concat else out_dim
        self.bias = nn.Parameter(torch.zeros(total)) if bias else None
        self.reset_parameters()

    @property
    def total_out_dim(self) -> int:
        return self.heads * self.out_dim if self.concat else self.out_dim

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.lin.weight)
        for p in (self.att_src, self.att_dst, self.att_edge):
            if p is not None:  # torch_geometric's glorot on (1, H, C): bound sqrt(6 / (H + C))
                bound = math.sqrt(6.0 / (p.size(-2) + p.size(-1)))
                nn.init.uniform_(p, -bound, bound)
        if self.lin_edge is not None:
            nn.init.xavier_uniform_(self.lin_edge.weight)
        if self.edge_beta is not None:
            nn.init.ones_(self.edge_beta)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    # -- shared pieces -----------------------------------------------------------------------------
    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.lin(x).view(-1, self.heads, self.out_dim)  # (n, H, C)
        return h, (h * self.att_src).sum(-1), (h * self.att_dst).sum(-1)  # (n, H) each

    def _edge_term(self, w: torch.Tensor) -> torch.Tensor:
        """Logit term of edge weights ``w`` (any shape S) -> (*S, H)."""
        if self.edge_weight_mode == "log":
            return torch.log(w).unsqueeze(-1) * self.edge_beta
        assert self.lin_edge is not None and self.att_edge is not None
        e = self.lin_edge(w.unsqueeze(-1)).view(*w.shape, self.heads, self.out_dim)
        return (e * self.att_edge).sum(-1)

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        out = out.reshape(out.shape[0], self.heads * self.out_dim) if self.concat else out.mean(dim=1)
        return out + self.bias if self.bias is not None else out

    # -- edge-list form ----------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` (n, d), ``edge_index`` (2, E) int64 [source; target], ``edge_weight`` (E,) -> (n, out)."""
        h, src, dst, alpha = self.attention(x, edge_index, edge_weight)
        msg = h.index_select(0, src) * alpha.unsqueeze(-1)  # (E + n, H, C)
        return self._finish(_segment_sum(msg, dst, x.shape[0]))

    def attention(
        self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(h, src, dst, alpha)``: projected nodes (n, H, C), the E + n edges (given ones, then one
        self-loop per node) and their attention (E + n, H) after dropout (given self-loops get 0)."""
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            _check_graph(x, edge_index, edge_weight)
        n = x.shape[0]
        h, a_src, a_dst = self._project(x)
        loops = torch.arange(n, device=x.device)
        src = torch.cat([edge_index[0], loops])
        dst = torch.cat([edge_index[1], loops])
        logits = a_src.index_select(0, src) + a_dst.index_select(0, dst)  # (E + n, H)
        mode = self.edge_weight_mode if edge_weight is not None else "none"
        if mode == "linear":  # torch_geometric's edge_dim path, fill_value="mean" (0 without incoming)
            assert edge_weight is not None
            loop_w = _mean_incoming(edge_index, edge_weight, n, empty=0.0)
            logits = logits + self._edge_term(torch.cat([edge_weight, loop_w]))
        logits = F.leaky_relu(logits, self.negative_slope)
        if mode == "log":  # a prior on the softmax: alpha ~ w^beta exp(e)
            assert edge_weight is not None
            loop_w = _mean_incoming(edge_index, edge_weight, n, empty=1.0)
            logits = logits + self._edge_term(torch.cat([edge_weight, loop_w]))
        # self-loops given in edge_index are masked out: the appended loop is the only one that counts
        given_loop = torch.cat([edge_index[0] == edge_index[1], torch.zeros_like(loops, dtype=torch.bool)])
        logits = torch.where(given_loop.unsqueeze(-1), torch.full_like(logits, -math.inf), logits)
        # segment softmax over each target's incoming edges
        idx = dst.unsqueeze(-1).expand_as(logits)
        seg_max = torch.full((n, self.heads), -math.inf, dtype=logits.dtype, device=x.device).scatter_reduce(
            0, idx, logits.detach(), reduce="amax", include_self=True)
        ex = torch.exp(logits - seg_max.index_select(0, dst))
        denom = _segment_sum(ex, dst, n)
        alpha = ex / denom.index_select(0, dst)  # denom >= 1: the target's own max term is exp(0)
        alpha = F.dropout(alpha, p=self.dropout, training=self.training)
        return h, src, dst, alpha

    # -- dense masked form (benchmark / oracle) ----------------------------------------------------
    def forward_dense(
        self, x: torch.Tensor, adj: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Same layer on an (n, n) bool mask ``adj[i, j]`` (edge j -> i; the diagonal must be set) and an
        optional (n, n) weight matrix (``"log"`` / ``"none"`` modes). O(n^2) memory: not for training."""
        if self.edge_weight_mode == "linear" and weight is not None:
            raise ValueError("graph attention: forward_dense supports edge_weight_mode 'log' and 'none' only")
        h, a_src, a_dst = self._project(x)
        logits = a_dst.t().unsqueeze(-1) + a_src.t().unsqueeze(-2)  # (H, n_target, n_source)
        logits = F.leaky_relu(logits, self.negative_slope)
        if weight is not None and self.edge_weight_mode == "log":
            logits = logits + torch.log(weight).unsqueeze(0) * self.edge_beta.view(-1, 1, 1)
        logits = logits.masked_fill(~adj.unsqueeze(0), -math.inf)
        alpha = torch.softmax(logits, dim=-1)
        alpha = F.dropout(alpha, p=self.dropout, training=self.training)
        out = torch.bmm(alpha, h.transpose(0, 1))  # (H, n, C)
        return self._finish(out.transpose(0, 1))
