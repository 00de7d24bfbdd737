"""Replay reporting: the side-by-side comparison table, the equity-curve plot and the JSON report.

``compare_reports`` flattens the numeric metrics of each report (nested dicts become dotted names,
e.g. ``entry_quality.mae_6_mean``) into one row per metric with columns ``current``, ``previous``,
``baseline``, ``delta_vs_previous`` (current − previous) and ``delta_vs_baseline`` (current − baseline);
a missing value (no previous bundle, a metric one side lacks, ``None``) is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sentinel_pipeline.atomic_io import atomic_path, write_json_atomic

COMPARISON_COLUMNS: tuple[str, ...] = ("current", "previous", "baseline", "delta_vs_previous", "delta_vs_baseline")


def flatten_numeric(report: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested report as ``{dotted.name: float}`` (bools count, strings/lists do not;
    ``None`` becomes NaN so a metric that could not be computed still has its row)."""
    out: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_numeric(value, prefix=f"{name}."))
        elif value is None:
            out[name] = math.nan
        elif isinstance(value, bool | int | float | np.integer | np.floating | np.bool_):
            out[name] = float(value)
    return out


def compare_reports(
    current: Mapping[str, Any], previous: Mapping[str, Any] | None, baseline: Mapping[str, Any]
) -> pd.DataFrame:
    """Side-by-side metrics of the current bundle, the previous bundle (may be ``None``) and the
    random-entry baseline, with deltas; index ``metric`` in the current report's order."""
    cur = flatten_numeric(current)
    prev = flatten_numeric(previous) if previous is not None else {}
    base = flatten_numeric(baseline)
    names = list(cur) + [n for n in (*prev, *base) if n not in cur]
    names = list(dict.fromkeys(names))
    table = pd.DataFrame(
        {
            "current": [cur.get(n, math.nan) for n in names],
            "previous": [prev.get(n, math.nan) for n in names],
            "baseline": [base.get(n, math.nan) for n in names],
        },
        index=pd.Index(names, name="metric"),
        dtype=np.float64,
    )
    table["delta_vs_previous"] = table["current"] - table["previous"]
    table["delta_vs_baseline"] = table["current"] - table["baseline"]
    return table


def plot_equity_curves(curves: Mapping[str, pd.Series], path: str | Path, title: str = "Replay equity curves") -> Path:
    """One line per named equity curve (index: day) in a PNG written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        for name, curve in curves.items():
            ax.plot(curve.index, curve.to_numpy(np.float64), marker="o", markersize=3, label=name)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(title)
        ax.set_xlabel("day (UTC)")
        ax.set_ylabel("equity (1 + cumulative trade return)")
        if curves:
            ax.legend()
        fig.autofmt_xdate()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def jsonable(obj: Any) -> Any:
    """``obj`` with NumPy scalars/arrays as Python values, timestamps as ISO strings and NaN/inf as
    ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, pd.Timestamp):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_replay_report(path: str | Path, report: Mapping[str, Any]) -> Path:
    """Write the replay report as strict JSON (NaN → null), atomically."""
    return write_json_atomic(path, jsonable(report))
