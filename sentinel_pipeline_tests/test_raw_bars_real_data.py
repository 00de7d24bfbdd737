"""Stage 1 ingestion on real market bars from ``../shared/data`` (skipped where absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.data.raw_bars import IngestConfig, enforce_quarantine_limit, load_raw_bars
from sentinel_pipeline_tests.test_raw_bars import check_accounting, reference_reasons

pytestmark = pytest.mark.realdata

REAL_FILES = ("daily_equities_panel.parquet", "intraday_equities_h1.parquet")


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_file_is_fully_accounted_for(shared_data_dir: Path, tmp_path: Path, name: str):
    source = shared_data_dir / name
    (tmp_path / name).symlink_to(source)
    result = load_raw_bars(tmp_path)
    check_accounting(result)

    raw = pd.read_parquet(source)
    rep = result.report
    assert rep["n_rows_in"] == len(raw) == rep["n_rows_out"] + rep["n_quarantined"]
    assert rep["n_symbols"] == raw["symbol"].nunique()  # no symbol lost entirely
    # the reasons explain every quarantined row: an independent statement of the rules agrees row by row
    expected = reference_reasons(raw)
    q = result.quarantine
    assert (q["source_file"] == str(tmp_path / name)).all()
    np.testing.assert_array_equal(np.sort(q["source_row"].to_numpy()), np.flatnonzero(expected != ""))
    np.testing.assert_array_equal(q["reason"].to_numpy(dtype=object), expected[q["source_row"].to_numpy()])
    # quarantined rows carry their raw values
    pd.testing.assert_series_equal(
        q["close"].reset_index(drop=True),
        raw["close"].iloc[q["source_row"]].reset_index(drop=True),
        check_names=False,
    )
    assert rep["quarantine_fraction"] < IngestConfig().max_quarantine_fraction
    enforce_quarantine_limit(result)


def test_both_real_files_together_in_nested_dirs(shared_data_dir: Path, tmp_path: Path):
    for k, name in enumerate(REAL_FILES):
        (tmp_path / f"feed{k}").mkdir()
        (tmp_path / f"feed{k}" / name).symlink_to(shared_data_dir / name)
    result = load_raw_bars(tmp_path)
    check_accounting(result)
    assert result.report["n_files"] == 2
    # the panels share tickers (AAPL, AIG, BAC, IBM) but daily bars sit at 00:00 UTC, hourly ones in session
    assert result.report["quarantine_by_reason"]["duplicate_key"] == 0
