"""Configuration of one training run: :class:`TrainConfig`, config files and CLI overrides.

A run is described by one :class:`TrainConfig`. It can come from a YAML or JSON file
(:func:`load_config`), from CLI flags, or both: :func:`merge_cli` lays the flags that were actually
given over the file, so **CLI flags override the file** and the file overrides the dataclass
defaults.

Fields left at ``None`` are resolved when the run starts (``engine.resolve_settings``):

- ``batch_size``   the profile's batch size (``safe``: the variant's default, e.g. 16 for the MLP;
  ``throughput``: 1024)
- ``num_workers``  ``safe``: 0; ``throughput``: 2-4 (the usable CPUs minus one, clamped)
- ``pin_memory``   only with CUDA (both profiles)
- ``bf16_autocast`` ``throughput`` on CUDA only; never on CPU (a request on CPU is ignored with a warning)
- ``shuffle``      ``safe``: False; ``throughput``: True (order reseeded per epoch from ``seed``)
- ``monitor``      the variant's monitor (``val_loss``, or ``val_macro_f1`` for classifiers)
- ``optimizer``    the model family's preference (``adamw`` for the window family); see ``training.optim``
- ``scheduler``    the model family's preference (``none`` for the window family)
- ``expected_hash`` ``feature_contract.json`` beside the schema, else the schema's header line

Relative paths are taken as given (relative to the working directory of the process).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sentinel_pipeline.training.optim import OPTIMIZERS, SCHEDULERS, check_params

PROFILES: tuple[str, ...] = ("safe", "throughput")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
MONITORS: tuple[str, ...] = ("val_loss", "val_macro_f1")
PATH_FIELDS: tuple[str, ...] = ("train_h5", "val_h5", "feature_schema", "out_dir", "scalers_dir", "models_dir")
REQUIRED_FIELDS: tuple[str, ...] = ("train_h5", "val_h5", "feature_schema", "out_dir")


# The pipeline's training budget (the Dagster training assets and the gate calibration use it):
# at most 10 epochs with patience 3 so the default job finishes in minutes on 2 CPU cores, train
# samples shuffled per epoch (validation and test stay chronological), batch 256 for the MLP.
PIPELINE_TRAINING: dict[str, Any] = {"epochs": 10, "patience": 3, "shuffle": True}
PIPELINE_BATCH_SIZES: dict[str, int] = {"mlp_two_head": 256, "transformer_tbm": 256}
# per-variant settings of the pipeline's runs: the transformer reads 10-bar windows (the planted
# momentum looks back 10 bars; its epoch costs a third of a 30-bar one, which made the default job take
# ~14 minutes of transformer training on 2 cores)
PIPELINE_VARIANT_TRAINING: dict[str, dict[str, Any]] = {"transformer_tbm": {"seq_len": 10}}


def pipeline_train_config(paths: Any, variant: str, out_dir: Path, **overrides: Any) -> TrainConfig:
    """The run the pipeline's ``bundle_<variant>`` asset makes on ``paths`` (an ``ArtifactPaths``):
    :data:`PIPELINE_TRAINING`, the variant's batch size and settings, then ``overrides``."""
    return TrainConfig(
        train_h5=paths.h5("train"),
        val_h5=paths.h5("val"),
        feature_schema=paths.feature_schema,
        out_dir=out_dir,
        model=variant,
        scalers_dir=paths.scalers_dir,
        models_dir=paths.models_dir,
        **{**PIPELINE_TRAINING, "batch_size": PIPELINE_BATCH_SIZES.get(variant),
           **PIPELINE_VARIANT_TRAINING.get(variant, {}), **overrides},
    )


class ConfigError(ValueError):
    """A training configuration is invalid (unknown key, bad value, missing required path)."""


@dataclass
class TrainConfig:
    train_h5: Path
    val_h5: Path
    feature_schema: Path
    out_dir: Path
    model: str = "mlp_two_head"
    seq_len: int = 30
    batch_size: int | None = None
    epochs: int = 20
    num_workers: int | None = None
    device: str = "auto"
    seed: int = 1337
    log_every: int = 50
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    # keep only the first N samples of the train AND the val split (quick runs, tests)
    limit_samples: int | None = None
    patience: int = 5
    monitor: str | None = None
    # None: the model family's preference (training.optim); adamw | adabelief
    optimizer: str | None = None
    # typed keyword arguments of the optimizer (training.optim: betas, eps, ...), over its defaults
    optimizer_params: dict[str, Any] = field(default_factory=dict)
    # None: the model family's preference; none | plateau | cosine_restarts
    scheduler: str | None = None
    # keyword arguments for the torch scheduler, over the engine's (and the family's) defaults
    scheduler_params: dict[str, Any] = field(default_factory=dict)
    grad_clip: float = 1.0
    bf16_autocast: bool | None = None
    pin_memory: bool | None = None
    shuffle: bool | None = None
    threads: int | None = None
    profile: str = "safe"
    # architecture overrides, passed to models.resolve_arch
    arch: dict[str, Any] = field(default_factory=dict)
    # extra inputs of a model family, {name: path} (e.g. {"symbol_graph": <folder>}); the family's
    # prepare() loads them (ModelFamily.required_inputs)
    family_inputs: dict[str, Path] = field(default_factory=dict)
    expected_hash: str | None = None
    scalers_dir: Path | None = None
    models_dir: Path | None = None
    prefer_arrow: bool = True
    # ignore (and delete) the resume state of an earlier run in out_dir and train from scratch
    fresh: bool = False

    def __post_init__(self) -> None:
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value))
        if isinstance(self.family_inputs, dict):
            self.family_inputs = {str(k): Path(v) for k, v in self.family_inputs.items()}
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` listing every invalid field."""
        problems: list[str] = []

        def positive_int(name: str, allow_none: bool = False, minimum: int = 1) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                problems.append(f"{name} must be an integer >= {minimum}, got {v!r}")

        positive_int("seq_len")
        positive_int("batch_size", allow_none=True)
        positive_int("epochs")
        positive_int("num_workers", allow_none=True, minimum=0)
        positive_int("log_every")
        positive_int("limit_samples", allow_none=True)
        positive_int("patience")
        positive_int("threads", allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be a non-negative integer, got {self.seed!r}")
        for name in ("learning_rate", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                problems.append(f"{name} must be a number > 0, got {v!r}")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, int | float) or self.weight_decay < 0:
            problems.append(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        for name, allowed in (("profile", PROFILES), ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS)):
            if getattr(self, name) is not None and getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {list(allowed)} or null, got {getattr(self, name)!r}")
        if self.monitor is not None and self.monitor not in MONITORS and self.monitor not in _family_monitors():
            problems.append(f"monitor must be one of {sorted({*MONITORS, *_family_monitors()})} or null, "
                            f"got {self.monitor!r}")
        for name in ("arch", "scheduler_params", "optimizer_params", "family_inputs"):
            if not isinstance(getattr(self, name), dict):
                problems.append(f"{name} must be a mapping, got {type(getattr(self, name)).__name__}")
        if not problems:
            if self.optimizer in OPTIMIZERS:
                problems += check_params("optimizer", self.optimizer, self.optimizer_params)
            if self.scheduler in SCHEDULERS:
                problems += check_params("scheduler", self.scheduler, self.scheduler_params)
        if not isinstance(self.model, str) or not self.model:
            problems.append(f"model must be a variant name, got {self.model!r}")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (paths as strings) that :func:`merge_cli` / ``TrainConfig(**d)`` accept back."""
        d = dataclasses.asdict(self)
        for name in PATH_FIELDS:
            if d[name] is not None:
                d[name] = str(d[name])
        d["family_inputs"] = {k: str(v) for k, v in self.family_inputs.items()}
        return d


def _family_monitors() -> set[str]:
    """Epoch metrics a registered model family lets a run monitor (``ModelFamily.monitor_modes``)."""
    from sentinel_pipeline.training.families import FAMILIES

    return {name for fam in FAMILIES.values() for spec in fam.variants for name in fam.monitor_modes(spec)}


FIELD_NAMES: frozenset[str] = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON file of config fields; unknown keys are an error.

    Returns the (possibly partial) mapping; required paths may be supplied later by CLI flags.
    A top-level ``train:`` section is accepted as well as a flat mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot parse config file: {exc}") from exc
    if data is None:
        data = {}
    if isinstance(data, Mapping) and set(data) == {"train"} and isinstance(data["train"], Mapping):
        data = data["train"]
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: config file must hold a mapping of fields, got {type(data).__name__}")
    unknown = sorted(str(k) for k in set(data) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"{path}: unknown config keys {unknown}; known keys are {sorted(FIELD_NAMES)}")
    return dict(data)


def merge_cli(config: TrainConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> TrainConfig:
    """``config`` (a file's mapping or a TrainConfig) with every non-None entry of ``overrides`` laid over it.

    ``overrides`` holds the CLI flags; a flag that was not given must be absent or None.
    """
    base: dict[str, Any]
    if config is None:
        base = {}
    elif isinstance(config, TrainConfig):
        base = config.to_dict()
    else:
        base = dict(config)
    unknown = sorted(str(k) for k in set(overrides) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"unknown config overrides {unknown}")
    merged = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    missing = [name for name in REQUIRED_FIELDS if merged.get(name) in (None, "")]
    if missing:
        raise ConfigError(f"training config lacks required fields {missing} (give them in the config file or as flags)")
    try:
        return TrainConfig(**merged)
    except TypeError as exc:
        raise ConfigError(f"invalid training config: {exc}") from exc
