"""Bar-quality flags on the real files of ``../shared/data`` (skipped where absent).

Known quirks of these feeds, each of which the raw stage must flag (and not drop): the hourly US
equities are unadjusted (AAPL 2:1 in 2000 and 2005, 7:1 on 2014-06-09, 4:1 on 2020-08-31; VXX
1:4 reverse splits) and carry bad ticks (an AAPL hourly low of 10.59 against neighbours at 182) and
a 3-month hole in VXX (the old note matured, the new one listed under the same ticker); the OANDA FX
file has volume 0 on every bar; the daily S&P 500 panel has the 2015-08-24 flash-crash prints (an XL
low of 5.40 against neighbours at 36) and unadjusted splits and spin-offs. The EURUSD hourly and GOOG
daily files are clean.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sentinel_pipeline.data.bar_quality import BarQualityConfig
from sentinel_pipeline.data.raw_bars import IngestConfig, load_raw_bars

pytestmark = pytest.mark.realdata


def _load(shared_data_dir: Path, tmp_path: Path, name: str, config: IngestConfig | None = None):
    (tmp_path / name).symlink_to(shared_data_dir / name)
    return load_raw_bars(tmp_path, config)


def _flag(result, symbol: str, ts: str, column: str) -> bool:
    f = result.flags
    row = f[(f["symbol"] == symbol) & (f["timestamp"] == pd.Timestamp(ts, tz="UTC"))]
    assert len(row) == 1, f"no bar {symbol} {ts}"
    return bool(row[column].iloc[0])


def test_intraday_splits_bad_ticks_and_the_vxx_hole(shared_data_dir: Path, tmp_path: Path):
    result = _load(shared_data_dir, tmp_path, "intraday_equities_h1.parquet")
    q = result.report["bar_quality"]
    assert len(result.flags) == len(result.bars) == result.report["n_rows_out"]
    # the AAPL 7:1 split: flagged on the first bar after it, and named as such among the examples
    assert _flag(result, "AAPL", "2014-06-09 13:00", "jump")
    assert not _flag(result, "AAPL", "2014-06-06 19:00", "jump")
    (aapl,) = [e for e in q["jumps"]["examples"] if e["symbol"] == "AAPL"]
    assert aapl["timestamp"] == "2014-06-09T13:00:00+00:00" and aapl["split_like"] == "7:1"
    assert aapl["previous_close"] == 645.57 and aapl["close"] == 92.31
    # the other unadjusted splits of AAPL
    for ts in ("2000-06-21 13:00", "2005-02-28 14:00", "2020-08-31 13:00"):
        assert _flag(result, "AAPL", ts, "jump"), ts
    assert q["jumps"]["by_symbol"]["AAPL"] == 5 and q["jumps"]["by_symbol"]["VXX"] == 6
    assert 20 <= q["jumps"]["n"] <= 30 and q["jumps"]["n_split_like"] >= 10
    # bad ticks: lows a tenth of the neighbours'
    for ts in ("2009-09-21 13:00", "2010-08-31 18:00", "2011-01-03 18:00"):
        assert _flag(result, "AAPL", ts, "spike"), ts
    assert q["spikes"]["examples"][0] == {
        "symbol": "AAPL", "timestamp": "2009-09-21T13:00:00+00:00", "side": "low", "value": 10.59,
        "neighbours": 181.95, "log_excess": pytest.approx(2.844, abs=1e-3),
    }
    # holes: VXX's three months (462 session bars), and 9/11 (4 trading days = 28 bars) for the others
    holes = q["holes"]
    assert holes["examples"][0]["symbol"] == "VXX" and holes["examples"][0]["missed_bars"] == 462.0
    assert holes["n"] == 6 and set(holes["by_symbol"]) == {"AAPL", "AIG", "BAC", "IBM", "SPY", "VXX"}
    assert _flag(result, "VXX", "2019-05-02 13:00", "after_hole")
    # nights and weekends are no holes: only these 6 bars carry one
    assert int(result.flags["after_hole"].sum()) == 6
    assert q["zero_volume_runs"]["n_runs"] == 0 and q["flat_runs"]["n_runs"] == 0


def test_intraday_split_at_the_vxx_hole(shared_data_dir: Path, tmp_path: Path):
    cfg = IngestConfig(quality=BarQualityConfig(split_at_hole_bars=100))
    result = _load(shared_data_dir, tmp_path, "intraday_equities_h1.parquet", cfg)
    bars = result.bars
    assert result.report["n_rows_in"] == len(bars) + len(result.quarantine)
    assert sorted(bars["symbol"].unique()) == ["AAPL", "AIG", "BAC", "IBM", "SPY", "VXX", "VXX~2"]
    assert bars.loc[bars["symbol"] == "VXX~2", "timestamp"].min() == pd.Timestamp("2019-05-02 13:00", tz="UTC")
    seg = result.report["bar_quality"]["segments"]
    assert seg["n_segments_added"] == 1 and seg["examples"][0]["symbol"] == "VXX~2"


def test_fx_volume_is_zero_throughout(shared_data_dir: Path, tmp_path: Path):
    result = _load(shared_data_dir, tmp_path, "fx_oanda_h1.parquet")
    zero = result.report["bar_quality"]["zero_volume_runs"]
    assert zero["n_bars"] == len(result.bars) == 148_890
    assert zero["n_runs"] == 2 and zero["symbols_entirely"] == ["EURUSD", "NZDUSD"]
    assert result.flags["zero_volume_run"].all()
    q = result.report["bar_quality"]
    assert q["jumps"]["n"] == 0 and q["spikes"]["n"] == 0
    # FX trades 24 hours on weekdays: the Christmas and New Year days (24 bars each) and the 2016
    # feed outage (96 bars) are holes, the weekends are not
    assert q["holes"]["examples"][0]["missed_bars"] == 96.0
    assert 10 <= q["holes"]["n"] <= 30 and q["holes"]["by_symbol"]["EURUSD"] == q["holes"]["by_symbol"]["NZDUSD"]


def test_daily_panel_flash_crash_prints_and_corporate_actions(shared_data_dir: Path, tmp_path: Path):
    result = _load(shared_data_dir, tmp_path, "daily_equities_panel.parquet")
    q = result.report["bar_quality"]
    assert _flag(result, "XL", "2015-08-24", "spike")
    assert q["spikes"]["examples"][0]["symbol"] == "XL" and q["spikes"]["examples"][0]["value"] == 5.4
    assert _flag(result, "DISCA", "2014-08-07", "jump") and _flag(result, "NI", "2015-07-02", "jump")
    split_like = {e["symbol"]: e["split_like"] for e in q["jumps"]["examples"]}
    assert split_like["DISCA"] == split_like["DISCK"] == "2:1"
    assert 10 <= q["jumps"]["n"] <= 25 and 1 <= q["spikes"]["n"] <= 15
    # five years of daily bars of 505 symbols: holidays are not holes, and there is none of 20+ days
    assert q["holes"]["n"] == 0
    assert q["n_bars_flagged"] < 50


@pytest.mark.parametrize("name", ["fx_eurusd_h1.parquet", "goog_daily.parquet"])
def test_clean_files_are_not_flagged(shared_data_dir: Path, tmp_path: Path, name: str):
    q = _load(shared_data_dir, tmp_path, name).report["bar_quality"]
    assert q["n_bars_flagged"] == 0, {k: q[k] for k in ("jumps", "spikes", "holes", "zero_volume_runs", "flat_runs")}
