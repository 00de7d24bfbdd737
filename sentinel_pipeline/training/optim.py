"""Optimizers and learning-rate schedulers as typed configuration.

``TrainConfig.optimizer`` is one of :data:`OPTIMIZERS` and ``TrainConfig.optimizer_params`` the
keyword arguments of its typed parameter class (the learning rate and weight decay stay the config's
``learning_rate`` / ``weight_decay``):

- ``adamw``: ``torch.optim.AdamW`` (:class:`AdamWParams`: ``betas``, ``eps``, ``amsgrad``);
- ``adabelief``: AdaBelief (Zhuang et al. 2020) from ``pytorch_optimizer``, a maintained implementation
  (:class:`AdaBeliefParams`: ``betas``, ``eps`` (1e-16, the paper's), ``weight_decouple``,
  ``fixed_decay``, ``rectify``).

``TrainConfig.scheduler`` is one of :data:`SCHEDULERS`, ``TrainConfig.scheduler_params`` the keyword
arguments of its parameter class:

- ``none``;
- ``plateau``: ``ReduceLROnPlateau`` stepped on the monitor (:class:`PlateauParams`, default
  ``factor=0.5, patience=2``);
- ``cosine_restarts``: ``CosineAnnealingWarmRestarts`` stepped once per epoch
  (:class:`CosineRestartsParams`, default ``T_0=5, T_mult=1, eta_min=0``; a family may prefer other
  defaults: ``ModelFamily.optimizer_defaults["scheduler_params"]``, e.g. the seed's ``T_0=3,
  T_mult=2, eta_min=5e-5``).

A field left at ``None`` in the config takes the model family's preference
(``ModelFamily.optimizer_defaults``), then the defaults here. Parameters are checked by name and
type when the config is built (:func:`check_params`): a typo is a ``ConfigError`` listing the
allowed names, not a ``TypeError`` from torch at the first epoch. The resolved choice enters the
resume fingerprint (``engine``), so a ``resume.pt`` of another optimizer or scheduler is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

OPTIMIZERS: tuple[str, ...] = ("adamw", "adabelief")
SCHEDULERS: tuple[str, ...] = ("none", "plateau", "cosine_restarts")


@dataclass(frozen=True)
class AdamWParams:
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False


@dataclass(frozen=True)
class AdaBeliefParams:
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-16
    weight_decouple: bool = True
    fixed_decay: bool = False
    rectify: bool = False


@dataclass(frozen=True)
class NoSchedulerParams:
    pass


@dataclass(frozen=True)
class PlateauParams:
    factor: float = 0.5
    patience: int = 2
    threshold: float = 1e-4
    cooldown: int = 0
    min_lr: float = 0.0


@dataclass(frozen=True)
class CosineRestartsParams:
    T_0: int = 5  # noqa: N815 - torch's argument names
    T_mult: int = 1  # noqa: N815
    eta_min: float = 0.0


OPTIMIZER_PARAMS: dict[str, type] = {"adamw": AdamWParams, "adabelief": AdaBeliefParams}
SCHEDULER_PARAMS: dict[str, type] = {
    "none": NoSchedulerParams,
    "plateau": PlateauParams,
    "cosine_restarts": CosineRestartsParams,
}
# the scheduler defaults the engine used before they were typed (the window family's runs keep them)
SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "plateau": {"factor": 0.5, "patience": 2},
    "cosine_restarts": {"T_0": 5, "T_mult": 1, "eta_min": 0.0},
}


def _coerce(name: str, value: Any, default: Any) -> Any:
    """``value`` in the type of the field's default (JSON/YAML give lists for tuples, ints for floats)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple) or len(value) != len(default):
            raise ValueError(f"{name} must be a list of {len(default)} numbers, got {value!r}")
        return tuple(_coerce(f"{name}[{i}]", v, d) for i, (v, d) in enumerate(zip(value, default, strict=True)))
    return value


def typed_params(kind: str, choice: str, params: Mapping[str, Any]) -> Any:
    """The parameter dataclass instance of ``choice`` (``kind``: "optimizer" | "scheduler"), fields
    coerced to their declared types; ``ValueError`` naming unknown fields or bad values."""
    table = OPTIMIZER_PARAMS if kind == "optimizer" else SCHEDULER_PARAMS
    if choice not in table:
        raise ValueError(f"{kind} must be one of {list(table)}, got {choice!r}")
    cls = table[choice]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(f"{kind}_params {unknown} are not parameters of {choice!r} (allowed: {sorted(fields)})")
    defaults = cls()
    values = {k: _coerce(f"{kind}_params.{k}", v, getattr(defaults, k)) for k, v in params.items()}
    out = cls(**values)
    for k, v in dataclasses.asdict(out).items():
        flat = v if isinstance(v, tuple) else (v,)
        if any(isinstance(x, int | float) and not isinstance(x, bool) and x < 0 for x in flat):
            raise ValueError(f"{kind}_params.{k} must be >= 0, got {v!r}")
    return out


def check_params(kind: str, choice: str | None, params: Mapping[str, Any]) -> list[str]:
    """Problems of a config's ``<kind>``/``<kind>_params`` pair (empty: fine). With ``choice`` None
    (the family's preference, unknown here) only the mapping type is checked."""
    if not isinstance(params, Mapping):
        return [f"{kind}_params must be a mapping, got {type(params).__name__}"]
    if choice is None:
        return []
    try:
        typed_params(kind, choice, params)
    except ValueError as exc:
        return [str(exc)]
    return []


@dataclass(frozen=True)
class OptimSetup:
    """The resolved optimizer and scheduler of a run (recorded in ``train_config.json`` and hashed)."""

    optimizer: str
    optimizer_params: dict[str, Any]  # only the values given (config over family), as JSON
    scheduler: str
    scheduler_params: dict[str, Any]  # the keyword arguments handed to the scheduler

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve(
    optimizer: str | None,
    optimizer_params: Mapping[str, Any],
    scheduler: str | None,
    scheduler_params: Mapping[str, Any],
    family_defaults: Mapping[str, Any],
) -> OptimSetup:
    """The run's optimizer and scheduler: the config's choice, else the family's, else adamw / none;
    scheduler parameters = the engine's defaults < the family's for that scheduler < the config's."""
    opt = optimizer or family_defaults.get("optimizer") or "adamw"
    opt_params = dict(optimizer_params)
    if optimizer is None:  # the family's optimizer comes with the family's parameters
        opt_params = {**dict(family_defaults.get("optimizer_params") or {}), **opt_params}
    sched = scheduler or family_defaults.get("scheduler") or "none"
    family_sched = dict((family_defaults.get("scheduler_params") or {}).get(sched) or {})
    sched_params = {**SCHEDULER_DEFAULTS.get(sched, {}), **family_sched, **dict(scheduler_params)}
    typed_params("optimizer", opt, opt_params)
    typed_params("scheduler", sched, sched_params)
    return OptimSetup(opt, opt_params, sched, sched_params)


def build_optimizer(setup: OptimSetup, params: Iterable[Any], lr: float, weight_decay: float) -> Any:
    """The torch optimizer of ``setup`` over ``params``."""
    import torch

    typed = typed_params("optimizer", setup.optimizer, setup.optimizer_params)
    kwargs = dataclasses.asdict(typed)
    if setup.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)
    from pytorch_optimizer import AdaBelief

    return AdaBelief(params, lr=lr, weight_decay=weight_decay, **kwargs)


def build_scheduler(setup: OptimSetup, optimizer: Any, mode: str) -> Any:
    """The torch scheduler of ``setup`` (``None`` for ``none``); ``mode`` is the monitor's
    ("min" | "max"), for ``plateau``. The keyword arguments are exactly ``setup.scheduler_params``."""
    import torch

    if setup.scheduler == "none":
        return None
    typed_params("scheduler", setup.scheduler, setup.scheduler_params)  # names and types checked
    if setup.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, **setup.scheduler_params)
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, **setup.scheduler_params)


def step_scheduler(scheduler: Any, monitor_value: float) -> None:
    """One end-of-epoch step: plateau on the monitor value, the others per epoch."""
    import torch

    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(monitor_value)
    elif scheduler is not None:
        scheduler.step()
