"""The train/test shift check (adversarial validation): small synthetic arrays, seconds in all."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import numpy as np
import pytest

from sentinel_pipeline.data import arrow_cache as arrow_mod
from sentinel_pipeline.data.hdf5_splits import write_split_file
from sentinel_pipeline.data.split_arrays import TARGET_NAMES, SplitArrays
from sentinel_pipeline.evaluation.shift_check import (
    ShiftConfig,
    Side,
    adversarial_validation,
    random_row_cv_auc,
    shift_check,
    side_from_split,
)
from sentinel_pipeline.orchestration.settings import PipelineSettings
from sentinel_pipeline.orchestration.shift_checks import train_shift
from sentinel_pipeline.paths import SPLITS, ArtifactPaths

NAMES = {"seq": ["ret_1", "ret_5", "vol_20"], "snap": ["rsi", "range"], "ctx_cat": ["sector"], "ctx_cont": ["beta"]}
CFG = ShiftConfig(n_bootstrap=500)


def _split(n: int, seed: int, t0: int, shift: float = 0.0, n_sym: int = 8, trend_col: int | None = None) -> SimpleNamespace:
    """A split-like object with the feature matrices, symbols, timestamps and sample ends only: no
    ``targets``, ``tb_label`` or ids, so reading any of them raises ``AttributeError``."""
    rng = np.random.default_rng(seed)
    per = n // n_sym
    ts = np.tile(np.arange(t0, t0 + per, dtype=np.int64), n_sym) * 60_000_000_000
    sym = np.repeat(np.arange(n_sym), per)
    seq = rng.normal(size=(len(ts), 3)).astype(np.float32)
    snap = rng.normal(size=(len(ts), 2)).astype(np.float32)
    snap[:, 1] += shift
    if trend_col is not None:  # a price-level-like feature: rises with time in every symbol
        seq[:, trend_col] = (ts / 6e10 + rng.normal(scale=5.0, size=len(ts))).astype(np.float32)
    return SimpleNamespace(seq=seq, snap=snap, ctx_cat=rng.integers(0, 4, size=(len(ts), 1)).astype(np.int32),
                           ctx_cont=rng.normal(size=(len(ts), 1)).astype(np.float32), symbol_idx=sym.astype(np.int32),
                           timestamp=ts, sample_end_rows=np.arange(len(ts), dtype=np.int64), feature_names=NAMES)


def test_no_shift_the_auc_interval_covers_one_half():
    reports = shift_check({"train": _split(4000, 0, 0), "val": _split(2000, 1, 1000), "test": _split(2000, 2, 2000)}, CFG)
    for r in reports.values():
        assert r.ci_low < 0.5 < r.ci_high, r
        assert abs(r.auc - 0.5) < 0.05
        assert r.trending == []


def test_an_injected_shift_in_one_feature_is_found_with_its_group():
    reports = shift_check({"train": _split(4000, 0, 0), "val": _split(2000, 1, 1000, shift=1.0)}, CFG)
    r = reports["train_vs_val"]
    assert r.auc > 0.7 and r.ci_low > 0.6
    assert r.top_features[0]["feature"] == "range" and r.top_features[0]["group"] == "snap"
    drift = {g["group"]: g["auc"] for g in r.groups}
    assert max(drift, key=drift.get) == "snap"
    assert set(drift) == {"seq", "snap", "ctx_cat", "ctx_cont"}
    assert drift["snap"] > 0.7 and all(abs(v - 0.5) < 0.05 for g, v in drift.items() if g != "snap")


def test_a_feature_trending_with_time_is_named():
    r = shift_check({"train": _split(4000, 0, 0, trend_col=2), "val": _split(2000, 1, 1000, trend_col=2)},
                    CFG)["train_vs_val"]
    assert [t["feature"] for t in r.trending] == ["vol_20"]
    assert r.trending[0]["spearman"] > 0.9
    assert r.auc > 0.95  # the trivial AUC ~1 that the trending list explains
    assert r.top_features[0]["feature"] == "vol_20"


def _ar_side(n: int, seed: int, t0: int, phi: float = 0.995) -> Side:
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(n, 4))
    x = np.empty_like(e)
    x[0] = e[0]
    for i in range(1, n):
        x[i] = phi * x[i - 1] + np.sqrt(1 - phi**2) * e[i]
    return Side(x, ["a", "b", "c", "d"], ["seq", "seq", "snap", "snap"], np.arange(t0, t0 + n, dtype=np.int64),
                np.zeros(n, np.int64))


def test_random_row_cv_inflates_the_auc_on_autocorrelated_data_and_time_blocks_do_not():
    # the same stationary process on both sides: there is no shift to find, but neighbouring rows are
    # near-duplicates; shuffled folds recognise a held-out row by its neighbour, time blocks cannot
    train, later = _ar_side(3000, 0, 0), _ar_side(3000, 1, 3000)
    blocked = adversarial_validation(train, later, CFG)
    shuffled = random_row_cv_auc(train, later, CFG)
    assert shuffled > 0.9
    assert blocked.auc < shuffled - 0.25
    assert blocked.ci_low < 0.5 < blocked.ci_high
    # the block bootstrap is wider than the spread of a row bootstrap would be: autocorrelation is kept
    assert blocked.ci_high - blocked.ci_low > 0.1


def test_the_check_reads_only_the_contract_features():
    split = _split(400, 0, 0)
    assert not hasattr(split, "targets") and not hasattr(split, "tb_label")  # labels absent, and not needed
    side = side_from_split(split)
    assert side.names == [n for g in ("seq", "snap", "ctx_cat", "ctx_cont") for n in NAMES[g]]
    assert side.x.shape == (400, 7)
    r = shift_check({"train": split, "test": _split(400, 1, 50)}, ShiftConfig(n_blocks=10, n_bootstrap=100))
    assert list(r) == ["train_vs_test"]
    assert r["train_vs_test"].features_used == side.names
    assert not set(r["train_vs_test"].features_used) & {*TARGET_NAMES, "tb_label", "timestamp", "symbol_idx"}


def test_the_subsample_is_capped_and_deterministic():
    splits = {"train": _split(4000, 0, 0), "val": _split(2000, 1, 1000, shift=0.5)}
    cfg = ShiftConfig(max_rows_per_side=1000, n_bootstrap=200)
    a, b = shift_check(splits, cfg)["train_vs_val"], shift_check(splits, cfg)["train_vs_val"]
    assert a.n_train_rows == 1000 and a.n_later_rows == 1000
    assert (a.auc, a.ci_low, a.ci_high, a.top_features) == (b.auc, b.ci_low, b.ci_high, b.top_features)


def _write_splits(paths: ArtifactPaths) -> None:
    for i, s in enumerate(SPLITS):
        part = _split(2000 if s == "train" else 800, i, 1000 * i, shift=2.0 if s == "test" else 0.0)
        n = len(part.timestamp)
        arrays = SplitArrays(
            split=s, seq=part.seq, snap=part.snap, ctx_cat=part.ctx_cat, ctx_cont=part.ctx_cont,
            targets=np.zeros((n, len(TARGET_NAMES)), np.float32), tb_label=np.zeros(n, np.int8),
            symbol_idx=part.symbol_idx, timestamp=part.timestamp, sample_end_rows=np.arange(29, n, dtype=np.int64),
            feature_contract_hash="0" * 64, feature_names=NAMES, symbols=[f"S{k}" for k in range(8)],
            attrs={"time_min": str(part.timestamp.min()), "time_max": str(part.timestamp.max())})
        write_split_file(paths.h5(s), arrays)
        arrow_mod.build_cache(paths.h5(s), paths.arrow(s))


def test_the_dagster_check_is_non_blocking_and_reports_the_metadata(tmp_path: Path):
    settings = PipelineSettings(data_dir=str(tmp_path / "data"), models_dir=str(tmp_path / "models"))
    paths = settings.paths()
    paths.hdf5_dir.mkdir(parents=True)
    paths.arrow_dir.mkdir(parents=True)
    _write_splits(paths)

    @dg.asset(name="arrow_cache")
    def stub() -> None:  # the splits are already written above
        return None

    spec = train_shift.check_specs_by_output_name
    assert all(not s.blocking for s in spec.values())
    result = dg.materialize([stub, train_shift], resources={"settings": settings},
                            run_config={"ops": {"arrow_cache_train_shift": {"config": {"auc_warn_threshold": 0.75}}}})
    assert result.success
    (ev,) = result.get_asset_check_evaluations()
    assert ev.passed  # train vs val: no shift; the shifted test split is report-only and does not fail it
    md = {k: getattr(v, "value", v) for k, v in ev.metadata.items()}
    for key in ("train_vs_val_auc", "train_vs_test_auc", "drift_per_group", "top_features", "trending_features", "plot"):
        assert key in md
    low, high = (float(x) for x in md["train_vs_test_auc"].split("[")[1].rstrip("]").split(","))
    assert low > 0.75  # the shift in the test split is reported
    assert "range" in md["top_features"] and "data:image/png;base64," in md["plot"]


@pytest.mark.parametrize("bad", [{"n_folds": 1}, {"n_blocks": 3, "n_folds": 5}, {"ci_level": 1.0}])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        ShiftConfig(**bad)


def test_the_block_bootstrap_point_estimate_is_the_plain_auc():
    from sklearn.metrics import roc_auc_score

    from sentinel_pipeline.evaluation.shift_check import block_bootstrap_auc, time_blocks

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(500, np.int8), np.ones(300, np.int8)]
    scores = np.round(rng.normal(size=800) + 0.5 * y, 1)  # ties included
    blocks = np.r_[time_blocks(500, 10), time_blocks(300, 10)]
    auc, lo, hi = block_bootstrap_auc(scores, y, blocks, 10, 400, 0.95, 0)
    assert auc == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert lo < auc < hi


def test_nothing_in_training_or_the_gate_reads_the_shift_check():
    root = Path(__file__).resolve().parent.parent / "sentinel_pipeline"
    readers = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
               if "shift_check" in p.read_text() and p.name not in ("shift_check.py", "shift_checks.py", "definitions.py")]
    assert readers == []  # report-only: no training, feature selection, verification or gate module uses it
