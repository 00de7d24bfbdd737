"""Checkpoint files of a training run: the deployable ``model_best.pt`` and the ``resume.pt`` state.

``model_best.pt`` holds **exactly** the keys of :data:`BEST_KEYS`: ``model_state_dict`` (CPU
tensors), ``input_dim``, ``hidden_dim``, ``epoch``, ``val_loss`` and ``arch`` (the resolved
architecture config, from which ``models.build_model`` rebuilds the network). No optimizer state and
no data: it loads with ``torch.load(weights_only=True)``, which refuses anything but tensors and
plain containers/scalars.

``resume.pt`` is rewritten after every completed epoch and carries everything needed to continue
bit for bit: model, optimizer and scheduler state, early-stopping state, history, the epoch and the
RNG states of python, numpy and torch (CPU and CUDA). It holds only tensors and plain Python values
too (the numpy RNG key is stored as a list), so it also loads with ``weights_only=True``.

Both files are written atomically (temp file then rename): a crash leaves the previous complete
file, never a truncated one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sentinel_pipeline.atomic_io import atomic_path

BEST_NAME = "model_best.pt"
RESUME_NAME = "resume.pt"
BEST_KEYS: tuple[str, ...] = ("model_state_dict", "input_dim", "hidden_dim", "epoch", "val_loss", "arch")
RESUME_FORMAT = "sentinel-resume/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not have the expected layout."""


def _save(obj: dict[str, Any], path: Path) -> Path:
    # through a Python file object: a failed write raises the OSError (e.g. ENOSPC) that atomic_path
    # turns into a plain message; torch's own path writer reports it as an opaque RuntimeError
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
    return path


def _load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(f"{path}: cannot load checkpoint with weights_only=True: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: checkpoint is a {type(obj).__name__}, expected a dict")
    return obj


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's state dict (safe to keep while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_best(
    path: str | Path, state_dict: dict[str, torch.Tensor], arch: dict[str, Any], epoch: int, val_loss: float
) -> Path:
    """Write ``model_best.pt`` with exactly :data:`BEST_KEYS`."""
    obj = {
        "model_state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "input_dim": int(arch["input_dim"]),
        "hidden_dim": int(arch["hidden_dim"]),
        "epoch": int(epoch),
        "val_loss": float(val_loss),
        "arch": dict(arch),
    }
    return _save(obj, Path(path))


def load_best(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``model_best.pt`` with ``weights_only=True`` and check it has exactly :data:`BEST_KEYS`."""
    path = Path(path)
    obj = _load(path, map_location)
    if set(obj) != set(BEST_KEYS):
        raise CheckpointError(
            f"{path}: checkpoint keys {sorted(obj)} differ from the expected {sorted(BEST_KEYS)}"
        )
    if not isinstance(obj["arch"], dict) or "variant" not in obj["arch"]:
        raise CheckpointError(f"{path}: checkpoint 'arch' is not a resolved architecture config")
    return obj


# -- RNG state --------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The RNG states of python, numpy (global) and torch, as plain values and tensors."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# -- resume state -----------------------------------------------------------------------------


def save_resume(path: str | Path, state: dict[str, Any]) -> Path:
    """Write the resume state (see module docstring) atomically; ``format`` is added."""
    return _save({"format": RESUME_FORMAT, **state}, Path(path))


def load_resume(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``resume.pt`` with ``weights_only=True``; refuse a file of another format."""
    path = Path(path)
    obj = _load(path, map_location)
    if obj.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{path}: not a resume state of format {RESUME_FORMAT} (found {obj.get('format')!r})")
    return obj
