"""The model registry under its old name: a re-export of ``training.families`` (and the window family's
model classes), kept so that existing imports keep working. New code imports
``sentinel_pipeline.training.families``."""

from __future__ import annotations

from sentinel_pipeline.training.families import (
    INPUT_GROUPS,
    N_CLASSES,
    VARIANTS,
    HeadSpec,
    VariantSpec,
    build_model,
    family_of,
    get_variant,
    resolve_arch,
    signal_from_outputs,
)
from sentinel_pipeline.training.families.window_models import MLPTwoHead, SeqCtxFusion, TransformerTBM

__all__ = [
    "INPUT_GROUPS",
    "N_CLASSES",
    "VARIANTS",
    "HeadSpec",
    "MLPTwoHead",
    "SeqCtxFusion",
    "TransformerTBM",
    "VariantSpec",
    "build_model",
    "family_of",
    "get_variant",
    "resolve_arch",
    "signal_from_outputs",
]
