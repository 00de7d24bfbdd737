"""The window family: per-sample models over one ``seq_len``-bar window (batch kind ``"windows"``).

One module for the three variants because they share everything but the network and its heads: the
batcher (``batchers.windows.WindowBatcher``: one window per sample end row), the losses
(``training.losses``: MSE / cross-entropy / focal with square-root inverse-frequency class weights),
the per-batch telemetry (class balance of the direction target), the baselines and metrics
(``training.evaluation``: train-mean MSE, IC / rank IC per timestamp, macro-F1 vs the majority
class) and the signal. A variant is data (:class:`VariantSpec`: inputs, heads, default architecture,
monitor, batch size, model class); a new per-sample model is a variant added here, a model with
another batch shape is a new family module.

Variants:

- ``mlp_two_head``: MLP over the ``snap`` features; regression heads ``early_move`` and
  ``tb_return_atr`` (MSE).
- ``seq_ctx_fusion``: GRU over the ``seq`` window + MLP over ``snap`` + embeddings of the ``ctx_cat``
  codes + a projection of ``ctx_cont``, concatenated and fused by an MLP; heads ``direction``
  (3 logits of ``tb_class``, CE), ``early_move`` and ``quality`` (= ``tb_return_atr``), both MSE.
  Every branch other than the GRU is left out when its group has no columns (context off).
- ``transformer_tbm``: Transformer encoder (``d_model`` 64, learned positional embedding,
  feed-forward width ``hidden_dim``) over the ``seq`` window, read out at the last (most recent) bar;
  head ``direction`` (focal loss with class weights); monitored on validation macro-F1.
  ``dropout`` applies to the residual and feed-forward paths, ``attn_dropout`` to the attention
  weights. Both default to 0.1; dropout costs 43 % of a CPU training step at batch 256 (the
  random masks alone 23 % of CPU time), the attention-weight dropout 24 % of it
  (``bench/bench_step_costs.py``): ``arch={"attn_dropout": 0.0}`` buys a 1.3x faster step.

``model(batch)`` returns ``{head name: tensor}``: regression heads ``(B,)``, classification heads
``(B, 3)`` logits. The signal is P(up) - P(down) for classifiers, else the first head's output.
All layers have deterministic CPU kernels (Linear, GRU, Embedding, TransformerEncoder).

Batch keys the engine asks the batcher for (:meth:`WindowModels.batch_keys`): ``mlp_two_head`` reads
``snap``, ``targets``, ``tb_class``; ``seq_ctx_fusion`` ``seq``, ``snap``, ``ctx_cat``, ``ctx_cont``,
``targets``, ``tb_class``; ``transformer_tbm`` ``seq``, ``tb_class``; validation batches add the
``eval_keys`` (``targets``, ``tb_class``, ``timestamp``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn

# module imports (attributes read at call time): losses and evaluation import families.base, and a
# module that imports them first would find the other half-initialised
from sentinel_pipeline.training import evaluation as _evaluation
from sentinel_pipeline.training import losses as _losses
from sentinel_pipeline.training.batchers.windows import BATCH_KEYS, WindowBatcher
from sentinel_pipeline.training.families.base import (
    INPUT_GROUPS,
    N_CLASSES,
    Batch,
    BatchTelemetry,
    FamilyData,
    HeadSpec,
    ModelFamily,
    VariantSpec,
)

if TYPE_CHECKING:
    from sentinel_pipeline.data.split_arrays import SplitArrays

FAMILY_NAME = "window_models"


def _regression(name: str, target: str) -> HeadSpec:
    return HeadSpec(name, "regression", target, 1, "mse")


def _direction(loss: str) -> HeadSpec:
    return HeadSpec("direction", "classification", "tb_class", N_CLASSES, loss)


def _mlp(in_dim: int, hidden_dim: int, n_layers: int, dropout: float) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(n_layers):
        layers += [nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout)]
        dim = hidden_dim
    return nn.Sequential(*layers), dim


class _Heads(nn.Module):
    """One linear layer per head on a shared representation; regression outputs are squeezed to (B,)."""

    def __init__(self, in_dim: int, heads: list[dict[str, Any]]) -> None:
        super().__init__()
        self.kinds = {h["name"]: h["kind"] for h in heads}
        self.layers = nn.ModuleDict({h["name"]: nn.Linear(in_dim, int(h["n_out"])) for h in heads})

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.layers.items():
            y = layer(z)
            out[name] = y.squeeze(-1) if self.kinds[name] == "regression" else y
        return out


class MLPTwoHead(nn.Module):
    """MLP over the snap features of the sample row, two regression heads."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.trunk, dim = _mlp(arch["snap_dim"], arch["hidden_dim"], arch["n_layers"], arch["dropout"])
        self.heads = _Heads(dim, arch["heads"])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.heads(self.trunk(batch["snap"]))


class SeqCtxFusion(nn.Module):
    """GRU(seq) ‖ MLP(snap) ‖ Embeddings(ctx_cat) ‖ Linear(ctx_cont) → fusion MLP → three heads."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        hidden = arch["hidden_dim"]
        self.gru = nn.GRU(
            arch["seq_dim"],
            hidden,
            num_layers=arch["gru_layers"],
            batch_first=True,
            dropout=arch["dropout"] if arch["gru_layers"] > 1 else 0.0,
        )
        fused = hidden
        self.snap = None
        if arch["snap_dim"] > 0:
            self.snap, snap_out = _mlp(arch["snap_dim"], arch["snap_hidden_dim"], 1, arch["dropout"])
            fused += snap_out
        self.embeddings = nn.ModuleList(
            nn.Embedding(card, arch["embedding_dim"]) for card in arch["ctx_cat_cardinalities"]
        )
        fused += arch["embedding_dim"] * len(self.embeddings)
        self.ctx_cont = None
        if arch["ctx_cont_dim"] > 0:
            self.ctx_cont = nn.Sequential(nn.Linear(arch["ctx_cont_dim"], arch["embedding_dim"]), nn.GELU())
            fused += arch["embedding_dim"]
        self.fusion, dim = _mlp(fused, hidden, arch["fusion_layers"], arch["dropout"])
        self.heads = _Heads(dim, arch["heads"])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        _, h = self.gru(batch["seq"])
        parts = [h[-1]]
        if self.snap is not None:
            parts.append(self.snap(batch["snap"]))
        if len(self.embeddings):
            codes = batch["ctx_cat"]
            parts.extend(emb(codes[:, j]) for j, emb in enumerate(self.embeddings))
        if self.ctx_cont is not None:
            parts.append(self.ctx_cont(batch["ctx_cont"]))
        return self.heads(self.fusion(torch.cat(parts, dim=-1)))


class TransformerTBM(nn.Module):
    """Transformer encoder over the seq window with a learned positional embedding; direction head."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        d_model = arch["d_model"]
        self.input_proj = nn.Linear(arch["seq_dim"], d_model)
        self.pos_embedding = nn.Parameter(torch.zeros(1, arch["seq_len"], d_model))
        nn.init.normal_(self.pos_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model,
            arch["n_heads"],
            dim_feedforward=arch["hidden_dim"],
            dropout=arch["dropout"],
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, arch["n_layers"], enable_nested_tensor=False)
        attn_dropout = float(arch.get("attn_dropout", arch["dropout"]))  # older bundles: one dropout for both
        for block in self.encoder.layers:
            block.self_attn.dropout = attn_dropout
        self.norm = nn.LayerNorm(d_model)
        self.heads = _Heads(d_model, arch["heads"])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seq = batch["seq"]
        x = self.input_proj(seq) + self.pos_embedding[:, -seq.shape[1] :]
        z = self.norm(self.encoder(x)[:, -1])
        return self.heads(z)


# architecture keys added after bundles were written without them; their model reads a default that
# reproduces those bundles (``attn_dropout``: the layer's ``dropout``)
OPTIONAL_ARCH_KEYS = frozenset({"attn_dropout"})

_VARIANTS: dict[str, VariantSpec] = {
    "mlp_two_head": VariantSpec(
        name="mlp_two_head",
        inputs=("snap",),
        heads=(_regression("early_move", "early_move"), _regression("tb_return_atr", "tb_return_atr")),
        default_arch={"hidden_dim": 128, "n_layers": 2, "dropout": 0.1},
        monitor="val_loss",
        monitor_mode="min",
        default_batch_size=16,
        classifier=False,
        build=MLPTwoHead,
        family=FAMILY_NAME,
        batch_kind="windows",
    ),
    "seq_ctx_fusion": VariantSpec(
        name="seq_ctx_fusion",
        inputs=("seq", "snap", "ctx_cat", "ctx_cont"),
        heads=(
            _direction("ce"),
            _regression("early_move", "early_move"),
            _regression("quality", "tb_return_atr"),
        ),
        default_arch={
            "hidden_dim": 64,
            "gru_layers": 1,
            "snap_hidden_dim": 64,
            "embedding_dim": 4,
            "fusion_layers": 1,
            "dropout": 0.1,
        },
        monitor="val_loss",
        monitor_mode="min",
        default_batch_size=128,
        classifier=True,
        build=SeqCtxFusion,
        family=FAMILY_NAME,
        batch_kind="windows",
    ),
    "transformer_tbm": VariantSpec(
        name="transformer_tbm",
        inputs=("seq",),
        heads=(_direction("focal"),),
        default_arch={"d_model": 64, "hidden_dim": 128, "n_heads": 4, "n_layers": 2, "dropout": 0.1,
                      "attn_dropout": 0.1},
        monitor="val_macro_f1",
        monitor_mode="max",
        default_batch_size=128,
        classifier=True,
        build=TransformerTBM,
        family=FAMILY_NAME,
        batch_kind="windows",
    ),
}


class _ClassBalance(BatchTelemetry):
    """Counts of the direction classes (``tb_class``) over an epoch's train batches."""

    def __init__(self) -> None:
        self.counts = np.zeros(N_CLASSES, dtype=np.int64)

    def add(self, batch: Batch) -> None:
        self.counts += np.bincount(batch["tb_class"].numpy(), minlength=N_CLASSES)[:N_CLASSES]

    def summary(self) -> dict[str, Any]:
        return {"class_balance": dict(zip(_evaluation.CLASS_NAMES, map(int, self.counts), strict=True))}


class WindowModels(ModelFamily):
    """The per-sample window family (see the module docstring)."""

    name = FAMILY_NAME
    batch_kind = "windows"
    variants = tuple(_VARIANTS.values())
    eval_keys = ("targets", "tb_class", "timestamp")
    optimizer_defaults = {"optimizer": "adamw", "scheduler": "none"}
    monitor_hints = {"val_macro_f1": "needs a classification head"}

    def resolve_arch(
        self,
        spec: VariantSpec,
        contract_dims: dict[str, int],
        ctx_cat_cardinalities: list[int],
        seq_len: int,
        overrides: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``input_dim`` is the width of the variant's primary group (snap for the MLP, seq otherwise);
        the other group widths, the ``ctx_cat`` cardinalities and ``seq_len`` are recorded too."""
        dims = {g: int(contract_dims.get(g, 0)) for g in INPUT_GROUPS}
        cards = [int(c) for c in ctx_cat_cardinalities]
        if len(cards) != dims["ctx_cat"]:
            raise ValueError(f"{len(cards)} ctx_cat cardinalities given for {dims['ctx_cat']} ctx_cat features")
        if any(c < 2 for c in cards):
            raise ValueError(f"ctx_cat cardinalities must be >= 2, got {cards}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if dims[spec.primary_group] < 1:
            raise ValueError(
                f"variant {spec.name!r} reads {spec.primary_group!r} features but the schema has none"
            )
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(spec.default_arch))
        if unknown:
            raise ValueError(
                f"arch overrides {unknown} are not hyper-parameters of {spec.name!r} "
                f"(allowed: {sorted(spec.default_arch)})"
            )
        hyper = {**spec.default_arch, **overrides}
        for key, default in spec.default_arch.items():  # keep the types of the defaults (JSON/YAML ints)
            hyper[key] = type(default)(hyper[key])
        if "d_model" in hyper and hyper["d_model"] % hyper["n_heads"]:
            raise ValueError(f"d_model {hyper['d_model']} is not divisible by n_heads {hyper['n_heads']}")
        return {
            "variant": spec.name,
            "input_dim": dims[spec.primary_group],
            "seq_dim": dims["seq"],
            "snap_dim": dims["snap"],
            "ctx_cat_dim": dims["ctx_cat"],
            "ctx_cont_dim": dims["ctx_cont"],
            "ctx_cat_cardinalities": cards,
            "seq_len": int(seq_len),
            "inputs": list(spec.inputs),
            "heads": [h.to_dict() for h in spec.heads],
            **hyper,
        }

    def build_model(self, arch: dict[str, Any]) -> nn.Module:
        spec = self.variant(arch["variant"])
        required = {
            "input_dim", "seq_dim", "snap_dim", "ctx_cat_dim", "ctx_cont_dim", "ctx_cat_cardinalities",
            "seq_len", "heads", *spec.default_arch,
        } - OPTIONAL_ARCH_KEYS
        missing = sorted(required - set(arch))
        if missing:
            raise ValueError(f"architecture config of {spec.name!r} lacks {missing}")
        expected_heads = [h.to_dict() for h in spec.heads]
        if list(arch["heads"]) != expected_heads:
            raise ValueError(
                f"architecture config heads {arch['heads']} differ from variant {spec.name!r}: {expected_heads}"
            )
        return spec.build(arch)

    def make_batcher(
        self, split: SplitArrays, *, seq_len: int, batch_size: int, shuffle: bool, seed: int, data: FamilyData,
        keys: tuple[str, ...] | None = None,
    ) -> WindowBatcher:
        return WindowBatcher(split, seq_len=seq_len, batch_size=batch_size, shuffle=shuffle, seed=seed, keys=keys)

    def batch_keys(self, spec: VariantSpec, *, evaluation: bool = False) -> tuple[str, ...]:
        """The model's input groups (``spec.inputs``), ``targets`` for regression heads (``losses``),
        ``tb_class`` (classification heads, :meth:`samples_in` and the class-balance telemetry), and with
        ``evaluation`` the :attr:`eval_keys` (``targets``, ``tb_class``, ``timestamp``)."""
        keys = {*spec.inputs, "tb_class"}
        if any(h.kind == "regression" for h in spec.heads):
            keys.add("targets")
        if evaluation:
            keys.update(self.eval_keys)
        return tuple(k for k in BATCH_KEYS if k in keys)

    def samples_in(self, batch: Batch) -> int:
        return int(batch["tb_class"].shape[0])

    def train_baselines(self, spec: VariantSpec, train_split: SplitArrays, data: FamilyData) -> dict[str, Any]:
        return _evaluation.train_baselines(spec, train_split)

    def loss_state(self, spec: VariantSpec, baselines: Mapping[str, Any], device: torch.device) -> Any:
        """The class weights of the focal heads (``losses.class_weights_from_counts`` of the train class
        counts); ``None`` for variants without one."""
        if not spec.uses_class_weights:
            return None
        counts = baselines.get("class_counts")
        if not isinstance(counts, list) or len(counts) != N_CLASSES:
            raise ValueError(f"no train class counts (baselines.class_counts) for the class weights of {spec.name!r}")
        return _losses.class_weights_from_counts(counts).to(device)

    def losses(
        self, spec: VariantSpec, outputs: dict[str, torch.Tensor], batch: Batch, state: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return _losses.compute_losses(spec, outputs, batch, state)

    def batch_telemetry(self, spec: VariantSpec) -> BatchTelemetry:
        return _ClassBalance()

    def monitor_modes(self, spec: VariantSpec) -> dict[str, str]:
        return {"val_macro_f1": "max"} if any(h.kind == "classification" for h in spec.heads) else {}

    def epoch_metrics(
        self, spec: VariantSpec, outputs: dict[str, np.ndarray], kept: dict[str, np.ndarray]
    ) -> dict[str, Any]:
        """``val_macro_f1`` of the first classification head (``None`` without one)."""
        head = next((h for h in spec.heads if h.kind == "classification"), None)
        if head is None:
            return {"val_macro_f1": None}
        y_pred = outputs[head.name].argmax(axis=1)
        return {"val_macro_f1": float(f1_score(kept["tb_class"], y_pred, labels=list(range(N_CLASSES)),
                                                average="macro", zero_division=0))}

    def epoch_log(self, spec: VariantSpec, record: Mapping[str, Any]) -> str:
        f1 = record.get("val_macro_f1")
        return "" if f1 is None else f" val-macro-F1 {f1:.4f}"

    def evaluate(
        self, spec: VariantSpec, outputs: dict[str, np.ndarray], kept: dict[str, np.ndarray],
        baselines: Mapping[str, Any],
    ) -> dict[str, Any]:
        from sentinel_pipeline.data.split_arrays import TARGET_NAMES

        return _evaluation.evaluate_predictions(spec, outputs, kept["targets"], list(TARGET_NAMES), kept["tb_class"],
                                    kept["timestamp"], dict(baselines))

    def head_vs_baseline(self, spec: VariantSpec, final_val: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Regression heads compare ``mse`` with ``baseline_mse`` (train-mean predictor; lower is better),
        classification heads ``macro_f1`` with ``baseline_macro_f1`` (train majority class; higher is better)."""
        out: dict[str, dict[str, Any]] = {}
        for head in spec.heads:
            m = final_val["heads"][head.name]
            if head.kind == "classification":
                metric, model_v, base_v, higher = "macro_f1", m.get("macro_f1"), m.get("baseline_macro_f1"), True
            else:
                metric, model_v, base_v, higher = "mse", m.get("mse"), m.get("baseline_mse"), False
            beats = None
            if model_v is not None and base_v is not None:
                beats = bool(model_v > base_v) if higher else bool(model_v < base_v)
            out[head.name] = {"metric": metric, "higher_is_better": higher, "model": model_v, "baseline": base_v,
                              "beats_baseline": beats}
        return out

    def signal(self, spec: VariantSpec, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """P(up) - P(down) for classifiers, else the first head's output."""
        if spec.classifier:
            head = next(h for h in spec.heads if h.kind == "classification")
            probs = torch.softmax(outputs[head.name].float(), dim=-1)
            return probs[:, N_CLASSES - 1] - probs[:, 0]
        return outputs[spec.heads[0].name]


FAMILY = WindowModels()
