"""Turn stage reports into Dagster UI metadata (numbers, markdown tables, images)."""


import base64
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def md_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> dg.MetadataValue:
    """A markdown table from a list of dict rows."""
    rows = list(rows)
    if not rows:
        return dg.MetadataValue.md("_(empty)_")
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return dg.MetadataValue.md("\n".join(lines))


def md_kv_table(d: Mapping[str, Any], key: str = "key", value: str = "value") -> dg.MetadataValue:
    return md_table([{key: k, value: v} for k, v in d.items()], [key, value])


def image(path: str | Path, title: str = "") -> dg.MetadataValue:
    """Embed a PNG in the UI (markdown with a data URI) so it shows without file access."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"**{title}**\n\n![{title}](data:image/png;base64,{data})")


def scalar(v: Any) -> Any:
    """Coerce numpy scalars and odd floats into metadata-friendly values."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return dg.MetadataValue.text(str(v))
    return v


def file_size_mb(*paths: str | Path) -> float:
    return round(sum(Path(p).stat().st_size for p in paths if Path(p).exists()) / 1e6, 3)
