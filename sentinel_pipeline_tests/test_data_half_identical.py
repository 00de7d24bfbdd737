"""The data half's outputs are what they were before its intermediate files changed format.

``data_half_digests.json`` holds the digests (``data_half_digests.artefact_digests``) that the data half
gave, before labels got their own file and the intermediate tables became Arrow IPC, on two small inputs:
a synthetic market of 20 symbols x 60 days (default preset) and a synthetic panel of 40 symbols x 260
days (panel preset). Every table read back through the stages' readers (bars, bar flags, features, the
labelled dataset = features + labels side by side, the split assignment), the scaler parameters, the
split summary, each HDF5 split (arrays and attributes) and each Arrow cache (arrays and metadata) must
give the same digests, column by column.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sentinel_pipeline.data.dataset import read_dataset
from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig, generate_synthetic_market
from sentinel_pipeline.data.synthetic_panel import SyntheticPanelConfig
from sentinel_pipeline.data.tables import read_frame
from sentinel_pipeline.data_half import DataHalfConfig, panel_config, run_data_half
from sentinel_pipeline.paths import ArtifactPaths
from sentinel_pipeline_tests.data_half_digests import artefact_digests

PINNED = json.loads((Path(__file__).with_name("data_half_digests.json")).read_text())
# The same outputs recorded on a CPU without AVX-512: NumPy computes float64 ``exp`` with an AVX-512 routine
# where the CPU has one, which differs from the C library's in the last bit, so the synthetic generators'
# prices (and what is computed from them) differ by machine. The outputs must match one of the two.
PINNED_NO_AVX512 = json.loads((Path(__file__).with_name("data_half_digests_no_avx512.json")).read_text())
MARKET = SyntheticMarketConfig(seed=3, n_symbols=20, n_days=60)
PANEL = SyntheticPanelConfig(seed=2, n_symbols=40, n_days=260)


def _tables(paths: ArtifactPaths) -> dict[str, pd.DataFrame]:
    """The tables as the stages read them now (before: ``pd.read_parquet`` of each file, and of the one
    labelled table the labels stage wrote)."""
    return {
        "bars": read_frame(paths.bars),
        "bar_flags": read_frame(paths.bar_flags),
        "features": read_frame(paths.features),
        "dataset": read_dataset(paths.features, paths.labels),
        "assignment": read_frame(paths.split_assignment),
    }


def _differences(pinned: dict, found: dict, where: str = "") -> list[str]:
    out = []
    for key in sorted(set(pinned) | set(found)):
        a, b = pinned.get(key), found.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{where}{key}.")
        elif a != b:
            out.append(f"{where}{key}: pinned {a}, now {b}")
    return out


def _unchanged(preset: str, found: dict) -> list[str]:
    """No difference from one of the two recorded float environments, else the differences from the nearer."""
    diffs = [_differences(pins[preset], found) for pins in (PINNED, PINNED_NO_AVX512)]
    return [] if not all(diffs) else min(diffs, key=len)


def test_default_preset_outputs_are_unchanged(tmp_path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    generate_synthetic_market(MARKET).to_parquet(raw / "market.parquet", index=False)
    paths = ArtifactPaths(data_dir=tmp_path / "data", raw_dir_override=raw)
    run_data_half(paths, DataHalfConfig(synthetic=MARKET), log=lambda _m: None)
    diff = _unchanged("market", artefact_digests(paths, _tables(paths)))
    assert not diff, "\n".join(diff)


def test_panel_preset_outputs_are_unchanged(tmp_path) -> None:
    paths = ArtifactPaths(data_dir=tmp_path / "data")
    run_data_half(paths, panel_config(synthetic_panel=PANEL), log=lambda _m: None)
    diff = _unchanged("panel", artefact_digests(paths, _tables(paths)))
    assert not diff, "\n".join(diff)


@pytest.mark.parametrize("preset", ["market", "panel"])
@pytest.mark.parametrize("pins", [PINNED, PINNED_NO_AVX512])
def test_the_pinned_digests_cover_every_output(preset: str, pins: dict) -> None:
    pinned = pins[preset]
    assert {"bars", "bar_flags", "features", "dataset", "assignment", "scalers", "split_summary"} <= set(pinned)
    assert all(f"{kind}_{s}" in pinned for kind in ("h5", "arrow") for s in ("train", "val", "test"))
    assert len(pinned["dataset"]) - 2 == len(pinned["features"]) - 2 + 15  # features + 15 label columns
