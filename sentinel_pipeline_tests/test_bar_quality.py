"""Bar-quality flags on hand-made bars: each planted quirk found with the right count and example,
calendar-aware holes, optional segments, nothing dropped, and the default synthetic market unflagged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.data.bar_quality import (
    FLAG_COLUMNS,
    QUIRK_BITS,
    BarQualityConfig,
    apply_segments,
    assess_bars,
    base_symbol,
    segment_name,
    split_like,
)
from sentinel_pipeline.data.features import compute_features, warmup_bars
from sentinel_pipeline.data.raw_bars import IngestConfig, RawDataError, load_raw_bars, write_ingest_result
from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig, generate_synthetic_market
from sentinel_pipeline_tests.test_raw_bars import check_accounting, write

N_DAYS = 120


def walk(symbol: str, ts: pd.DatetimeIndex, seed: int, start: float = 50.0) -> pd.DataFrame:
    """Quiet random-walk bars (daily vol 1%): none of them is a quirk at the default thresholds."""
    rng = np.random.default_rng(seed)
    n = len(ts)
    close = start * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    open_ = np.r_[start, close[:-1]] * np.exp(rng.normal(0, 0.002, n))
    spread = np.abs(rng.normal(0, 0.004, (2, n)))
    return pd.DataFrame({
        "symbol": symbol,
        "timestamp": ts,
        "open": open_,
        "high": np.maximum(open_, close) * (1 + spread[0]),
        "low": np.minimum(open_, close) * (1 - spread[1]),
        "close": close,
        "volume": rng.integers(1_000, 5_000, n).astype(float),
    })


def business_days(start: str, n: int) -> pd.DatetimeIndex:
    return pd.bdate_range(start, periods=n, tz="UTC")


def planted_panel() -> tuple[pd.DataFrame, dict[str, pd.Timestamp]]:
    """One symbol per quirk (plus a clean one); returns the bars and where each quirk was planted."""
    days = business_days("2015-01-05", N_DAYS)
    where: dict[str, pd.Timestamp] = {}
    frames = []

    spike = walk("A_SPIKE", days, 1)
    spike.loc[40, "low"] = 0.01  # a bad tick inside its own bar's range: no row check catches it
    where["spike"] = days[40]
    frames.append(spike)

    split = walk("B_SPLIT", days, 2, start=700.0)
    split.loc[60:, ["open", "high", "low", "close"]] /= 7.0  # unadjusted 7:1 split at bar 60
    split.loc[60:, "volume"] *= 7.0
    where["jump"] = days[60]
    frames.append(split)

    zero = walk("C_ZEROVOL", days, 3)
    zero.loc[30:34, "volume"] = 0.0  # 5 bars
    where["zero_volume_run"] = days[30]
    frames.append(zero)

    flat = walk("D_FLAT", days, 4)
    prev = flat.loc[69, "close"]
    flat.loc[70:73, ["open", "high", "low", "close"]] = prev  # 4 forward-filled bars
    where["flat_run"] = days[70]
    frames.append(flat)

    # two years without a bar, then another company under the same ticker at another price level
    before = business_days("2014-01-06", 60)
    after = business_days("2016-06-06", 60)
    hole = pd.concat([walk("E_HOLE", before, 5, 40.0), walk("E_HOLE", after, 6, 40.0)], ignore_index=True)
    where["hole"] = after[0]
    frames.append(hole)

    frames.append(walk("F_CLEAN", days, 7))
    return pd.concat(frames, ignore_index=True), where


@pytest.fixture(scope="module")
def planted() -> tuple[pd.DataFrame, dict[str, pd.Timestamp], object]:
    bars, where = planted_panel()
    return bars, where, assess_bars(bars)


def _flagged(flags: pd.DataFrame, column: str) -> list[tuple[str, pd.Timestamp]]:
    f = flags[flags[column]]
    return list(zip(f["symbol"], f["timestamp"], strict=True))


def test_flags_table_is_aligned_and_typed(planted):
    bars, _, q = planted
    flags = q.flags
    assert tuple(flags.columns) == FLAG_COLUMNS and len(flags) == len(bars)
    assert isinstance(flags.index, pd.RangeIndex)
    assert (flags["symbol"].to_numpy() == bars["symbol"].to_numpy()).all()
    assert (flags["timestamp"] == bars["timestamp"]).all()
    assert flags["quirks"].dtype == np.uint8 and flags["segment"].dtype == np.int32
    bits = np.zeros(len(flags), dtype=np.uint8)
    for kind, col in (("jump", "jump"), ("spike", "spike"), ("zero_volume_run", "zero_volume_run"),
                      ("flat_run", "flat_run"), ("hole", "after_hole")):
        bits |= np.where(flags[col], QUIRK_BITS[kind], 0).astype(np.uint8)
    np.testing.assert_array_equal(flags["quirks"].to_numpy(), bits)
    json.dumps(q.report)


def test_planted_low_of_one_cent_is_a_spike(planted):
    _, where, q = planted
    assert _flagged(q.flags, "spike") == [("A_SPIKE", where["spike"])]
    rep = q.report["spikes"]
    assert (rep["n"], rep["n_low"], rep["n_high"]) == (1, 1, 0)
    (ex,) = rep["examples"]
    assert ex["symbol"] == "A_SPIKE" and ex["timestamp"] == where["spike"].isoformat()
    assert ex["side"] == "low" and ex["value"] == 0.01 and ex["neighbours"] > 40
    assert ex["log_excess"] == pytest.approx(math.log(ex["neighbours"] / 0.01), rel=1e-3)
    assert rep["by_symbol"] == {"A_SPIKE": 1}


def test_unadjusted_7_to_1_split_is_a_jump(planted):
    bars, where, q = planted
    assert _flagged(q.flags, "jump") == [("B_SPLIT", where["jump"])]
    rep = q.report["jumps"]
    assert rep["n"] == 1 and rep["n_split_like"] == 1
    (ex,) = rep["examples"]
    assert ex["symbol"] == "B_SPLIT" and ex["timestamp"] == where["jump"].isoformat()
    assert ex["split_like"] == "7:1" and ex["price_ratio"] == pytest.approx(7.0, rel=0.05)
    assert ex["log_return"] == pytest.approx(-math.log(7.0), abs=0.05)
    # the split moves the bar and its successor: not a spike
    assert not q.flags.loc[q.flags["symbol"] == "B_SPLIT", "spike"].any()


def test_zero_volume_and_flat_runs(planted):
    _, where, q = planted
    zero, flat = q.report["zero_volume_runs"], q.report["flat_runs"]
    assert (zero["n_runs"], zero["n_bars"], zero["longest"]) == (1, 5, 5)
    assert zero["examples"] == [{"symbol": "C_ZEROVOL", "start": where["zero_volume_run"].isoformat(),
                                 "end": (where["zero_volume_run"] + pd.offsets.BDay(4)).isoformat(), "bars": 5}]
    assert {s for s, _ in _flagged(q.flags, "zero_volume_run")} == {"C_ZEROVOL"}
    assert (flat["n_runs"], flat["n_bars"], flat["longest"]) == (1, 4, 4)
    assert flat["examples"][0]["symbol"] == "D_FLAT" and flat["examples"][0]["start"] == where["flat_run"].isoformat()
    assert len(_flagged(q.flags, "flat_run")) == 4
    assert zero["symbols_entirely"] == [] and flat["symbols_entirely"] == []


def test_two_year_hole_is_found_and_nothing_else_is_a_hole(planted):
    _, where, q = planted
    assert _flagged(q.flags, "after_hole") == [("E_HOLE", where["hole"])]
    rep = q.report["holes"]
    assert rep["n"] == 1 and rep["by_symbol"] == {"E_HOLE": 1}
    (ex,) = rep["examples"]
    last_before = pd.Timestamp("2014-01-06", tz="UTC") + pd.offsets.BDay(59)
    expected_missed = np.busday_count(last_before.date(), where["hole"].date()) - 1
    assert ex["missed_bars"] == expected_missed > 500  # about two years of daily bars
    assert ex["previous"] == last_before.isoformat() and ex["timestamp"] == where["hole"].isoformat()
    # the hole comes with a level change, but the flags of the other symbols stay clean
    assert q.report["n_symbols_flagged"] == 5
    assert not q.flags.loc[q.flags["symbol"] == "F_CLEAN", "quirks"].any()


def test_examples_are_capped_and_worst_first():
    days = business_days("2020-01-06", 200)
    bars = walk("X", days, 11)
    for k, bar in enumerate((20, 50, 80, 110, 140, 170)):
        bars.loc[bar:, ["open", "high", "low", "close"]] *= 1.5 + 0.5 * k  # growing jumps
    q = assess_bars(bars, BarQualityConfig(n_examples=3))
    rep = q.report["jumps"]
    assert rep["n"] == 6 and len(rep["examples"]) == 3
    moves = [abs(e["log_return"]) for e in rep["examples"]]
    assert moves == sorted(moves, reverse=True) and moves[0] == pytest.approx(math.log(4.0), abs=0.05)


# -- calendar awareness -------------------------------------------------------------------------
def hourly_session(start: str, n_days: int, skip: tuple[int, ...] = ()) -> pd.DatetimeIndex:
    """7 hourly bars 14:30..20:30 UTC per business day, without the days at positions ``skip``."""
    days = [d for k, d in enumerate(pd.bdate_range(start, periods=n_days)) if k not in skip]
    return pd.DatetimeIndex([d + pd.Timedelta(hours=14.5 + h) for d in days for h in range(7)]).tz_localize("UTC")


def test_weekends_and_nights_are_not_holes_missing_days_are():
    # an ordinary holiday (1 day = 7 bars) is below the default 20; a missing week (5 days = 35 bars) is a hole
    ts = hourly_session("2021-03-01", 80, skip=(10, 40, 41, 42, 43, 44))
    q = assess_bars(walk("H", ts, 3, 100.0))
    missed = q.flags["missed_bars"].to_numpy()
    assert sorted(np.unique(missed).tolist()) == [0.0, 7.0, 35.0]
    assert q.report["holes"]["n"] == 1 and q.report["holes"]["examples"][0]["missed_bars"] == 35.0
    # 24-hour bars (FX): the weekend is no hole either, a missing weekday is 24 bars
    fx = pd.date_range("2021-03-01", periods=24 * 7 * 8, freq="h", tz="UTC")
    fx = fx[fx.day_of_week < 5]
    fx = fx[~((fx >= "2021-03-17") & (fx < "2021-03-18"))]
    q = assess_bars(walk("FX", fx, 4, 1.2))
    assert sorted(np.unique(q.flags["missed_bars"]).tolist()) == [0.0, 24.0]
    assert q.report["holes"]["n"] == 1
    assert assess_bars(walk("FX", fx, 4, 1.2), BarQualityConfig(hole_bars=25)).report["holes"]["n"] == 0


def test_weekly_bars_are_measured_in_their_own_spacing():
    weeks = pd.date_range("2010-01-04", periods=150, freq="7D", tz="UTC")
    weeks = weeks.delete(range(60, 90))  # 30 weeks missing
    q = assess_bars(walk("W", weeks, 5))
    assert q.report["holes"]["n"] == 1
    assert q.report["holes"]["examples"][0]["missed_bars"] == 30.0


# -- segments -----------------------------------------------------------------------------------
def test_split_at_hole_renames_later_segments_and_keeps_every_row(tmp_path: Path):
    bars, where = planted_panel()
    write(bars.sample(frac=1.0, random_state=0), tmp_path / "raw" / "bars.parquet")  # unsorted on disk
    cfg = IngestConfig(quality=BarQualityConfig(split_at_hole_bars=100))
    result = load_raw_bars(tmp_path / "raw", cfg)
    check_accounting(result)
    out = result.bars
    assert result.report["n_rows_in"] == len(bars) == len(out) + len(result.quarantine)
    assert sorted(out["symbol"].unique()) == ["A_SPIKE", "B_SPLIT", "C_ZEROVOL", "D_FLAT", "E_HOLE", "E_HOLE~2",
                                              "F_CLEAN"]
    assert out.loc[out["symbol"] == "E_HOLE~2", "timestamp"].min() == where["hole"]
    assert (out.loc[out["symbol"] == "E_HOLE", "timestamp"] < where["hole"]).all()
    assert result.report["n_symbols"] == 7 and result.report["rows_per_symbol_min"] == 60
    seg = result.report["bar_quality"]["segments"]
    assert seg["n_segments_added"] == 1 and seg["n_symbols_split"] == 1
    assert seg["examples"][0] == {"symbol": "E_HOLE~2", "first": where["hole"].isoformat(),
                                  "last": out["timestamp"][out["symbol"] == "E_HOLE~2"].max().isoformat(), "rows": 60}
    # values untouched: renaming back gives the input rows
    back = out.assign(symbol=out["symbol"].map(base_symbol)).sort_values(["symbol", "timestamp"], ignore_index=True)
    pd.testing.assert_frame_equal(back, bars.sort_values(["symbol", "timestamp"], ignore_index=True),
                                  check_dtype=False)
    # the flags follow the bars
    flags = result.flags
    assert (flags["symbol"].to_numpy() == out["symbol"].to_numpy()).all() and (flags["timestamp"] == out["timestamp"]).all()
    assert flags.loc[flags["symbol"] == "E_HOLE~2", "segment"].eq(1).all()
    # features restart after the hole: no feature window spans it
    feats = compute_features(out)
    seg2 = feats[feats["symbol"] == "E_HOLE~2"]
    assert not seg2["feature_valid"].iloc[: warmup_bars()].any()
    # without the option the symbol stays whole and only the flag says where the hole is
    whole = load_raw_bars(tmp_path / "raw").bars
    assert "E_HOLE~2" not in set(whole["symbol"]) and len(whole) == len(bars)


def test_segment_name_clash_is_a_clear_error(tmp_path: Path):
    bars, _ = planted_panel()
    impostor = walk("E_HOLE~2", business_days("2015-01-05", 10), 9)
    write(pd.concat([bars, impostor], ignore_index=True), tmp_path / "raw" / "bars.parquet")
    with pytest.raises(RawDataError, match="E_HOLE~2"):
        load_raw_bars(tmp_path / "raw", IngestConfig(quality=BarQualityConfig(split_at_hole_bars=100)))


def test_apply_segments_without_cuts_is_the_identity():
    bars, _ = planted_panel()
    q = assess_bars(bars)
    same_bars, same_flags = apply_segments(bars, q.flags, q.segment)
    assert same_bars is bars and same_flags is q.flags
    assert segment_name("AAPL", 0) == "AAPL" and segment_name("AAPL", 2) == "AAPL~3"
    assert base_symbol("AAPL~3") == "AAPL" and base_symbol("BRK~B") == "BRK~B" and base_symbol("~2") == "~2"


# -- the raw stage ------------------------------------------------------------------------------
def test_raw_stage_flags_but_never_drops(tmp_path: Path):
    bars, _ = planted_panel()
    broken = bars.iloc[[3, 4]].copy()
    broken["close"] = np.nan  # the row checks still quarantine what they always did
    write(pd.concat([bars, broken], ignore_index=True), tmp_path / "raw" / "bars.parquet")
    result = load_raw_bars(tmp_path / "raw")
    check_accounting(result)
    rep = result.report
    assert rep["n_rows_in"] == len(bars) + 2 == rep["n_rows_out"] + rep["n_quarantined"]
    assert rep["n_quarantined"] == 2 and len(result.bars) == len(bars) == len(result.flags)
    pd.testing.assert_frame_equal(result.bars, bars.sort_values(["symbol", "timestamp"], ignore_index=True),
                                  check_dtype=False)
    quality = rep["bar_quality"]
    counts = {k: quality[k]["n"] for k in ("jumps", "spikes", "holes")}
    assert counts == {"jumps": 1, "spikes": 1, "holes": 1}
    assert quality["zero_volume_runs"]["n_runs"] == 1 and quality["flat_runs"]["n_runs"] == 1
    assert quality["config"] == BarQualityConfig().to_dict()
    out = tmp_path / "out"
    write_ingest_result(result, out / "bars.parquet", out / "q.parquet", out / "report.json", out / "flags.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "flags.parquet"), result.flags)
    assert json.loads((out / "report.json").read_text())["bar_quality"] == quality


def test_default_synthetic_market_is_not_flagged():
    q = assess_bars(generate_synthetic_market(SyntheticMarketConfig()))
    rep = q.report
    assert rep["n_bars_flagged"] == 0, {k: rep[k] for k in ("jumps", "spikes", "holes")}
    assert rep["jumps"]["n"] == rep["spikes"]["n"] == rep["holes"]["n"] == 0
    assert rep["zero_volume_runs"]["n_runs"] == rep["flat_runs"]["n_runs"] == 0


# -- config and helpers -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {"jump_log_return": 0.0}, {"jump_log_return": float("nan")}, {"spike_log_excess": -1.0},
    {"zero_volume_run_bars": 0}, {"flat_run_bars": 1.5}, {"hole_bars": 0}, {"split_at_hole_bars": 0},
    {"n_examples": -1}, {"hole_bars": True},
])
def test_bad_config_raises(kwargs: dict):
    with pytest.raises(ValueError, match="BarQualityConfig"):
        BarQualityConfig(**kwargs)


def test_config_is_frozen_and_json():
    cfg = BarQualityConfig(split_at_hole_bars=250)
    with pytest.raises(AttributeError):
        cfg.hole_bars = 5  # type: ignore[misc]
    assert json.loads(json.dumps(cfg.to_dict()))["split_at_hole_bars"] == 250


@pytest.mark.parametrize("ratio,expected", [
    (6.994, "7:1"), (2.03, "2:1"), (1.49, "3:2"), (0.2447, "1:4"), (1 / 20.2, "1:20"),
    (2.675, None), (1.8, None), (1.1, None), (float("nan"), None),
])
def test_split_like(ratio: float, expected: str | None):
    assert split_like(ratio) == expected


def test_empty_and_single_bar_symbols():
    empty = walk("E", business_days("2020-01-06", 1), 1).iloc[:0]
    q = assess_bars(empty)
    assert len(q.flags) == 0 and q.report["n_bars_flagged"] == 0
    one = walk("S", business_days("2020-01-06", 1), 1)
    assert assess_bars(one).report["n_bars_flagged"] == 0


# -- UI metadata (the Dagster layer) ------------------------------------------------------------
def test_ui_metadata_of_the_quality_report_and_label_stats(planted):
    import dagster as dg

    from sentinel_pipeline.data.labels import LabelConfig, label_dataset
    from sentinel_pipeline.data_half import DataHalfConfig
    from sentinel_pipeline.orchestration.data_assets import (
        DataHalfSettings,
        label_quirk_metadata,
        quality_metadata,
    )

    # the resource's defaults are the stage defaults, quirk settings included
    assert DataHalfSettings().to_config() == DataHalfConfig()
    custom = DataHalfSettings(split_at_hole_bars=250, hole_bars=30, protect_labels_from=["hole"], target_clip_atr=None)
    cfg = custom.to_config()
    assert cfg.ingest.quality.split_at_hole_bars == 250 and cfg.ingest.quality.hole_bars == 30
    assert cfg.labels.protect_from == ("hole",) and cfg.labels.target_clip_atr is None

    bars, _, q = planted
    md = quality_metadata(q.report)
    assert (md["quirk_jumps"], md["quirk_spikes"], md["quirk_holes"]) == (1, 1, 1)
    assert (md["quirk_zero_volume_runs"], md["quirk_flat_runs"], md["quirk_zero_volume_bars"]) == (1, 1, 5)
    assert md["quirk_longest_hole_bars"] == round(q.report["holes"]["longest_missed_bars"], 1)
    table = md["quirk_examples"]
    assert isinstance(table, dg.MarkdownMetadataValue)
    text = table.value
    assert text.startswith("| kind | symbol | timestamp | value | detail |")
    assert "like a 7:1 split" in text and "| spike (low) | A_SPIKE |" in text and "| 0.01 |" in text
    assert "| hole | E_HOLE |" in text and "| zero-volume run | C_ZEROVOL |" in text
    assert all(line.count("|") == 6 for line in text.splitlines())  # no stray pipes in the cells
    thresholds = md["quirk_thresholds"].value.splitlines()
    assert "| split at hole bars >= | off |" in thresholds  # split_at_hole_bars is off by default
    assert len(thresholds) == 8 and all(line.count("|") == 3 for line in thresholds)
    assert quality_metadata({}) == {}

    labelled, stats = label_dataset(bars.assign(atr=bars["close"] * 0.01), LabelConfig(), q.flags["quirks"].to_numpy())
    lmd = label_quirk_metadata(stats)
    assert lmd["ineligible_quirk_total"] == stats["quirk_protection"]["n_ineligible_quirk_total"] > 0
    assert "| hole |" in lmd["ineligible_by_quirk"].value and lmd["target_clip_atr"] == 20.0
    clipped = lmd["targets_clipped"].value.splitlines()
    assert clipped[0] == "| target | clipped | max abs before clip |" and len(clipped) == 2 + 4
    assert all(line.count("|") == 4 for line in clipped)  # no stray pipes in the cells
