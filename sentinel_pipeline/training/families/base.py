"""The model-family protocol: what a family declares so that the training loop needs to know nothing of it.

A **family** is one module under ``training/families/`` holding one :class:`ModelFamily` subclass
instance (``FAMILY``) and listed once in ``families/__init__.py``. It declares:

- its **batch kind** (:data:`BATCH_KINDS`: ``"windows"`` = one sequence window per sample,
  ``"days"`` = every eligible symbol of whole timestamps, later ``"text_events"``) and the batcher
  that gathers it (:meth:`ModelFamily.make_batcher`);
- its **variants** (:class:`VariantSpec`, each naming its family and batch kind), their heads
  (:class:`HeadSpec`: name, target, loss) and a JSON-able architecture config
  (:meth:`ModelFamily.resolve_arch`) from which :meth:`ModelFamily.build_model` builds the model;
- its **losses** (:meth:`ModelFamily.losses`, with a loss state built once from the train baselines:
  :meth:`ModelFamily.loss_state`), its per-batch **telemetry** (:meth:`ModelFamily.batch_telemetry`),
  its **baselines and metrics** (:meth:`ModelFamily.train_baselines`, :meth:`ModelFamily.epoch_metrics`,
  :meth:`ModelFamily.evaluate`, :meth:`ModelFamily.head_vs_baseline`), and how outputs become one
  trading **signal** per sample (:meth:`ModelFamily.signal`);
- optional **extra inputs** (:meth:`ModelFamily.prepare`: e.g. a symbol-graph folder named in
  ``TrainConfig.family_inputs``) and **extra bundle files** (:meth:`ModelFamily.bundle_files`, read
  back at inference by :meth:`ModelFamily.load_bundle_data`);
- the **optimizer and scheduler** defaults it prefers (:attr:`ModelFamily.optimizer_defaults`);
- the inputs of its **ONNX export** (:meth:`ModelFamily.onnx_inputs`, with dynamic axes, and an
  example batch to trace with, :meth:`ModelFamily.onnx_example`; default: the variant's input groups).

The engine (``training/engine.py``) owns what every family shares: the loop, gradient clipping,
NaN stop, early stopping, step statistics, resume checkpoints, metrics.json, bundle writing.

Batches are ``dict[str, torch.Tensor]``; a batcher (:class:`Batcher`) has ``len()`` (batches per
epoch), ``batch(i)``, ``set_epoch(e)`` (the order of a shuffled epoch depends only on (seed, epoch),
which is what makes kill-and-resume bit-identical) and ``n_samples``. A batcher made without a key
selection (scoring, verification) gives every key it knows, among them ``end_rows`` (``(n,)`` int64:
the split row of each sample; scoring and backtests read it) and the :attr:`ModelFamily.eval_keys`, all
with the samples along the first dimension. The engine asks for only the keys a variant reads
(:meth:`ModelFamily.batch_keys`: train batches, and validation batches with the ``eval_keys``).

An architecture config must hold ``variant``, ``seq_len``, ``heads`` (``[HeadSpec.to_dict()]``),
``input_dim`` and ``hidden_dim`` (``model_best.pt`` records the last two).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # only for annotations: the families never import the engine or the config at run time
    from sentinel_pipeline.data.split_arrays import SplitArrays

# the batch kinds the project knows; a family may declare another (a lower-case identifier), e.g. in tests
BATCH_KINDS: tuple[str, ...] = ("windows", "days", "text_events")
N_CLASSES = 3  # tb_class: 0 = down, 1 = neutral, 2 = up
INPUT_GROUPS = ("seq", "snap", "ctx_cat", "ctx_cont")

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HeadSpec:
    name: str
    kind: str  # "regression" | "classification"
    target: str  # a TARGET_NAMES entry (regression) or "tb_class" (classification)
    n_out: int  # 1 for regression, N_CLASSES for classification
    loss: str  # the family's name of the loss ("mse" | "ce" | "focal" | ...)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "target": self.target, "n_out": self.n_out, "loss": self.loss}


@dataclass(frozen=True)
class VariantSpec:
    name: str
    inputs: tuple[str, ...]  # subset of INPUT_GROUPS the model reads
    heads: tuple[HeadSpec, ...]
    default_arch: dict[str, Any]  # tunable hyper-parameters and their defaults
    monitor: str  # "val_loss" or one of the family's epoch metrics (ModelFamily.monitor_modes)
    monitor_mode: str  # "min" | "max"
    default_batch_size: int
    classifier: bool  # the trading signal comes from a classification head
    build: Callable[[dict[str, Any]], nn.Module]
    family: str = "window_models"  # the ModelFamily.name this variant belongs to
    batch_kind: str = "windows"  # its family's batch kind

    @property
    def primary_group(self) -> str:
        """The group whose width is the model's ``input_dim`` (snap for the MLP, seq otherwise)."""
        return "seq" if "seq" in self.inputs else self.inputs[0]

    @property
    def uses_class_weights(self) -> bool:
        """Whether some head's loss uses class weights (the focal heads; see ``losses.compute_losses``)."""
        return any(h.loss == "focal" for h in self.heads)


@runtime_checkable
class Batcher(Protocol):
    """What the engine needs of a batcher (``WindowBatcher``, ``DayBatcher``, ...)."""

    n_samples: int

    def __len__(self) -> int: ...

    def batch(self, i: int) -> Batch: ...

    def set_epoch(self, epoch: int) -> None: ...


@dataclass
class FamilyData:
    """Extra inputs a family loaded for one run (:meth:`ModelFamily.prepare`) or from a bundle
    (:meth:`ModelFamily.load_bundle_data`); handed to :meth:`ModelFamily.make_batcher` and
    :meth:`ModelFamily.bundle_files`.

    ``values``: loaded objects by input name (e.g. ``{"symbol_graph": SymbolGraph}``); ``paths``: where
    they came from; ``digests``: a content identity per input (e.g. the graph hash), which enters the
    resume fingerprint and ``bundle_metadata.json``.
    """

    values: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)


class BatchTelemetry:
    """Per-epoch statistics a family gathers over the train batches (default: none).

    :meth:`add` sees every CPU batch before it moves to the device; :meth:`summary` is merged into the
    epoch's history record (JSON-able values)."""

    def add(self, batch: Batch) -> None:  # noqa: B027 - a no-op default, overridden by families that count
        pass

    def summary(self) -> dict[str, Any]:
        return {}


class ModelFamily:
    """Base class of a model family; a family module subclasses it and sets ``FAMILY = MyFamily()``.

    Class attributes to set: :attr:`name`, :attr:`batch_kind`, :attr:`variants`; optionally
    :attr:`required_inputs`, :attr:`bundle_file_names`, :attr:`eval_keys`, :attr:`optimizer_defaults`.
    Methods without a default raise ``NotImplementedError``.
    """

    name: str = ""
    batch_kind: str = "windows"
    variants: tuple[VariantSpec, ...] = ()
    # keys of TrainConfig.family_inputs the family needs (e.g. ("symbol_graph",)); prepare() refuses a
    # run without them
    required_inputs: tuple[str, ...] = ()
    # file names bundle_files() may add to a bundle (covered by the manifest and the entry rule)
    bundle_file_names: tuple[str, ...] = ()
    # batch keys kept (as NumPy, in sample order) over a validation pass for epoch_metrics / evaluate
    eval_keys: tuple[str, ...] = ()
    # what a run of this family uses when TrainConfig leaves optimizer / scheduler at None, and the
    # scheduler parameters under the config's: {"optimizer": "adamw", "optimizer_params": {...},
    # "scheduler": "none", "scheduler_params": {"cosine_restarts": {...}, "plateau": {...}}}
    optimizer_defaults: Mapping[str, Any] = {"optimizer": "adamw", "scheduler": "none"}
    # why a monitor is not available for a variant, e.g. {"val_macro_f1": "needs a classification head"}
    monitor_hints: Mapping[str, str] = {}
    # batch sizes in the family's unit (see make_batcher): the ``throughput`` profile's train batch
    # size, and the floor of the validation batch size (validation runs without gradients)
    throughput_batch_size: int = 1024
    min_eval_batch_size: int = 256
    # batch size of scoring a split for the gates and backtests (evaluation.predictions.score_split)
    score_batch_size: int = 1024
    # field overrides of verification's QualityGates for this family's variants (e.g. a ranking family
    # gates its 5-day head on the 5-day forward return and has no MSE-vs-train-mean gate)
    gate_defaults: Mapping[str, Any] = {}

    # -- architecture and model ----------------------------------------------------------------

    def resolve_arch(
        self,
        spec: VariantSpec,
        contract_dims: dict[str, int],
        ctx_cat_cardinalities: list[int],
        seq_len: int,
        overrides: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The complete JSON-able architecture config (``arch["variant"] == spec.name``; dims from the
        contract, never from data; ``overrides`` may set keys of ``spec.default_arch`` only)."""
        raise NotImplementedError

    def build_model(self, arch: dict[str, Any]) -> nn.Module:
        """The ``nn.Module`` described by ``arch`` alone (``model(batch) -> {head name: tensor}``)."""
        raise NotImplementedError

    # -- data -------------------------------------------------------------------------------------

    def prepare(self, config: Any, inputs: Any) -> FamilyData:
        """Load the extra inputs of a run (``config.family_inputs``: ``{name: path}``); ``inputs`` is the
        engine's loaded inputs (``schema``, ``contract``, ``train``, ``val`` splits). Default: check
        :attr:`required_inputs` are given and exist, load nothing."""
        given = dict(getattr(config, "family_inputs", {}) or {})
        missing = [k for k in self.required_inputs if k not in given]
        if missing:
            raise ValueError(
                f"model family {self.name!r} needs family_inputs {missing} (e.g. family_inputs: "
                f"{{{missing[0]!r}: <folder>}} in the training config)"
            )
        for key in self.required_inputs:
            if not Path(given[key]).exists():
                raise FileNotFoundError(f"{given[key]}: family input {key!r} of {self.name!r} does not exist")
        return FamilyData(paths={k: Path(v) for k, v in given.items()})

    def make_batcher(
        self, split: SplitArrays, *, seq_len: int, batch_size: int, shuffle: bool, seed: int, data: FamilyData,
        keys: tuple[str, ...] | None = None,
    ) -> Batcher:
        """The batcher of ``split`` (train: ``shuffle`` as configured; val/test: ``shuffle=False``,
        chronological). ``batch_size`` is the family's unit (samples for windows; a day batcher may read
        it as it documents). ``keys``: the batch keys to build (:meth:`batch_keys`; ``None``: all)."""
        raise NotImplementedError

    def batch_keys(self, spec: VariantSpec, *, evaluation: bool = False) -> tuple[str, ...] | None:
        """The batch keys the engine reads for ``spec``: what the model, :meth:`losses`,
        :meth:`samples_in` and the :meth:`batch_telemetry` read of a train batch, with ``evaluation`` the
        :attr:`eval_keys` too (the validation pass). Handed to :meth:`make_batcher` as ``keys``.
        Default ``None``: every key the batcher builds."""
        return None

    def samples_in(self, batch: Batch) -> int:
        """Number of samples in a batch (the weight of its loss in epoch means, throughput)."""
        raise NotImplementedError

    def bundle_files(self, data: FamilyData) -> dict[str, Path]:
        """Extra files a bundle of this family carries for inference, ``{name in bundle_file_names:
        source path}``; copied into the bundle and covered by its signed manifest. Default: none."""
        return {}

    def load_bundle_data(self, bundle_dir: Path) -> FamilyData:
        """The :class:`FamilyData` for inference, read from the bundle's extra files (already checked
        against the manifest). Default: empty."""
        return FamilyData()

    # -- losses, telemetry, metrics ----------------------------------------------------------------

    def train_baselines(self, spec: VariantSpec, train_split: SplitArrays, data: FamilyData) -> dict[str, Any]:
        """JSON-able train statistics (``metrics.json["baselines"]``): the trivial baselines of
        :meth:`evaluate` and whatever :meth:`loss_state` needs."""
        return {}

    def loss_state(self, spec: VariantSpec, baselines: Mapping[str, Any], device: torch.device) -> Any:
        """What :meth:`losses` needs besides outputs and batch (e.g. class weights), built from the
        baselines (so verification rebuilds it from ``metrics.json``). Raise ``ValueError`` when the
        baselines lack something."""
        return None

    def losses(
        self, spec: VariantSpec, outputs: dict[str, torch.Tensor], batch: Batch, state: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, {head name: loss})`` on one batch; ``total`` is what is minimised."""
        raise NotImplementedError

    def batch_telemetry(self, spec: VariantSpec) -> BatchTelemetry:
        """A fresh per-epoch telemetry accumulator (e.g. the class balance of the train batches)."""
        return BatchTelemetry()

    def monitor_modes(self, spec: VariantSpec) -> dict[str, str]:
        """Epoch metrics of ``spec`` that may be monitored besides ``val_loss``: ``{name: "min"|"max"}``."""
        return {}

    def epoch_metrics(
        self, spec: VariantSpec, outputs: dict[str, np.ndarray], kept: dict[str, np.ndarray]
    ) -> dict[str, Any]:
        """Validation metrics added to every epoch's history record (``outputs``: per head, ``kept``: the
        :attr:`eval_keys` of the batches, both in sample order over the whole validation split)."""
        return {}

    def epoch_log(self, spec: VariantSpec, record: Mapping[str, Any]) -> str:
        """Text added after the validation loss in the epoch's log line (e.g. ``" val-macro-F1 0.4123"``),
        from the epoch's history record. Default: nothing."""
        return ""

    def evaluate(
        self, spec: VariantSpec, outputs: dict[str, np.ndarray], kept: dict[str, np.ndarray],
        baselines: Mapping[str, Any],
    ) -> dict[str, Any]:
        """The final evaluation of the best checkpoint on the validation split (``metrics.json
        ["final_val"]``; must hold ``n_samples``)."""
        raise NotImplementedError

    def head_vs_baseline(self, spec: VariantSpec, final_val: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Per head: ``{"metric", "higher_is_better", "model", "baseline", "beats_baseline"}``."""
        return {}

    def signal(self, spec: VariantSpec, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One trading signal per sample (higher = more bullish)."""
        raise NotImplementedError

    # -- ONNX export (deployment.onnx_export) ----------------------------------------------------------

    def onnx_inputs(self, spec: VariantSpec, arch: Mapping[str, Any]) -> dict[str, dict[int, str]]:
        """The batch keys the exported model takes, in order, each with its dynamic axes ``{axis: name}``.
        Default: the variant's input groups (``spec.inputs``), only the sample axis 0 dynamic
        (``"batch"``). A family whose model reads other keys overrides this and :meth:`onnx_example`."""
        return {group: {0: "batch"} for group in spec.inputs}

    def onnx_example(
        self, spec: VariantSpec, arch: Mapping[str, Any], dims: Mapping[str, int], n: int = 2
    ) -> Batch:
        """A batch of ``n`` samples holding every :meth:`onnx_inputs` key, to trace the model for export
        (its values do not matter, its shapes and dtypes do). ``dims``: the contract's group widths.
        Default: the input groups (``seq`` ``(n, seq_len, F)``, ``snap``/``ctx_cont`` ``(n, F)`` float32,
        ``ctx_cat`` ``(n, C)`` int64 codes 0); another key raises ``ValueError`` naming it."""
        shapes = {"seq": (n, int(arch["seq_len"]), int(dims.get("seq", 0))), "snap": (n, int(dims.get("snap", 0))),
                  "ctx_cont": (n, int(dims.get("ctx_cont", 0)))}
        batch: Batch = {}
        for key in self.onnx_inputs(spec, arch):
            if key == "ctx_cat":
                batch[key] = torch.zeros(n, int(dims.get("ctx_cat", 0)), dtype=torch.int64)
            elif key in shapes:
                batch[key] = torch.zeros(shapes[key], dtype=torch.float32)
            else:
                raise ValueError(f"model family {self.name!r}: no example for ONNX input {key!r} (override "
                                 "ModelFamily.onnx_example)")
        return batch

    # -- registry helpers ----------------------------------------------------------------------------

    def variant(self, name: str) -> VariantSpec:
        for spec in self.variants:
            if spec.name == name:
                return spec
        raise ValueError(f"model family {self.name!r} has no variant {name!r}")

    def check(self) -> None:
        """Raise ``ValueError`` when the declaration is inconsistent (done at registration)."""
        if not self.name:
            raise ValueError(f"{type(self).__name__}: a model family needs a name")
        if not (isinstance(self.batch_kind, str) and self.batch_kind.isidentifier() and self.batch_kind.islower()):
            raise ValueError(f"model family {self.name!r}: batch_kind {self.batch_kind!r} is not a lower-case "
                             f"identifier (known kinds: {BATCH_KINDS})")
        if not self.variants:
            raise ValueError(f"model family {self.name!r} declares no variant")
        for spec in self.variants:
            if spec.family != self.name or spec.batch_kind != self.batch_kind:
                raise ValueError(
                    f"variant {spec.name!r} names family {spec.family!r} / batch kind {spec.batch_kind!r}, "
                    f"declared in family {self.name!r} / {self.batch_kind!r}"
                )


__all__ = [
    "BATCH_KINDS",
    "Batch",
    "BatchTelemetry",
    "Batcher",
    "FamilyData",
    "HeadSpec",
    "INPUT_GROUPS",
    "ModelFamily",
    "N_CLASSES",
    "VariantSpec",
]
