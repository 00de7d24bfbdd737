"""The registry of model families (see ``families/base.py`` for the protocol).

Every module named in :data:`FAMILY_MODULES` is imported once and its ``FAMILY`` (a
:class:`~sentinel_pipeline.training.families.base.ModelFamily`) registered: adding a family is a file
added under ``training/families/`` and one line here; the engine does not change.

The variant-level functions dispatch to the variant's family: :func:`get_variant`,
:func:`resolve_arch`, :func:`build_model`, :func:`signal_from_outputs`; :func:`family_of` gives the
family of a variant name, a :class:`VariantSpec` or an architecture config. :data:`VARIANTS` is the live
``{variant name: VariantSpec}`` of every registered family (a test may register a family for a while
with :func:`registered`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sentinel_pipeline.training.families.base import (
    BATCH_KINDS,
    INPUT_GROUPS,
    N_CLASSES,
    Batch,
    Batcher,
    BatchTelemetry,
    FamilyData,
    HeadSpec,
    ModelFamily,
    VariantSpec,
)

# one line per family module (each defines FAMILY)
FAMILY_MODULES: tuple[str, ...] = (
    "sentinel_pipeline.training.families.window_models",
    "sentinel_pipeline.training.families.gat_multi_horizon",
)

FAMILIES: dict[str, ModelFamily] = {}
VARIANTS: dict[str, VariantSpec] = {}


def variants_of_kind(batch_kind: str) -> dict[str, VariantSpec]:
    """The registered variants whose family has ``batch_kind`` (e.g. ``"windows"``), in registry order."""
    return {name: spec for name, spec in VARIANTS.items() if spec.batch_kind == batch_kind}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` and its variants to the registry (``ValueError`` on a name already taken)."""
    family.check()
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    taken = sorted(s.name for s in family.variants if s.name in VARIANTS)
    if taken:
        raise ValueError(f"model family {family.name!r}: variants {taken} are already registered")
    FAMILIES[family.name] = family
    for spec in family.variants:
        VARIANTS[spec.name] = spec
    return family


def unregister_family(name: str) -> None:
    """Remove a family and its variants from the registry (tests)."""
    family = FAMILIES.pop(name)
    for spec in family.variants:
        VARIANTS.pop(spec.name, None)


@contextmanager
def registered(family: ModelFamily) -> Iterator[ModelFamily]:
    """``family`` registered for the duration of the ``with`` block (tests: a toy family)."""
    register_family(family)
    try:
        yield family
    finally:
        unregister_family(family.name)


def get_family(name: str) -> ModelFamily:
    """The registered family called ``name`` (``ValueError`` naming the known ones otherwise)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; registered: {sorted(FAMILIES)}") from None


def get_variant(variant: str | VariantSpec) -> VariantSpec:
    """The :class:`VariantSpec` of a variant name (a spec is returned as is)."""
    if isinstance(variant, VariantSpec):
        return variant
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown model variant {variant!r}; known: {sorted(VARIANTS)}") from None


def family_of(variant: str | VariantSpec | dict[str, Any]) -> ModelFamily:
    """The family of a variant name, a spec, or an architecture config (its ``"variant"``)."""
    if isinstance(variant, dict):
        if "variant" not in variant:
            raise ValueError("architecture config has no 'variant'")
        variant = variant["variant"]
    return get_family(get_variant(variant).family)


def resolve_arch(
    variant: str | VariantSpec,
    contract_dims: dict[str, int],
    ctx_cat_cardinalities: list[int],
    seq_len: int,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The complete, JSON-able architecture config of ``variant`` for a feature contract
    (``ModelFamily.resolve_arch`` of its family)."""
    spec = get_variant(variant)
    return get_family(spec.family).resolve_arch(spec, contract_dims, ctx_cat_cardinalities, seq_len, overrides)


def build_model(arch: dict[str, Any]) -> nn.Module:
    """Build the model described by an architecture config from :func:`resolve_arch` (nothing else)."""
    return family_of(arch).build_model(arch)


def signal_from_outputs(variant: str | VariantSpec, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One trading signal per sample (``ModelFamily.signal`` of the variant's family)."""
    spec = get_variant(variant)
    return get_family(spec.family).signal(spec, outputs)


def _load_families() -> None:
    for module in FAMILY_MODULES:
        register_family(importlib.import_module(module).FAMILY)


_load_families()

__all__ = [
    "BATCH_KINDS",
    "FAMILIES",
    "FAMILY_MODULES",
    "INPUT_GROUPS",
    "N_CLASSES",
    "VARIANTS",
    "Batch",
    "BatchTelemetry",
    "Batcher",
    "FamilyData",
    "HeadSpec",
    "ModelFamily",
    "VariantSpec",
    "build_model",
    "family_of",
    "get_family",
    "get_variant",
    "register_family",
    "registered",
    "resolve_arch",
    "signal_from_outputs",
    "unregister_family",
]
