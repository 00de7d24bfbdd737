"""The whole data half on real market bars from ``../shared/data`` (skipped where absent).

``run_data_half`` runs raw parquet -> bars/quarantine -> features -> labels -> splits -> scalers ->
HDF5 -> Arrow cache on each real file on its own (daily S&P 500 panel, 619k rows x 505 symbols;
hourly US equities 1998-2021, 225k rows x 6 symbols). Real feeds carry holidays, half sessions,
unadjusted corporate-action jumps (splits of AAPL, reverse splits of VXX) and broken OHLC rows (23 in
the daily panel); none of that may crash a stage, and the quarantine must explain every raw row that
did not become a bar. The quirks that pass the row checks (jumps, spikes, holes) are flagged, no
eligible label window may contain one, and ATR-unit targets stay within the clip. Each file is processed whole (no subsampling): about 10 s for the daily panel on
two cores, 3 s for the hourly file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.data.arrow_cache import cache_matches_source, open_split
from sentinel_pipeline.data.dataset import read_dataset
from sentinel_pipeline.data.feature_contract import read_contract
from sentinel_pipeline.data.labels import label_window_bars
from sentinel_pipeline.data.raw_bars import QUARANTINE_REASONS, RAW_COLUMNS
from sentinel_pipeline.data.tables import read_frame
from sentinel_pipeline.data_half import DataHalfConfig, run_data_half
from sentinel_pipeline.paths import SPLITS, ArtifactPaths

pytestmark = pytest.mark.realdata

REAL_FILES = ("daily_equities_panel.parquet", "intraday_equities_h1.parquet")
CONFIG = DataHalfConfig(generate_default_when_empty=False)
LABEL_WINDOW = label_window_bars(CONFIG.labels)


@pytest.fixture(scope="module", params=REAL_FILES)
def run(request: pytest.FixtureRequest, shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``(source file, paths, stage summaries, wall seconds)`` of one data-half run on a real file."""
    name = request.param
    root = tmp_path_factory.mktemp(name.split(".")[0])
    raw = root / "raw"
    raw.mkdir()
    (raw / name).symlink_to(shared_data_dir / name)
    paths = ArtifactPaths(data_dir=root)
    t0 = time.perf_counter()
    results = run_data_half(paths, CONFIG, log=lambda _msg: None)
    seconds = time.perf_counter() - t0
    print(f"\n{name}: data half in {seconds:.1f}s: " + ", ".join(f"{k} {v.get('seconds', 0.0):.1f}s" for k, v in results.items()))
    return shared_data_dir / name, paths, results, seconds


def test_every_raw_row_is_a_bar_or_quarantined_with_a_reason(run):
    source, paths, results, _ = run
    raw = pd.read_parquet(source)
    bars = read_frame(paths.bars)
    q = pd.read_parquet(paths.quarantine)
    report = json.loads(paths.quality_report.read_text())
    assert len(raw) == report["n_rows_in"] == len(bars) + len(q)
    assert q["reason"].notna().all() and set(q["reason"]) <= set(QUARANTINE_REASONS)
    assert report["quarantine_by_reason"] == {r: int((q["reason"] == r).sum()) for r in QUARANTINE_REASONS}
    assert report["quarantine_fraction"] < CONFIG.ingest.max_quarantine_fraction
    rows = q["source_row"].to_numpy()
    assert (q["source_file"] == str(paths.raw_dir / source.name)).all()
    assert len(np.unique(rows)) == len(rows) and ((rows >= 0) & (rows < len(raw))).all()
    # the quarantined rows carry their raw values
    np.testing.assert_array_equal(q["close"].to_numpy(), raw["close"].to_numpy()[rows])
    # every other raw row is a bar, values untouched
    kept = raw.drop(index=rows).sort_values(["symbol", "timestamp"], kind="stable", ignore_index=True)
    pd.testing.assert_frame_equal(bars, kept[list(RAW_COLUMNS)], check_dtype=False)
    assert results["raw_bars"]["report"]["n_rows_out"] == len(bars)


def test_labelled_dataset_is_sane(run):
    _, paths, results, _ = run
    cols = ["symbol", "timestamp", "feature_valid", "label_eligible", "tb_label", "tb_return_atr", "early_move",
            "atr", "volume"]
    ds = read_dataset(paths.features, paths.labels, cols)
    assert len(ds) == len(read_frame(paths.bars, ["symbol"]))
    stats = results["labels"]["stats"]
    eligible = ds["label_eligible"].to_numpy()
    # ineligible rows: per symbol the last LABEL_WINDOW bars, plus bars without a usable ATR
    n_symbols = ds["symbol"].nunique()
    assert eligible.sum() == stats["n_eligible"]
    assert len(ds) - eligible.sum() >= LABEL_WINDOW * n_symbols
    assert stats["eligibility_rate"] > 0.9, stats  # years of bars per symbol: warm-up and tail are small
    assert np.isfinite(ds.loc[eligible, ["tb_return_atr", "early_move"]].to_numpy()).all()
    assert (ds.loc[~eligible, "tb_label"] == 0).all() and ds.loc[~eligible, "tb_return_atr"].isna().all()
    # pt = sl = 1.5 ATR within 20 bars: both barriers are reached often, neither direction dominates
    share = ds.loc[eligible, "tb_label"].value_counts(normalize=True)
    assert share.get(1, 0.0) > 0.25 and share.get(-1, 0.0) > 0.25, share.to_dict()
    assert 0.0 < share.get(0, 0.0) < 0.5, share.to_dict()
    # features become valid after the warm-up for every symbol with enough history
    assert ds["feature_valid"].mean() > 0.8
    assert (ds["atr"][ds["feature_valid"]] > 0).all()


def test_splits_are_chronological_and_purged(run):
    _, paths, results, _ = run
    ds = read_dataset(paths.features, paths.labels, ["symbol", "timestamp"])
    a = read_frame(paths.split_assignment)
    summary = results["splits"]["summary"]
    val_start, test_start = (pd.Timestamp(summary["cuts"][k]) for k in ("val_start", "test_start"))
    split = a["split"].to_numpy()
    ts = ds["timestamp"]
    assert (ts[split == "train"] < val_start).all()
    assert ((ts[split == "val"] >= val_start) & (ts[split == "val"] < test_start)).all()
    assert (ts[split == "test"] >= test_start).all()
    # purge: the last bar a sample's label reads (LABEL_WINDOW bars later, same symbol) is in its split
    ahead = ds.groupby("symbol")["timestamp"].shift(-LABEL_WINDOW)
    ok = a["sample_ok"].to_numpy()
    assert ahead[ok].notna().all()
    end = {"train": val_start, "val": test_start}
    for s, cut in end.items():
        sel = ok & (split == s)
        assert sel.any() and (ahead[sel] < cut).all(), f"{s} samples whose label window crosses {cut}"
        assert summary["splits"][s]["n_purged"] > 0
    assert summary["splits"]["val"]["n_embargoed"] > 0 and summary["splits"]["test"]["n_embargoed"] > 0
    for s in SPLITS:
        assert summary["splits"][s]["samples"] == int((ok & (split == s)).sum()) > 0


def _window_rows(ends: np.ndarray, seq_len: int, n_rows: int) -> np.ndarray:
    """Mask of the rows inside at least one window ``[end - seq_len + 1, end]``."""
    cover = np.zeros(n_rows + 1, dtype=np.int64)
    np.add.at(cover, ends - seq_len + 1, 1)
    np.add.at(cover, ends + 1, -1)
    return np.cumsum(cover[:-1]) > 0


def test_hdf5_and_arrow_match_and_sample_windows_are_finite(run):
    _, paths, results, _ = run
    h = read_contract(paths.feature_contract).hash
    for s in SPLITS:
        ok, details = cache_matches_source(paths.h5(s), paths.arrow(s))
        assert ok, details["problems"]
        assert results["arrow_cache"]["splits"][s]["matches_hdf5"]
        arrays = open_split(paths.arrow(s), h)
        ends = arrays.sample_end_rows
        assert arrays.n_samples == results["hdf5_splits"]["splits"][s]["n_samples"] > 0
        in_window = _window_rows(ends, arrays.seq_len, arrays.n_rows)
        assert np.isfinite(arrays.seq[in_window]).all(), f"{s}: non-finite scaled seq features in a sample window"
        assert np.isfinite(arrays.snap[ends]).all() and np.isfinite(arrays.ctx_cont[ends]).all()
        assert np.isfinite(arrays.targets[ends]).all(), f"{s}: non-finite target at a sample"
        # the scalers clip: no scaled value explodes on price jumps (splits are not adjusted in the feed)
        clip = json.loads(paths.scalers_info.read_text())["clip"]
        assert np.abs(arrays.seq[in_window]).max() <= clip and np.abs(arrays.snap[ends]).max() <= clip
        # every window lies in one symbol
        first = ends - (arrays.seq_len - 1)
        assert (arrays.symbol_idx[first] == arrays.symbol_idx[ends]).all()



# the largest |early_move| (ATR units) among eligible rows before bar quirks were protected and
# targets clipped: a bad tick's row (XL, 2015-08-18, the flash-crash low of 5.40 six bars later) and
# AIG's bars around its 1:20 reverse split in 2009
UNPROTECTED_MAX_EARLY_MOVE = {"daily_equities_panel.parquet": 64.3, "intraday_equities_h1.parquet": 637.0}


def _window_any(flag: pd.Series, symbol: pd.Series, window: int, *, include_entry: bool) -> np.ndarray:
    """Per row: any ``flag`` among the row's next ``window`` bars of its symbol (and the row itself when
    ``include_entry``); plain pandas, independent of the labeller."""
    f = flag.astype(float)
    if not include_entry:
        f = f.groupby(symbol).shift(-1).fillna(0.0)
    span = window + 1 if include_entry else window
    rev = f.iloc[::-1].groupby(symbol.iloc[::-1]).rolling(span, min_periods=1).max()
    return (rev.reset_index(level=0, drop=True).sort_index().to_numpy() > 0)


def test_labels_are_protected_from_flagged_quirks_and_bounded(run):
    source, paths, results, _ = run
    report = json.loads(paths.quality_report.read_text())
    assert "bar_quality" in report
    flags = read_frame(paths.bar_flags)
    ds = read_dataset(paths.features, paths.labels, ["symbol", "timestamp", "label_eligible", "early_move",
                                                          "mfe_6", "mae_6", "tb_return_atr", "label_quirks"])
    assert len(flags) == len(ds) and (flags["timestamp"] == ds["timestamp"]).all()
    elig = ds["label_eligible"].to_numpy()
    # no eligible label window holds a flagged jump or hole after the entry, or a spike from the entry on
    for column, entry in (("jump", False), ("after_hole", False), ("spike", True)):
        met = _window_any(flags[column], ds["symbol"], LABEL_WINDOW, include_entry=entry)
        assert not (elig & met).any(), f"{source.name}: eligible label window meets a flagged {column}"
    stats = results["labels"]["stats"]
    blocked = stats["quirk_protection"]["n_ineligible_quirk_total"]
    assert blocked > 0 and blocked < 0.01 * len(ds)  # a few hundred rows, not a share of the data
    # ATR-unit targets are bounded by the clip, and even before clipping far below the unprotected max
    bound = CONFIG.labels.target_clip_atr
    targets = ds.loc[elig, ["early_move", "mfe_6", "mae_6", "tb_return_atr"]].abs().to_numpy()
    assert np.nanmax(targets) <= bound
    clip = stats["target_clip"]
    assert clip["max_abs_before_clip"]["early_move"] < UNPROTECTED_MAX_EARLY_MOVE[source.name] / 1.3
    assert 0 < clip["n_rows_clipped"] < 0.001 * len(ds)
    assert int(((ds["label_quirks"].to_numpy() & 128) != 0).sum()) == clip["n_rows_clipped"]
    if source.name == "daily_equities_panel.parquet":
        xl = ds[(ds["symbol"] == "XL") & (ds["timestamp"] == pd.Timestamp("2015-08-18", tz="UTC"))]
        assert not xl["label_eligible"].iloc[0] and np.isnan(xl["early_move"].iloc[0])
