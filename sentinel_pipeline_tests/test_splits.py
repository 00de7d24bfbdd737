"""Stage 4: chronological splits with purge and embargo, checked from the timestamps themselves."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.data.splits import SPLIT_NAMES, SplitConfig, assign_splits, purge_violations

START = pd.Timestamp("2022-01-03", tz="UTC")


def panel(
    rng: np.random.Generator, n_times: int = 300, n_symbols: int = 5, label_window: int = 6
) -> pd.DataFrame:
    """Symbols on a shared, unevenly spaced clock; some start late, some end early, some skip bars."""
    clock = START + pd.to_timedelta(np.cumsum(rng.choice([1, 1, 1, 3, 17], size=n_times)), unit="h")
    frames = []
    for s in range(n_symbols):
        first = 0 if s % 2 == 0 else int(rng.integers(1, n_times // 3))
        last = n_times if s % 3 else int(rng.integers(2 * n_times // 3, n_times))
        keep = np.arange(first, last)
        keep = keep[rng.random(keep.size) > 0.1]  # gaps of their own
        n = keep.size
        eligible = np.arange(n) < n - label_window  # the label window must exist
        eligible &= rng.random(n) > 0.05  # e.g. invalid ATR
        frames.append(
            pd.DataFrame(
                {
                    "symbol": f"SYM{s}",
                    "timestamp": clock[keep],
                    "label_eligible": eligible,
                    "feature_valid": np.arange(n) >= 3,  # warm-up
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def bar_ahead_ts(df: pd.DataFrame, k: int) -> pd.Series:
    """Per row, the timestamp of the bar ``k`` bars later in the same symbol (NaT when there is none)."""
    return df.groupby("symbol", sort=False)["timestamp"].shift(-k)


def check_invariants(
    df: pd.DataFrame, a: pd.DataFrame, summary: dict, label_window: int, embargo: int
) -> None:
    assert isinstance(a.index, pd.RangeIndex) and len(a) == len(df)
    assert list(a.columns) == ["split", "purged", "embargoed", "sample_ok"]
    assert set(a["split"].unique()) == set(SPLIT_NAMES)  # exactly one split per row, all three used
    ts = df["timestamp"]
    sample = a["sample_ok"]
    expected_ok = df["label_eligible"] & df.get("feature_valid", True) & ~a["purged"] & ~a["embargoed"]
    assert (sample == expected_ok).all()

    # chronological, over rows and over samples
    for x, y in (("train", "val"), ("val", "test")):
        assert ts[a["split"] == x].max() < ts[a["split"] == y].min()
        assert ts[sample & (a["split"] == x)].max() < ts[sample & (a["split"] == y)].min()

    # no sample's label window (t .. t + label_window bars) reaches the first timestamp of a later split
    window_end = bar_ahead_ts(df, label_window)
    val_start = ts[a["split"] == "val"].min()
    test_start = ts[a["split"] == "test"].min()
    assert str(val_start.isoformat()) == summary["cuts"]["val_start"]
    assert str(test_start.isoformat()) == summary["cuts"]["test_start"]
    for name, next_start in (("train", val_start), ("val", test_start)):
        ends = window_end[sample & (a["split"] == name)]
        assert ends.notna().all() and (ends < next_start).all()

    # embargo: the first `embargo` distinct timestamps at/after each cut hold no sample
    distinct = np.sort(ts.unique())
    for cut in (val_start, test_start):
        i = int(np.searchsorted(distinct, cut))
        banned = set(distinct[i : i + embargo])
        assert len(banned) == min(embargo, len(distinct) - i)
        in_banned = ts.isin(banned)
        assert a.loc[in_banned, "embargoed"].all() and not sample[in_banned].any()
    n_banned = sum(
        min(embargo, len(distinct) - int(np.searchsorted(distinct, c))) for c in (val_start, test_start)
    )
    assert ts[a["embargoed"]].nunique() == n_banned

    # the summary agrees with the table and is JSON-able
    json.loads(json.dumps(summary))
    for name in SPLIT_NAMES:
        m = a["split"] == name
        info = summary["splits"][name]
        assert info["rows"] == int(m.sum()) and info["samples"] == int((m & sample).sum())
        assert info["n_purged"] == int((m & a["purged"]).sum())
        assert info["n_embargoed"] == int((m & a["embargoed"]).sum())
        assert info["n_symbols"] == df["symbol"][m].nunique() and info["n_timestamps"] == ts[m].nunique()
        assert info["time_min"] == ts[m].min().isoformat() and info["time_max"] == ts[m].max().isoformat()
    assert summary["n_rows"] == len(df) and summary["n_samples"] == int(sample.sum())
    # and the asset check's re-verification agrees
    check = purge_violations(df[["symbol", "timestamp"]], a, label_window, embargo)
    assert check["n_violations"] == 0, check
    json.dumps(check)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("embargo", [0, 4])
def test_fraction_splits_are_leak_free(seed: int, embargo: int) -> None:
    rng = np.random.default_rng(seed)
    label_window = int(rng.integers(1, 12))
    df = panel(rng, label_window=label_window)
    config = SplitConfig(train_frac=0.6, val_frac=0.2, embargo_bars=embargo)
    a, summary = assign_splits(df, config, label_window)
    check_invariants(df, a, summary, label_window, embargo)
    # cut points are the fractions of the distinct timestamps over all symbols
    distinct = np.sort(df["timestamp"].unique())
    n_u = len(distinct)
    assert summary["cuts"]["val_start"] == pd.Timestamp(distinct[round(0.6 * n_u)]).isoformat()
    assert summary["cuts"]["test_start"] == pd.Timestamp(distinct[round(0.8 * n_u)]).isoformat()


def test_purge_marks_exactly_the_rows_whose_window_crosses_a_cut() -> None:
    rng = np.random.default_rng(11)
    df = panel(rng, label_window=5)
    a, _ = assign_splits(df, SplitConfig(embargo_bars=2, purge_bars=8), label_window=5)
    ahead = bar_ahead_ts(df, 8)
    split_rank = a["split"].map({n: k for k, n in enumerate(SPLIT_NAMES)})
    ts_rank = {n: df["timestamp"][a["split"] == n].min() for n in SPLIT_NAMES}
    ahead_rank = np.select([ahead >= ts_rank["test"], ahead >= ts_rank["val"]], [2, 1], 0)
    expected = ahead.isna() | (ahead_rank > split_rank)
    assert (a["purged"] == expected).all()
    assert (a["purged"] & ahead.notna()).any()  # some rows really are purged for crossing a cut
    check_invariants(df, a, _, 5, 2)


def test_hand_computed_single_symbol() -> None:
    # 20 hourly bars, train 10 / val 5 / test 5 timestamps; label window 2, embargo 1
    df = pd.DataFrame(
        {
            "symbol": "A",
            "timestamp": pd.date_range(START, periods=20, freq="h"),
            "label_eligible": np.arange(20) < 18,
        }
    )
    a, summary = assign_splits(df, SplitConfig(train_frac=0.5, val_frac=0.25, embargo_bars=1), label_window=2)
    assert a["split"].tolist() == ["train"] * 10 + ["val"] * 5 + ["test"] * 5
    assert np.flatnonzero(a["purged"]).tolist() == [8, 9, 13, 14, 18, 19]
    assert np.flatnonzero(a["embargoed"]).tolist() == [10, 15]
    assert np.flatnonzero(a["sample_ok"]).tolist() == [*range(8), 11, 12, 16, 17]
    assert summary["cuts"] == {
        "val_start": (START + pd.Timedelta(hours=10)).isoformat(),
        "test_start": (START + pd.Timedelta(hours=15)).isoformat(),
    }
    assert summary["splits"]["val"]["samples"] == 2 and summary["purge_bars"] == 2


def test_date_cuts() -> None:
    rng = np.random.default_rng(5)
    df = panel(rng, n_times=400, label_window=4)
    ts = np.sort(df["timestamp"].unique())
    train_end = pd.Timestamp(ts[200]) - pd.Timedelta(minutes=30)  # between two bars
    val_end = pd.Timestamp(ts[300])  # exactly a bar: that bar starts test
    config = SplitConfig(train_end=train_end.isoformat(), val_end=val_end.isoformat(), embargo_bars=3)
    a, summary = assign_splits(df, config, label_window=4)
    check_invariants(df, a, summary, 4, 3)
    assert summary["mode"] == "dates"
    assert summary["cuts"]["val_start"] == pd.Timestamp(ts[200]).isoformat()
    assert summary["cuts"]["test_start"] == val_end.isoformat()
    assert (df["timestamp"][a["split"] == "train"] < train_end).all()
    assert (df["timestamp"][a["split"] == "test"] >= val_end).all()
    # a naive date string is read as UTC
    naive = SplitConfig(
        train_end=train_end.tz_localize(None).isoformat(), val_end=val_end.tz_localize(None).isoformat()
    )
    a2, _ = assign_splits(df, naive, label_window=4)
    assert (a2["split"] == a["split"]).all()


def test_row_order_and_missing_feature_valid() -> None:
    rng = np.random.default_rng(2)
    df = panel(rng, label_window=3).drop(columns="feature_valid")
    a, summary = assign_splits(df, SplitConfig(), label_window=3)
    check_invariants(df, a, summary, 3, 5)
    assert (a["sample_ok"] == (df["label_eligible"] & ~a["purged"] & ~a["embargoed"])).all()
    # the assignment follows the input rows, whatever their index
    df2 = df.set_index(pd.RangeIndex(1000, 1000 + len(df)))
    a2, _ = assign_splits(df2, SplitConfig(), label_window=3)
    pd.testing.assert_frame_equal(a, a2)


def test_purge_violations_catches_tampered_assignments() -> None:
    rng = np.random.default_rng(9)
    df = panel(rng, label_window=4)
    a, _ = assign_splits(df, SplitConfig(embargo_bars=3), label_window=4)
    bars = df[["symbol", "timestamp"]]
    assert purge_violations(bars, a, 4, 3)["n_violations"] == 0

    unpurged = a.assign(sample_ok=a["sample_ok"] | (a["purged"] & df["label_eligible"] & ~a["embargoed"]))
    got = purge_violations(bars, unpurged, 4, 3)
    assert got["n_window_crossing_cut"] > 0 and got["n_violations"] >= got["n_window_crossing_cut"]
    unembargoed = a.assign(sample_ok=a["sample_ok"] | (a["embargoed"] & ~a["purged"] & df["label_eligible"]))
    assert purge_violations(bars, unembargoed, 4, 3)["n_embargo_violations"] > 0
    assert purge_violations(bars, unembargoed, 4, 0)["n_embargo_violations"] == 0  # no embargo asked for
    swapped = a.copy()
    swapped.loc[swapped.index[-1], "split"] = "train"  # a train row after the test cut
    assert purge_violations(bars, swapped, 4, 3)["n_order_violations"] > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"train_frac": 0.0}, "train_frac > 0"),
        ({"train_frac": 0.8, "val_frac": 0.2}, "train_frac \\+ val_frac < 1"),
        ({"val_frac": -0.1}, "val_frac > 0"),
        ({"train_end": "2022-02-01"}, "both train_end and val_end"),
        ({"train_end": "2022-02-01", "val_end": "2022-01-15"}, "must be after train_end"),
        ({"train_end": "not a date", "val_end": "2022-01-15"}, "cannot parse"),
        ({"embargo_bars": -1}, "embargo_bars"),
    ],
)
def test_bad_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SplitConfig(**kwargs)


def test_bad_data_raises() -> None:
    rng = np.random.default_rng(0)
    df = panel(rng, n_times=200, label_window=3)
    first, last = df["timestamp"].min(), df["timestamp"].max()
    with pytest.raises(ValueError, match="train would be empty"):
        assign_splits(df, SplitConfig(train_end=str(first), val_end=str(last)), 3)
    with pytest.raises(ValueError, match="test would be empty"):
        assign_splits(
            df,
            SplitConfig(
                train_end=str(first + pd.Timedelta(days=3)), val_end=str(last + pd.Timedelta(hours=1))
            ),
            3,
        )
    mid = np.sort(df["timestamp"].unique())[100]
    with pytest.raises(ValueError, match="val would be empty"):
        assign_splits(
            df,
            SplitConfig(
                train_end=str(mid + pd.Timedelta(minutes=1)), val_end=str(mid + pd.Timedelta(minutes=2))
            ),
            3,
        )
    tiny = df[df["timestamp"] <= np.sort(df["timestamp"].unique())[5]].reset_index(drop=True)
    with pytest.raises(ValueError, match="empty"):
        assign_splits(tiny, SplitConfig(train_frac=0.9, val_frac=0.05), 3)
    with pytest.raises(ValueError, match="no usable samples"):
        assign_splits(df, SplitConfig(train_frac=0.7, val_frac=0.15, embargo_bars=40), 3)
    with pytest.raises(ValueError, match="purge_bars \\(2\\) is shorter than the label window \\(3\\)"):
        assign_splits(df, SplitConfig(purge_bars=2), 3)
    with pytest.raises(ValueError, match="lacks required columns \\['label_eligible'\\]"):
        assign_splits(df.drop(columns="label_eligible"), SplitConfig(), 3)
    with pytest.raises(ValueError, match="sorted by"):
        assign_splits(df.iloc[::-1], SplitConfig(), 3)
