"""The cross-sectional graph family: ``gat_multi_horizon`` (batch kind ``"days"``).

Every batch holds whole days (all eligible symbols of ``batch_size`` timestamps, built by
``training.batchers.day_batches.DayBatcher`` with the day's edges from the symbol graph). The model
(``training.layers.GATMultiHorizonNet``): GRU encoder per symbol over its ``seq`` window -> one
block of multi-head graph attention over the day's graph (self-loops, edge weights as a log prior)
-> heads ``ret_1``, ``ret_5``, ``ret_10``, ``ret_20`` scoring the cross-sectionally rank-normalised
forward returns ``fwd_ret_1/5/10/20``.

- Loss (``training.layers.rank_loss``): per day and horizon ``MSE(score, rank-normalised target) +
  lambda * (1 - soft Spearman)`` with lambda = 1 and soft-rank temperature 0.1 (in units of the day's
  score standard deviation), averaged over days, then over the four horizons. Nodes with a NaN target
  are left out. The two constants are fixed for the variant (a different choice is a new variant).
- Signal: the ``ret_5`` head.
- Extra input: ``family_inputs["symbol_graph"]`` = the ``symbol_graph`` stage folder, loaded with
  ``data.symbol_graph.SymbolGraph.load`` (checked against the splits' feature contract); its
  ``graph_hash`` enters the resume fingerprint, and ``graph.json`` + ``edges_static.parquet`` travel in
  the bundle so that scoring rebuilds the same edges.
- Batch size = days per batch (default 1; the ``throughput`` profile uses 4); validation 1 day.
- Optimizer AdaBelief, scheduler cosine annealing with warm restarts (``T_0=3, T_mult=2,
  eta_min=5e-5``), as in the seed, unless the config says otherwise.
- Metrics: per head the MSE on the rank-normalised target beside the constant-0 predictor's,
  the daily rank IC / ICIR (identical against raw or rank-normalised targets) and the daily Pearson IC
  against the raw forward return; ``val_rank_ic`` (the signal head's) every epoch. The head's
  baseline is a rank IC of 0 (a constant or random ranking). The full ranking evaluation (HAC t,
  IC decay, long-short) belongs to the evaluation stage.

Imports of the graph and the batcher are lazy: this module loads without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

# module import (attributes read at call time), as the family protocol asks
from sentinel_pipeline.training import evaluation as _evaluation
from sentinel_pipeline.training.families.base import (
    Batch,
    FamilyData,
    HeadSpec,
    ModelFamily,
    VariantSpec,
)
from sentinel_pipeline.training.layers import gat_multi_horizon_net as _net
from sentinel_pipeline.training.layers import rank_loss as _rank_loss
from sentinel_pipeline.training.layers.soft_rank import rank_normalise

if TYPE_CHECKING:
    from sentinel_pipeline.data.split_arrays import SplitArrays

FAMILY_NAME = "graph_attention"
VARIANT_NAME = "gat_multi_horizon"
HORIZONS: tuple[int, ...] = (1, 5, 10, 20)
SIGNAL_HEAD = "ret_5"
RANK_LAMBDA = 1.0
RANK_TAU = 0.1
GRAPH_INPUT = "symbol_graph"
GRAPH_FILES: tuple[str, ...] = ("graph.json", "edges_static.parquet")
BATCH_KEYS: tuple[str, ...] = ("seq", "snap")
# hyper-parameters a config may override: the net's, less the horizons (fixed by the variant's heads)
_DEFAULT_ARCH = {k: v for k, v in _net.DEFAULT_ARCH.items() if k != "horizons"}

_SPEC = VariantSpec(
    name=VARIANT_NAME,
    inputs=("seq", "snap"),
    heads=tuple(HeadSpec(f"ret_{h}", "regression", f"fwd_ret_{h}", 1, "mse_rank") for h in HORIZONS),
    default_arch=_DEFAULT_ARCH,
    monitor="val_loss",
    monitor_mode="min",
    default_batch_size=1,
    classifier=False,
    build=_net.GATMultiHorizonNet,
    family=FAMILY_NAME,
    batch_kind="days",
)


def _day_ptr(timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, day_ptr)``: a stable order grouping samples by timestamp, and the CSR offsets of the days."""
    ts = np.asarray(timestamps, dtype=np.int64)
    order = np.argsort(ts, kind="stable")
    _, counts = np.unique(ts[order], return_counts=True)
    return order, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def rank_normalised_targets(targets: np.ndarray, timestamps: np.ndarray, column: int) -> np.ndarray:
    """Column ``column`` of ``targets`` rank-normalised to [-1, 1] within each timestamp (NaN kept)."""
    order, ptr = _day_ptr(timestamps)
    values = torch.as_tensor(np.asarray(targets, dtype=np.float32)[order, column])
    out = np.empty(len(order), dtype=np.float32)
    out[order] = rank_normalise(values, torch.as_tensor(ptr)).numpy()
    return out


class GraphAttentionFamily(ModelFamily):
    """See the module docstring."""

    name = FAMILY_NAME
    batch_kind = "days"
    variants = (_SPEC,)
    required_inputs = (GRAPH_INPUT,)
    bundle_file_names = GRAPH_FILES
    eval_keys = ("targets", "timestamp", "symbol_idx")
    optimizer_defaults = {
        "optimizer": "adabelief",
        "scheduler": "cosine_restarts",
        "scheduler_params": {"cosine_restarts": {"T_0": 3, "T_mult": 2, "eta_min": 5e-5}},
    }
    throughput_batch_size = 4
    min_eval_batch_size = 1
    score_batch_size = 8  # days per scoring batch (a day of 505 symbols x 30 bars is ~2 MiB of windows)
    # the blocking gate: HAC t of the 5-day head's daily rank IC against the 5-day forward return; no
    # MSE-vs-train-mean gate (the heads score rank-normalised targets, not returns)
    gate_defaults = {"head": SIGNAL_HEAD, "horizon": 5, "min_mse_t": None}

    # -- architecture and model ----------------------------------------------------------------
    def resolve_arch(
        self,
        spec: VariantSpec,
        contract_dims: dict[str, int],
        ctx_cat_cardinalities: list[int],
        seq_len: int,
        overrides: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The net's complete arch (``layers.gat_multi_horizon_net.resolve_arch``) plus ``variant``,
        ``input_dim`` (= the seq width), ``inputs`` and ``heads``. Overrides: keys of ``default_arch``."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(spec.default_arch))
        if unknown:
            raise ValueError(f"arch overrides {unknown} are not hyper-parameters of {spec.name!r} "
                             f"(allowed: {sorted(spec.default_arch)})")
        for key, default in spec.default_arch.items():  # keep the defaults' types (YAML/JSON ints, bools)
            if key in overrides and not isinstance(default, str):
                overrides[key] = type(default)(overrides[key])
        seq_dim = int(contract_dims.get("seq", 0))
        if seq_dim < 1:
            raise ValueError(f"variant {spec.name!r} reads 'seq' features but the schema has none")
        arch = _net.resolve_arch(seq_dim, int(seq_len), int(contract_dims.get("snap", 0)),
                                 {**overrides, "horizons": list(HORIZONS)})
        return {"variant": spec.name, "input_dim": seq_dim, "inputs": list(spec.inputs),
                "heads": [h.to_dict() for h in spec.heads], **arch}

    def build_model(self, arch: dict[str, Any]) -> nn.Module:
        spec = self.variant(arch["variant"])
        expected_heads = [h.to_dict() for h in spec.heads]
        if list(arch.get("heads", [])) != expected_heads:
            raise ValueError(f"architecture config heads {arch.get('heads')} differ from variant {spec.name!r}: "
                             f"{expected_heads}")
        return spec.build(arch)

    # -- data -------------------------------------------------------------------------------------
    def prepare(self, config: Any, inputs: Any) -> FamilyData:
        """Check the graph folder is given, load it (its contract must be the splits'), record its hash."""
        data = super().prepare(config, inputs)
        from sentinel_pipeline.data.symbol_graph import SymbolGraph  # lazy import

        train = getattr(inputs, "train", None)
        expected = getattr(train, "feature_contract_hash", None)
        graph = SymbolGraph.load(data.paths[GRAPH_INPUT], expected_contract_hash=expected)
        data.values[GRAPH_INPUT] = graph
        data.digests[GRAPH_INPUT] = str(graph.graph_hash)
        return data

    def make_batcher(
        self, split: SplitArrays, *, seq_len: int, batch_size: int, shuffle: bool, seed: int, data: FamilyData,
        keys: tuple[str, ...] | None = None,
    ) -> Any:
        """``DayBatcher`` with ``batch_size`` whole days per batch and the day's edges from the graph
        (feature keys: ``keys``, default the family's ``BATCH_KEYS``)."""
        from sentinel_pipeline.training.batchers.day_batches import DayBatcher  # lazy import

        return DayBatcher(split, seq_len=seq_len, days_per_batch=max(1, int(batch_size)), shuffle=shuffle,
                          seed=seed, graph=data.values.get(GRAPH_INPUT), keys=BATCH_KEYS if keys is None else keys)

    def samples_in(self, batch: Batch) -> int:
        return int(batch["end_rows"].shape[0])

    def bundle_files(self, data: FamilyData) -> dict[str, Path]:
        folder = data.paths.get(GRAPH_INPUT)
        if folder is None:
            return {}
        files = {name: Path(folder) / name for name in GRAPH_FILES}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"symbol graph files missing for the bundle: {missing}")
        return files

    def load_bundle_data(self, bundle_dir: Path) -> FamilyData:
        """The graph rebuilt from the bundle's ``graph.json`` and ``edges_static.parquet``."""
        from sentinel_pipeline.data.symbol_graph import SymbolGraph  # lazy import

        graph = SymbolGraph.load(bundle_dir)
        return FamilyData(values={GRAPH_INPUT: graph}, paths={GRAPH_INPUT: Path(bundle_dir)},
                          digests={GRAPH_INPUT: str(graph.graph_hash)})

    # -- losses and metrics --------------------------------------------------------------------------
    def train_baselines(self, spec: VariantSpec, train_split: SplitArrays, data: FamilyData) -> dict[str, Any]:
        """Counts of the train samples and days, and the share of samples with each target."""
        ends = np.asarray(train_split.sample_end_rows, dtype=np.int64)
        ts = np.asarray(train_split.timestamp)[ends]
        finite = {h.target: float(np.isfinite(np.asarray(train_split.target(h.target))[ends]).mean())
                  if ends.size else None for h in spec.heads}
        return {"n_samples": int(ends.size), "n_days": int(np.unique(ts).size), "target_finite_share": finite,
                "rank_lambda": RANK_LAMBDA, "rank_tau": RANK_TAU}

    def losses(
        self, spec: VariantSpec, outputs: dict[str, torch.Tensor], batch: Batch, state: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return _rank_loss.multi_horizon_rank_loss(outputs, batch, HORIZONS, lam=RANK_LAMBDA, tau=RANK_TAU)

    def _rank_ic(self, pred: np.ndarray, kept: dict[str, np.ndarray], target: str) -> float | None:
        from sentinel_pipeline.data.split_arrays import TARGET_NAMES

        column = np.asarray(kept["targets"])[:, list(TARGET_NAMES).index(target)]
        values = _evaluation.per_timestamp_correlations(pred, column, kept["timestamp"], rank=True)
        return float(values.mean()) if values.size else None

    def monitor_modes(self, spec: VariantSpec) -> dict[str, str]:
        return {"val_rank_ic": "max", **{f"val_rank_ic_{h.name}": "max" for h in spec.heads}}

    def epoch_metrics(
        self, spec: VariantSpec, outputs: dict[str, np.ndarray], kept: dict[str, np.ndarray]
    ) -> dict[str, Any]:
        """``val_rank_ic`` (mean daily rank IC of the signal head) and ``val_rank_ic_<head>`` per head."""
        per_head = {f"val_rank_ic_{h.name}": self._rank_ic(outputs[h.name], kept, h.target) for h in spec.heads}
        return {"val_rank_ic": per_head[f"val_rank_ic_{SIGNAL_HEAD}"], **per_head}

    def evaluate(
        self, spec: VariantSpec, outputs: dict[str, np.ndarray], kept: dict[str, np.ndarray],
        baselines: Mapping[str, Any],
    ) -> dict[str, Any]:
        from sentinel_pipeline.data.split_arrays import TARGET_NAMES

        targets, ts = np.asarray(kept["targets"]), np.asarray(kept["timestamp"])
        heads: dict[str, dict[str, Any]] = {}
        for head in spec.heads:
            col = list(TARGET_NAMES).index(head.target)
            pred = np.asarray(outputs[head.name], dtype=np.float64)
            r = rank_normalised_targets(targets, ts, col)
            m = _evaluation.regression_metrics(pred, r, ts, 0.0)  # mse on the model's scale; baseline: 0
            ic_raw = _evaluation.per_timestamp_correlations(pred, targets[:, col], ts)
            m["ic"] = float(ic_raw.mean()) if ic_raw.size else None
            m["icir"] = (float(ic_raw.mean() / ic_raw.std(ddof=1))
                         if ic_raw.size > 1 and ic_raw.std(ddof=1) > 0 else None)
            m["target"] = "rank-normalised " + head.target
            heads[head.name] = m
        return {"n_samples": int(targets.shape[0]), "heads": heads, "signal_head": SIGNAL_HEAD,
                "rank_ic": heads[SIGNAL_HEAD]["rank_ic"]}

    def head_vs_baseline(self, spec: VariantSpec, final_val: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Per head the daily rank IC against 0 (a constant or random ranking); higher is better."""
        out: dict[str, dict[str, Any]] = {}
        for head in spec.heads:
            value = final_val["heads"][head.name].get("rank_ic")
            out[head.name] = {"metric": "rank_ic", "higher_is_better": True, "model": value, "baseline": 0.0,
                              "beats_baseline": None if value is None else bool(value > 0.0)}
        return out

    def signal(self, spec: VariantSpec, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``ret_5`` score (higher = expected to rank higher on 5-bar forward return)."""
        return outputs[SIGNAL_HEAD]

    def onnx_inputs(self, spec: VariantSpec, arch: Mapping[str, Any]) -> dict[str, dict[int, str]]:
        """``seq`` (and ``snap`` when the architecture fuses it) per node, then the day's edges: the node
        count and the edge count are the dynamic axes."""
        nodes = {"seq": {0: "nodes"}}
        if arch.get("use_snap") and int(arch.get("snap_dim", 0)) > 0:
            nodes["snap"] = {0: "nodes"}
        return {**nodes, "edge_index": {1: "edges"}, "edge_weight": {0: "edges"}}

    def onnx_example(
        self, spec: VariantSpec, arch: Mapping[str, Any], dims: Mapping[str, int], n: int = 3
    ) -> Batch:
        """``n`` nodes with zero features and a two-edge graph (0 <-> 1)."""
        n = max(int(n), 3)
        batch: Batch = {"seq": torch.zeros(n, int(arch["seq_len"]), int(arch["seq_dim"]))}
        if "snap" in self.onnx_inputs(spec, arch):
            batch["snap"] = torch.zeros(n, int(arch["snap_dim"]))
        batch["edge_index"] = torch.tensor([[0, 1], [1, 0]], dtype=torch.int64)
        batch["edge_weight"] = torch.ones(2, dtype=torch.float32)
        return batch


FAMILY = GraphAttentionFamily()
