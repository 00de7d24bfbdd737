"""A slow, obviously-correct reference for ``sentinel_pipeline.data.labels``: one event at a time.

Written independently of the numba kernel (it shares only ``LabelConfig`` and the quirk bit values):
for each requested row it takes the row's symbol as a pandas frame, slices the future bars with
``iloc`` and applies the rules of docs/architecture.md "Stage 3" literally, including the bar-quirk
rule (a window meeting a protected quirk is ineligible) and the clipping of ATR-unit targets. Bar
quirks come from an optional ``quirks`` column of the frame. The tests compare ``label_dataset`` with it, and
``bench/bench_labels.py`` times it as the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from sentinel_pipeline.data.bar_quality import QUIRK_BITS
from sentinel_pipeline.data.labels import LABEL_CLIPPED, LabelConfig

BAR_LEVEL = ("spike", "zero_volume_run", "flat_run")  # properties of a bar: the entry bar counts too
STEP_LEVEL = ("jump", "hole")  # properties of the step into a bar: only the future bars count


def _ineligible(config: LabelConfig) -> dict[str, object]:
    row: dict[str, object] = {
        "tb_label": 0,
        "tb_both_touched": False,
        "tb_touch_time": pd.NaT,
        "tb_bars_to_touch": -1,
        "tb_return": math.nan,
        "tb_return_atr": math.nan,
    }
    for h in config.fwd_horizons:
        row[f"fwd_ret_{h}"] = math.nan
    e = config.excursion_bars
    row[f"mfe_{e}"] = math.nan
    row[f"mae_{e}"] = math.nan
    row["early_move"] = math.nan
    row["label_eligible"] = False
    row["label_quirks"] = 0
    return row


def _met_quirks(bars: pd.DataFrame, pos: int, window: int) -> int:
    """The quirk bits that the window of the bar at ``pos`` meets (bars up to ``pos + window`` that exist)."""
    if "quirks" not in bars.columns:
        return 0
    q = [int(x) for x in bars["quirks"].iloc[pos : pos + 1 + window]]
    met = 0
    for kind in BAR_LEVEL:
        if any(x & QUIRK_BITS[kind] for x in q):
            met |= QUIRK_BITS[kind]
    for kind in STEP_LEVEL:
        if any(x & QUIRK_BITS[kind] for x in q[1:]):
            met |= QUIRK_BITS[kind]
    return met


def reference_label_event(bars: pd.DataFrame, pos: int, config: LabelConfig) -> dict[str, object]:
    """Label the bar at position ``pos`` of ``bars`` (one symbol's bars, time-ordered, RangeIndex)."""
    window = max(config.horizon, max(config.fwd_horizons), config.excursion_bars)
    future = bars.iloc[pos + 1 : pos + 1 + window]
    c = float(bars["close"].iat[pos])
    a = float(bars["atr"].iat[pos])
    met = _met_quirks(bars, pos, window)
    protected = any(met & QUIRK_BITS[kind] for kind in config.protect_from)
    if len(future) < window or not (math.isfinite(a) and a > 0) or protected:
        row = _ineligible(config)
        row["label_quirks"] = met
        return row

    row: dict[str, object] = {}
    upper = c + config.pt * a
    lower = c - config.sl * a
    path = future.iloc[: config.horizon]
    up = (path["high"] >= upper).to_numpy()
    down = (path["low"] <= lower).to_numpy()
    touched = np.flatnonzero(up | down)
    if touched.size:
        k = int(touched[0])
        if down[k]:
            row["tb_label"] = -1
            row["tb_both_touched"] = bool(up[k])
            row["tb_return"] = -config.sl * a / c
            row["tb_return_atr"] = -config.sl
        else:
            row["tb_label"] = 1
            row["tb_both_touched"] = False
            row["tb_return"] = config.pt * a / c
            row["tb_return_atr"] = config.pt
        row["tb_touch_time"] = path["timestamp"].iloc[k]
        row["tb_bars_to_touch"] = k + 1
    else:
        last = path.iloc[-1]
        row["tb_label"] = 0
        row["tb_both_touched"] = False
        row["tb_touch_time"] = last["timestamp"]
        row["tb_bars_to_touch"] = config.horizon
        row["tb_return"] = float(last["close"]) / c - 1.0
        row["tb_return_atr"] = (float(last["close"]) - c) / a

    for h in config.fwd_horizons:
        row[f"fwd_ret_{h}"] = float(future["close"].iloc[h - 1]) / c - 1.0

    e = config.excursion_bars
    near = future.iloc[:e]
    mfe = max(float(near["high"].max()) - c, 0.0) / a
    mae = max(c - float(near["low"].min()), 0.0) / a
    bound = config.target_clip_atr
    if bound is not None and (mfe > bound or mae > bound or abs(float(row["tb_return_atr"])) > bound):
        met |= LABEL_CLIPPED
        mfe, mae = min(mfe, bound), min(mae, bound)
        row["tb_return_atr"] = max(-bound, min(bound, float(row["tb_return_atr"])))
    row[f"mfe_{e}"] = mfe
    row[f"mae_{e}"] = mae
    row["early_move"] = mfe - mae
    row["label_eligible"] = True
    row["label_quirks"] = met
    return row


def reference_label_dataset(
    df: pd.DataFrame, config: LabelConfig, rows: Sequence[int] | None = None
) -> pd.DataFrame:
    """The label columns for ``rows`` of ``df`` (all rows when None), indexed by those row numbers.

    ``df`` has ``symbol, timestamp, high, low, close, atr``, sorted by (symbol, timestamp).
    """
    df = df.reset_index(drop=True)
    wanted = range(len(df)) if rows is None else rows
    by_symbol = {sym: g.reset_index() for sym, g in df.groupby("symbol", sort=False)}
    # position of each row inside its symbol's frame
    position = df.groupby("symbol", sort=False).cumcount().to_numpy()
    records = []
    for r in wanted:
        bars = by_symbol[df.at[r, "symbol"]]
        records.append(reference_label_event(bars, int(position[r]), config))
    out = pd.DataFrame.from_records(records, index=list(wanted), columns=list(_ineligible(config)))
    out["tb_label"] = out["tb_label"].astype("int8")
    out["tb_both_touched"] = out["tb_both_touched"].astype(bool)
    out["tb_bars_to_touch"] = out["tb_bars_to_touch"].astype("int32")
    out["tb_touch_time"] = pd.to_datetime(out["tb_touch_time"], utc=True).astype(df["timestamp"].dtype)
    out["label_eligible"] = out["label_eligible"].astype(bool)
    out["label_quirks"] = out["label_quirks"].astype("uint8")
    return out
