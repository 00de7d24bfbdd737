"""Turn stage reports into Dagster UI metadata (numbers, markdown tables, images).

:func:`readable` rounds every float of a metadata mapping to :data:`SIGNIFICANT_DIGITS` significant
digits for reading (``total_seconds 63.209291190000044`` -> ``63.21``); the code location applies it
to every asset's and check's metadata in one place (``orchestration/presentation.py``), so stage
code reports full-precision numbers and the files on disk keep them.
"""


import base64
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

# digits a float keeps in the UI; integer digits are never dropped (123456.7 -> 123457)
SIGNIFICANT_DIGITS = 4


def round_float(v: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """``v`` rounded to ``digits`` significant digits (integer digits kept); nan/inf unchanged."""
    if not math.isfinite(v) or v == 0:
        return v
    return round(v, max(0, digits - 1 - math.floor(math.log10(abs(v)))))


def _round_any(v: Any) -> Any:
    """Floats rounded inside plain values, lists and dicts (JSON-like data); other values as they are."""
    if isinstance(v, bool | dg.MetadataValue) or not isinstance(v, float | list | tuple | dict):
        if hasattr(v, "item") and hasattr(v, "dtype") and getattr(v, "ndim", 1) == 0:  # numpy scalar
            return _round_any(v.item())
        return v
    if isinstance(v, float):
        return round_float(v)
    if isinstance(v, dict):
        return {k: _round_any(x) for k, x in v.items()}
    return type(v)(_round_any(x) for x in v) if isinstance(v, list) else [_round_any(x) for x in v]


def readable_value(v: Any) -> Any:
    """One metadata value for reading: floats rounded (plain, ``MetadataValue.float``, JSON, tables)."""
    if isinstance(v, dg.FloatMetadataValue):
        return dg.MetadataValue.float(round_float(v.value)) if v.value is not None else v
    if isinstance(v, dg.JsonMetadataValue):
        return dg.MetadataValue.json(_round_any(v.data))
    if isinstance(v, dg.TableMetadataValue):
        records = [dg.TableRecord(_round_any(dict(r.data))) for r in v.records]
        return dg.MetadataValue.table(records, schema=v.schema)
    if isinstance(v, float | dict | list) or (hasattr(v, "item") and hasattr(v, "dtype")):
        return _round_any(v)
    return v


def readable(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A metadata mapping with every float rounded for reading (see :func:`readable_value`)."""
    if metadata is None:
        return None
    return {k: readable_value(v) for k, v in metadata.items()}


def _fmt(v: Any) -> str:
    if hasattr(v, "item") and hasattr(v, "dtype"):  # numpy scalar
        v = v.item()
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        r = round_float(v)
        return str(int(r)) if r.is_integer() and abs(r) < 1e15 else repr(r)
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
    """Embed a PNG in the UI (markdown with a data URI) so it shows without file access.

    A full-size plot is far above the UI's inline limit (:data:`INLINE_MD_LIMIT`), so Dagster 1.13
    shows it behind "[Show Markdown]"; pair it with a :func:`sparkline` for an inline view."""
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


# Dagster 1.13's UI renders a markdown metadata value inline (in the asset's and the check's metadata
# tables) only when it is shorter than 1000 characters; longer ones sit behind "[Show Markdown]"
# (ui-core/src/metadata/MetadataEntry.tsx: ``expandSmallValues && entry.mdStr.length < 1000``). Data
# URIs are allowed in its markdown, so a small palette PNG renders inline; a full plot (tens of KB)
# cannot, and stays behind the button (:func:`image`).
INLINE_MD_LIMIT = 1000
_SPARK_COLOURS = [(255, 255, 255), (31, 119, 180), (255, 127, 14), (44, 160, 44)]


def _spark_png(series: Sequence[Sequence[float]], width: int, height: int, points: int) -> str:
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.new("P", (width, height), 0)
    palette = [c for rgb in _SPARK_COLOURS for c in rgb]
    img.putpalette(palette + [0] * (768 - len(palette)))
    draw = ImageDraw.Draw(img)
    arrays = []
    for s in series:
        a = np.asarray(s, dtype=float)
        a = a[np.isfinite(a)]
        if a.size > points:  # keep the shape: evenly spaced samples, the last point included
            a = a[np.linspace(0, a.size - 1, points).round().astype(int)]
        arrays.append(a)
    finite = [a for a in arrays if a.size]
    if finite:
        lo = min(float(a.min()) for a in finite)
        hi = max(float(a.max()) for a in finite)
        span = hi - lo if hi > lo else 1.0
        for colour, a in enumerate(arrays[: len(_SPARK_COLOURS) - 1], start=1):
            if a.size == 1:
                a = np.repeat(a, 2)
            if a.size:
                xs = np.linspace(1, width - 2, a.size)
                ys = (height - 2) - (a - lo) / span * (height - 3)
                draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=colour, width=1)
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True, bits=2)
    return base64.b64encode(buf.getvalue()).decode()


def sparkline(series: Mapping[str, Sequence[float]], title: str = "") -> dg.MetadataValue:
    """A tiny line chart of one to three series that the UI shows inline (markdown < 1000 characters).

    Colours in order: blue, orange, green; the legend and the range are written beside it. Long series
    are sampled evenly (the shape, not every point); the full plot stays available through :func:`image`.
    """
    names = list(series)[: len(_SPARK_COLOURS) - 1]
    values = [list(series[n]) for n in names]
    legend = ", ".join(f"{n} ({c})" for n, c in zip(names, ("blue", "orange", "green"), strict=False))
    finite = [float(v) for s in values for v in s if isinstance(v, int | float) and math.isfinite(v)]
    rng = f" {_fmt(min(finite))} .. {_fmt(max(finite))}" if finite else ""
    caption = f"{title + ': ' if title else ''}{legend};{rng}"
    for width, height, points in ((160, 40, 80), (120, 32, 50), (80, 24, 30)):
        md = f"![{title or 'chart'}](data:image/png;base64,{_spark_png(values, width, height, points)})  \n{caption}"
        if len(md) < INLINE_MD_LIMIT:
            return dg.MetadataValue.md(md)
    return dg.MetadataValue.md(caption)  # no chart fits: the numbers only (never hidden behind a button)
