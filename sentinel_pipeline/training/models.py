"""The model registry: three small variants, each built from a JSON-able architecture config alone.

A variant (:class:`VariantSpec`) names its input groups, its output heads (:class:`HeadSpec`), its
default hyper-parameters and how training monitors it. :func:`resolve_arch` turns a variant, the
feature-schema dims, the ``ctx_cat`` cardinalities of the contract, ``seq_len`` and user overrides into
the complete architecture config (dims are never inferred from data); :func:`build_model` builds the
``nn.Module`` from that config alone, so the config stored in a checkpoint or bundle rebuilds the model.

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

``model(batch)`` returns ``{head name: tensor}``: regression heads ``(B,)``, classification heads
``(B, 3)`` logits. :func:`signal_from_outputs` turns outputs into one trading signal per sample.
All layers have deterministic CPU kernels (Linear, GRU, Embedding, TransformerEncoder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

N_CLASSES = 3  # tb_class: 0 = down, 1 = neutral, 2 = up
INPUT_GROUPS = ("seq", "snap", "ctx_cat", "ctx_cont")


@dataclass(frozen=True)
class HeadSpec:
    name: str
    kind: str  # "regression" | "classification"
    target: str  # a TARGET_NAMES entry (regression) or "tb_class" (classification)
    n_out: int  # 1 for regression, N_CLASSES for classification
    loss: str  # "mse" | "ce" | "focal"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "target": self.target,
            "n_out": self.n_out,
            "loss": self.loss,
        }


@dataclass(frozen=True)
class VariantSpec:
    name: str
    inputs: tuple[str, ...]  # subset of INPUT_GROUPS the model reads
    heads: tuple[HeadSpec, ...]
    default_arch: dict[str, Any]  # tunable hyper-parameters and their defaults
    monitor: str  # "val_loss" | "val_macro_f1"
    monitor_mode: str  # "min" | "max"
    default_batch_size: int
    classifier: bool  # the trading signal comes from a classification head
    build: Callable[[dict[str, Any]], nn.Module]

    @property
    def primary_group(self) -> str:
        """The group whose width is the model's ``input_dim`` (snap for the MLP, seq otherwise)."""
        return "seq" if "seq" in self.inputs else self.inputs[0]

    @property
    def uses_class_weights(self) -> bool:
        """Whether some head's loss uses class weights (the focal heads; see ``losses.compute_losses``)."""
        return any(h.loss == "focal" for h in self.heads)


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
        self.norm = nn.LayerNorm(d_model)
        self.heads = _Heads(d_model, arch["heads"])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seq = batch["seq"]
        x = self.input_proj(seq) + self.pos_embedding[:, -seq.shape[1] :]
        z = self.norm(self.encoder(x)[:, -1])
        return self.heads(z)


VARIANTS: dict[str, VariantSpec] = {
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
    ),
    "transformer_tbm": VariantSpec(
        name="transformer_tbm",
        inputs=("seq",),
        heads=(_direction("focal"),),
        default_arch={"d_model": 64, "hidden_dim": 128, "n_heads": 4, "n_layers": 2, "dropout": 0.1},
        monitor="val_macro_f1",
        monitor_mode="max",
        default_batch_size=128,
        classifier=True,
        build=TransformerTBM,
    ),
}


def get_variant(variant: str | VariantSpec) -> VariantSpec:
    """The :class:`VariantSpec` of a variant name (a spec is returned as is)."""
    if isinstance(variant, VariantSpec):
        return variant
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown model variant {variant!r}; known: {sorted(VARIANTS)}") from None


def resolve_arch(
    variant: str | VariantSpec,
    contract_dims: dict[str, int],
    ctx_cat_cardinalities: list[int],
    seq_len: int,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The complete, JSON-able architecture config of ``variant`` for a feature contract.

    ``contract_dims`` is ``{group: number of features}`` from the feature schema; ``input_dim`` is the
    width of the variant's primary group (snap for the MLP, seq otherwise). ``overrides`` may change
    the variant's hyper-parameters (keys of ``default_arch``) only; dims come from the contract.
    """
    spec = get_variant(variant)
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
            f"arch overrides {unknown} are not hyper-parameters of {spec.name!r} (allowed: {sorted(spec.default_arch)})"
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


def build_model(arch: dict[str, Any]) -> nn.Module:
    """Build the model described by an architecture config from :func:`resolve_arch` (nothing else)."""
    if "variant" not in arch:
        raise ValueError("architecture config has no 'variant'")
    spec = get_variant(arch["variant"])
    required = {
        "input_dim",
        "seq_dim",
        "snap_dim",
        "ctx_cat_dim",
        "ctx_cont_dim",
        "ctx_cat_cardinalities",
        "seq_len",
        "heads",
        *spec.default_arch,
    }
    missing = sorted(required - set(arch))
    if missing:
        raise ValueError(f"architecture config of {spec.name!r} lacks {missing}")
    expected_heads = [h.to_dict() for h in spec.heads]
    if list(arch["heads"]) != expected_heads:
        raise ValueError(
            f"architecture config heads {arch['heads']} differ from variant {spec.name!r}: {expected_heads}"
        )
    return spec.build(arch)


def signal_from_outputs(variant: str | VariantSpec, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One trading signal per sample: P(up) − P(down) for classifiers, else the first head's output."""
    spec = get_variant(variant)
    if spec.classifier:
        head = next(h for h in spec.heads if h.kind == "classification")
        probs = torch.softmax(outputs[head.name].float(), dim=-1)
        return probs[:, N_CLASSES - 1] - probs[:, 0]
    return outputs[spec.heads[0].name]
