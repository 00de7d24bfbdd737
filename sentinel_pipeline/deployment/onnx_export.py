"""ONNX export of a trained model: ``model.onnx`` in every bundle, or a recorded reason why not.

:func:`export_onnx` exports a model of any registered family with the current ``torch.onnx`` exporter
(``dynamo=True``, which needs ``onnxscript``) at the pinned opset :data:`ONNX_OPSET`:

- **inputs**: the family's :meth:`~sentinel_pipeline.training.families.ModelFamily.onnx_inputs`, in that
  order, named like the batch keys (window variants: their input groups ``seq``, ``snap``, ``ctx_cat``,
  ``ctx_cont``; the graph family: ``seq`` per node, ``edge_index``, ``edge_weight``). Only the sample
  axis is dynamic (``batch``; for a day batch the node and edge counts): window length and feature
  widths are fixed by the contract.
- **outputs**: every head, named like the head (regression ``(batch,)``, classification logits
  ``(batch, 3)``), then ``signal``: the family's trading signal, computed inside the graph, so a
  deployment needs nothing but the ONNX file and the scalers.
- traced on the family's :meth:`~sentinel_pipeline.training.families.ModelFamily.onnx_example` (values
  do not matter), in eval mode, with torch's RNG state restored afterwards (an export never changes
  what training does next); one self-contained file (no external data).

The result is an :class:`OnnxExport` whose :meth:`~OnnxExport.to_metadata` goes into
``bundle_metadata.json["onnx"]``: ``status`` ``"exported"`` with the opset, exporter versions and the
input/output signature, or ``"failed"`` with the reason (the exception, first lines). A family that
cannot export is never skipped silently: its bundle records the failure, has no ``model.onnx``, and
verification's ``onnx_parity`` check fails naming the reason.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sentinel_pipeline.training.families import get_family, get_variant, signal_from_outputs

ONNX_NAME = "model.onnx"
ONNX_METADATA_KEY = "onnx"  # bundle_metadata.json
ONNX_OPSET = 18  # pinned; onnxruntime >= 1.14 runs it
SIGNAL_OUTPUT = "signal"
EXPORTED = "exported"
FAILED = "failed"
log = logging.getLogger(__name__)
# loggers the exporter writes registration chatter to (e.g. "torchvision is not installed")
_NOISY_LOGGERS = ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch._dynamo", "torch.export")


@dataclass
class OnnxExport:
    """What one export gave: ``status`` (``"exported"`` | ``"failed"``), the reason of a failure, and the
    exported graph's signature (names, dtypes, shapes with the dynamic axes named)."""

    status: str
    reason: str | None = None
    opset: int = ONNX_OPSET
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    exporter: dict[str, str | None] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def exported(self) -> bool:
        return self.status == EXPORTED

    def to_metadata(self) -> dict[str, Any]:
        if not self.exported:
            return {"status": self.status, "reason": self.reason, "opset": self.opset, "exporter": self.exporter}
        return {"status": self.status, "file": ONNX_NAME, "opset": self.opset, "inputs": self.inputs,
                "outputs": self.outputs, "exporter": self.exporter, "export_seconds": round(self.seconds, 2)}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def exporter_versions() -> dict[str, str | None]:
    return {"exporter": "torch.onnx.export(dynamo=True)", "torch": torch.__version__,
            "onnxscript": _version("onnxscript"), "onnx": _version("onnx")}


class _Positional(nn.Module):
    """The model behind positional inputs (ONNX has no dict inputs), returning every head in the
    variant's order and then the family's signal."""

    def __init__(self, model: nn.Module, input_names: list[str], head_names: list[str], variant: str) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.head_names = head_names
        self.variant = variant

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(dict(zip(self.input_names, inputs, strict=True)))
        return (*(outputs[name] for name in self.head_names), signal_from_outputs(self.variant, outputs))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _reason(exc: BaseException, limit: int = 600) -> str:
    """The exception's type and what went wrong: the exporter's "Exception summary" when it has one
    (its errors run to pages of generic advice first), else the first lines; no terminal colours."""
    text = _ANSI.sub("", str(exc))
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1].split("(Refer to the full stack trace", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip() and line.strip() != "\u2b06\ufe0f"]
    text = f"{type(exc).__name__}: " + " ".join(lines[:6])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shape(tensor: torch.Tensor, axes: Mapping[int, str]) -> list[int | str]:
    return [axes.get(i, int(d)) for i, d in enumerate(tensor.shape)]


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


@contextlib.contextmanager
def _quiet_exporter() -> Any:
    """The exporter prints progress to stdout and warns about optional packages: keep both out of the
    training log (at debug level instead)."""
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    out = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if out.getvalue().strip():
            log.debug("torch.onnx: %s", out.getvalue().strip())


def export_onnx(
    model: nn.Module, arch: Mapping[str, Any], dims: Mapping[str, int], path: str | Path
) -> OnnxExport:
    """Export ``model`` (built from ``arch``) to ``path`` (see the module docstring); never raises for a
    model that cannot be exported: the :class:`OnnxExport` says ``"failed"`` and why, and no file is
    left at ``path``. ``dims``: the feature contract's group widths (``FeatureContract.dims()``)."""
    path = Path(path)
    tic = time.perf_counter()
    versions = exporter_versions()
    try:
        spec = get_variant(str(arch["variant"]))
        family = get_family(spec.family)
        axes = family.onnx_inputs(spec, arch)
        example = family.onnx_example(spec, arch, dims)
        names = list(axes)
        missing = [k for k in names if k not in example]
        if missing:
            raise ValueError(f"family {family.name!r}: its ONNX example lacks inputs {missing}")
        heads = [h.name for h in spec.heads]
        if SIGNAL_OUTPUT in heads:
            raise ValueError(f"a head is named {SIGNAL_OUTPUT!r}, the name of the signal output")
        was_training = model.training
        wrapper = _Positional(model, names, heads, spec.name).eval()
        args = tuple(example[k] for k in names)
        # one Dim object per label: inputs sharing an axis label share the dimension
        by_label: dict[str, Any] = {}
        dynamic = tuple({axis: by_label.setdefault(label, torch.export.Dim(label)) for axis, label in axes[name].items()}
                        for name in names)
        try:
            with torch.random.fork_rng(devices=[]), _quiet_exporter(), torch.no_grad():
                expected = wrapper(*args)
                program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=ONNX_OPSET,
                                            dynamic_shapes=(dynamic,), input_names=names,
                                            output_names=[*heads, SIGNAL_OUTPUT], verbose=False)
                if program is None:
                    raise RuntimeError("torch.onnx.export returned no program")
                path.parent.mkdir(parents=True, exist_ok=True)
                program.save(str(path), external_data=False)
        finally:
            model.train(was_training)
        outputs = [{"name": n, "dtype": _dtype(t), "shape": _shape(t, {0: next(iter(axes[names[0]].values()))})}
                   for n, t in zip([*heads, SIGNAL_OUTPUT], expected, strict=True)]
        inputs = [{"name": n, "dtype": _dtype(example[n]), "shape": _shape(example[n], axes[n])} for n in names]
        return OnnxExport(EXPORTED, inputs=inputs, outputs=outputs, exporter=versions,
                          seconds=time.perf_counter() - tic)
    except Exception as exc:  # any exporter failure is recorded, never raised into bundle writing
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        log.warning("ONNX export of %s failed: %s", arch.get("variant"), _reason(exc))
        return OnnxExport(FAILED, reason=_reason(exc), exporter=versions, seconds=time.perf_counter() - tic)
