"""``loss_curve.png``: train vs validation loss per epoch, one panel for the total and one per head.

Drawn with matplotlib's non-interactive Agg backend (no display needed) and written atomically.
It reads the per-epoch history records of the engine: ``train_loss``/``val_loss`` (totals) and
``train_head_losses``/``val_head_losses`` (``{head: loss}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from sentinel_pipeline.atomic_io import atomic_path  # noqa: E402


def plot_loss_curves(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Draw the total and per-head losses of ``history`` (train vs val) into a PNG at ``path``."""
    path = Path(path)
    heads: list[str] = []
    for rec in history:
        for name in (*rec.get("train_head_losses", {}), *rec.get("val_head_losses", {})):
            if name not in heads:
                heads.append(name)
    panels = [("total", "train_loss", "val_loss", None)] + [
        (head, "train_head_losses", "val_head_losses", head) for head in heads
    ]
    epochs = [int(rec["epoch"]) for rec in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.2), squeeze=False)
    for ax, (label, train_key, val_key, head) in zip(axes[0], panels, strict=True):
        for key, style in ((train_key, "o-"), (val_key, "s--")):
            values = [
                (rec.get(key) if head is None else rec.get(key, {}).get(head, float("nan"))) for rec in history
            ]
            ax.plot(epochs, [float("nan") if v is None else v for v in values], style,
                    label=key.split("_")[0], markersize=3)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
