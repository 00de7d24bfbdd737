"""The optional FFD feature group: weights, a slow reference, causality, warm-up, the cap, d on train only."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.data import ffd
from sentinel_pipeline.data.features import (
    FeatureConfig,
    build_contract,
    compute_features,
    resolve_ffd,
    warmup_bars,
)
from sentinel_pipeline.data.ffd import FFDConfig, ffd_weights, select_d, train_cut_ns
from sentinel_pipeline.data.splits import SplitConfig, assign_splits
from sentinel_pipeline_tests.test_features import DEFAULT_CONTRACT_HASH, make_bars


def slow_weights(d: float, tau: float, max_window: int) -> list[float]:
    """AFML's getWeights_FFD as a plain loop: w_k = -w_{k-1} (d - k + 1) / k until |w_k| < tau (or the cap)."""
    w = [1.0]
    k = 1
    while True:
        nxt = -w[-1] * (d - k + 1) / k
        if abs(nxt) < tau or len(w) >= max_window:
            return w
        w.append(nxt)
        k += 1


def slow_ffd(close: np.ndarray, symbols: np.ndarray, d: float, tau: float, max_window: int) -> np.ndarray:
    """The FFD of log close, one symbol and one bar at a time (plain Python, for reference)."""
    w = slow_weights(d, tau, max_window)
    out = np.full(close.size, np.nan)
    for i in range(close.size):
        first = i
        while first > 0 and symbols[first - 1] == symbols[i]:
            first -= 1
        if i - first + 1 < len(w):
            continue
        out[i] = sum(w[k] * math.log(close[i - k]) for k in range(len(w)))
    return out


def ffd_config(d: float | None = 0.4, **kw) -> FeatureConfig:
    return FeatureConfig(ffd=FFDConfig(d=d, **kw))


def test_default_config_has_no_ffd_and_keeps_its_contract_hash() -> None:
    assert FeatureConfig().ffd is None
    contract = build_contract()
    assert contract.hash == DEFAULT_CONTRACT_HASH
    assert "ffd_logclose" not in contract.all_names


def test_weights_follow_the_recursion_and_the_threshold() -> None:
    for d, tau in [(0.4, 1e-4), (0.65, 1e-3), (0.1, 1e-2), (1.0, 1e-5), (0.0, 1e-4)]:
        w = ffd_weights(d, tau, 10_000)
        np.testing.assert_allclose(w, slow_weights(d, tau, 10_000), rtol=0, atol=0)
        assert w[0] == 1.0 and (np.abs(w) >= tau).all()
    np.testing.assert_array_equal(ffd_weights(1.0, 1e-4, 500), [1.0, -1.0])  # d=1: the one-bar return
    np.testing.assert_array_equal(ffd_weights(0.0, 1e-4, 500), [1.0])  # d=0: the log price


@pytest.mark.parametrize("d, tau", [(0.35, 1e-3), (0.7, 1e-4), (0.15, 5e-3)])
def test_ffd_equals_the_slow_reference(d: float, tau: float) -> None:
    bars = make_bars(3, [300, 1, 120, 260])
    lc = ffd.log_prices(bars["close"].to_numpy())
    starts, ends = ffd.symbol_blocks(bars["symbol"].to_numpy(dtype=object))
    fast = ffd.ffd_series(lc, starts, ends, ffd_weights(d, tau, 500))
    ref = slow_ffd(bars["close"].to_numpy(), bars["symbol"].to_numpy(dtype=object), d, tau, 500)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref))
    assert np.isfinite(fast).sum() > 100
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-12, equal_nan=True)
    # the feature column is that series in float32
    feats = compute_features(bars, ffd_config(d, tau=tau))
    np.testing.assert_array_equal(feats["ffd_logclose"].to_numpy(), fast.astype(np.float32))


@pytest.mark.parametrize("seed", range(8))
def test_ffd_of_a_prefix_equals_the_prefix(seed: int) -> None:
    rng = np.random.default_rng(500 + seed)
    bars = make_bars(seed, [int(x) for x in rng.integers(1, 400, rng.integers(1, 5))], gaps=bool(seed % 2))
    cfg = ffd_config(float(rng.choice([0.2, 0.45, 0.8])), tau=1e-3)
    full = compute_features(bars, cfg)
    cut = rng.choice(bars["timestamp"].to_numpy())
    keep = (bars["timestamp"] <= cut).to_numpy()
    part = compute_features(bars[keep].reset_index(drop=True), cfg)
    for col in ("ffd_logclose", "feature_valid"):
        np.testing.assert_array_equal(part[col].to_numpy(), full[keep][col].to_numpy(), err_msg=col)


def test_warmup_rows_are_nan_and_not_valid() -> None:
    cfg = ffd_config(0.3, tau=1e-3)
    window = ffd_weights(0.3, 1e-3, 500).size
    assert window > warmup_bars(FeatureConfig())  # the FFD window is the longest warm-up here
    assert warmup_bars(cfg) == window - 1
    bars = make_bars(1, [window + 50, window - 5, 2 * window])
    feats = compute_features(bars, cfg)
    pos = feats.groupby("symbol", sort=False).cumcount().to_numpy()
    x = feats["ffd_logclose"].to_numpy()
    valid = feats["feature_valid"].to_numpy()
    assert np.isnan(x[pos < window - 1]).all() and not valid[pos < window - 1].any()
    assert np.isfinite(x[pos >= window - 1]).all() and valid[pos >= window - 1].all()
    # a symbol shorter than the window has no value at all (never back-filled) and no valid row
    short = (feats["symbol"] == feats["symbol"].unique()[1]).to_numpy()
    assert np.isnan(x[short]).all() and not valid[short].any()
    # and the splits stage counts no sample on a warm-up row
    df = feats.assign(label_eligible=True)
    assignment, _ = assign_splits(df, SplitConfig(), 5)
    assert not assignment["sample_ok"].to_numpy()[pos < window - 1].any()


def test_window_is_capped() -> None:
    d, tau = 0.05, 1e-8
    assert ffd.uncapped_window(d, tau) > 100_000  # uncapped, every value of a realistic series is NaN
    params = FFDConfig(d=d, tau=tau, max_window=500).params()
    assert params["window"] == 500 and params["window_capped"] is True and params["max_window"] == 500
    assert FFDConfig(d=0.5, tau=1e-3).params()["window_capped"] is False
    bars = make_bars(2, [600])
    x = compute_features(bars, ffd_config(d, tau=tau, max_window=500))["ffd_logclose"].to_numpy()
    assert np.isnan(x[:499]).all() and np.isfinite(x[499:]).all()
    ref = slow_ffd(bars["close"].to_numpy(), bars["symbol"].to_numpy(dtype=object), d, tau, 500)
    np.testing.assert_allclose(x, ref.astype(np.float32), rtol=0, atol=0, equal_nan=True)


def test_contract_carries_d_tau_window_and_changes_with_them() -> None:
    cfg = ffd_config(0.4, tau=1e-4, max_window=500)
    contract = build_contract(cfg)
    spec = next(f for f in contract.features if f.name == "ffd_logclose")
    assert spec.group == "seq" and spec.dtype == "float32"
    p = spec.params
    assert p["d"] == 0.4 and p["tau"] == 1e-4 and p["window"] == ffd_weights(0.4, 1e-4, 500).size
    assert p["max_window"] == 500 and p["adf_level"] == 0.05 and p["d_grid"] == [0.0, 1.0, 0.05]
    seen = {contract.hash, DEFAULT_CONTRACT_HASH}
    for changed in (ffd_config(0.45), ffd_config(0.4, tau=1e-3), ffd_config(0.4, max_window=100),
                    ffd_config(0.4, adf_level=0.01), ffd_config(0.4, d_step=0.1)):
        assert build_contract(changed).hash not in seen
        seen.add(build_contract(changed).hash)
    # an unresolved d cannot make a contract or features
    with pytest.raises(ValueError, match="not chosen"):
        build_contract(ffd_config(None))
    with pytest.raises(ValueError, match="not chosen"):
        compute_features(make_bars(0, [50]), ffd_config(None))
    assert resolve_ffd(ffd_config(None), 0.4) == cfg


def _select(bars: pd.DataFrame, cfg: FFDConfig, split: SplitConfig) -> dict:
    return select_d(bars["symbol"].to_numpy(dtype=object), bars["timestamp"].array.as_unit("ns").asi8,
                    bars["close"].to_numpy(), cfg, split)


def test_d_is_chosen_on_the_train_window_only() -> None:
    bars = make_bars(0, [800, 900, 700])
    cfg, split = FFDConfig(), SplitConfig()
    sel = _select(bars, cfg, split)
    assert sel["passed"] and sel["adf_p"] < cfg.adf_level
    assert 0.0 < sel["d"] <= 1.0 and sel["d"] in cfg.grid()
    # the smallest passing d: every smaller grid value tried did not pass
    assert all(p is None or p >= cfg.adf_level for d, p in sel["tried"][:-1])
    assert sel["tried"][-1] == [sel["d"], sel["adf_p"]]
    # garbage (an exploding trend, noise) after the train cut, same timestamps: d and p unchanged
    cut = train_cut_ns(bars["timestamp"].array.as_unit("ns").asi8, split)
    after = (bars["timestamp"].array.as_unit("ns").asi8 >= cut)
    assert after.sum() > 400
    garbage = bars.copy()
    rng = np.random.default_rng(9)
    garbage.loc[after, "close"] = np.exp(np.cumsum(rng.normal(0.05, 0.5, int(after.sum())))) + 1.0
    assert _select(garbage, cfg, split) == sel
    # the same garbage before the cut does move the choice (the test can fail)
    before = garbage.copy()
    first = np.flatnonzero(~after)[:300]
    before.loc[first, "close"] = np.exp(np.cumsum(rng.normal(0.05, 0.5, first.size))) + 1.0
    assert _select(before, cfg, split)["tried"] != sel["tried"]


def test_train_cut_matches_the_split_stage() -> None:
    bars = make_bars(4, [300, 250])
    for split in (SplitConfig(), SplitConfig(train_frac=0.5, val_frac=0.2)):
        df = bars.assign(label_eligible=True)
        assignment, summary = assign_splits(df, split, 5)
        cut = train_cut_ns(bars["timestamp"].array.as_unit("ns").asi8, split)
        assert pd.Timestamp(cut, tz="UTC") == pd.Timestamp(summary["cuts"]["val_start"])
        train = (assignment["split"] == "train").to_numpy()
        np.testing.assert_array_equal(train, bars["timestamp"].array.as_unit("ns").asi8 < cut)


def test_no_passing_d_takes_the_largest_grid_value_and_says_so() -> None:
    bars = make_bars(0, [400, 400])
    sel = _select(bars, FFDConfig(d_max=0.1, tau=1e-2, adf_level=1e-12), SplitConfig())
    assert sel["passed"] is False and sel["d"] == 0.1 and len(sel["tried"]) == 3
    # a d whose window leaves too few train values is skipped (p None), not tested on a handful of rows
    sel = _select(bars, FFDConfig(d_max=0.1, tau=1e-4, adf_level=1e-12), SplitConfig())
    assert [p is None for _, p in sel["tried"]] == [False, True, True] and sel["d"] == 0.0
    with pytest.raises(ValueError, match="no symbol has"):
        _select(bars, FFDConfig(d_max=0.1, tau=1e-4, min_adf_obs=10_000), SplitConfig())


def test_config_validation_and_dict_input() -> None:
    with pytest.raises(ValueError):
        FFDConfig(tau=0.0)
    with pytest.raises(ValueError):
        FFDConfig(max_window=0)
    assert FeatureConfig(ffd={"d": 0.3}).ffd == FFDConfig(d=0.3)
    assert dataclasses.replace(FeatureConfig(), ffd=None) == FeatureConfig()
    assert FFDConfig().grid()[:4] == [0.0, 0.05, 0.1, 0.15] and FFDConfig().grid()[-1] == 1.0


def test_replay_rebuilds_the_ffd_config_from_the_contract() -> None:
    from sentinel_pipeline.replay.feature_config import feature_config_from_contract

    cfg = ffd_config(0.35, tau=1e-3, max_window=300)
    assert feature_config_from_contract(build_contract(cfg)) == cfg
    assert feature_config_from_contract(build_contract()) == FeatureConfig()


def test_the_data_half_chooses_d_on_train_and_the_features_stage_uses_it(tmp_path) -> None:
    from sentinel_pipeline import data_half
    from sentinel_pipeline.data.feature_contract import read_contract
    from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig
    from sentinel_pipeline.data.tables import read_frame
    from sentinel_pipeline.orchestration.data_assets import _ffd_metadata
    from sentinel_pipeline.paths import ArtifactPaths

    cfg = data_half.DataHalfConfig(synthetic=SyntheticMarketConfig(seed=3, n_symbols=20, n_days=60),
                                   features=FeatureConfig(ffd=FFDConfig(tau=1e-3, max_window=200)))
    paths = ArtifactPaths(data_dir=tmp_path / "data", raw_dir_override=tmp_path / "raw")
    data_half._resolve_or_mark(paths, cfg)
    for name in ("raw_bars", "feature_contract", "features"):
        summary = data_half.build_stage(name, paths, cfg)
    sel = data_half.read_ffd_selection(paths)
    bars = read_frame(paths.bars)
    assert sel == _select(bars, cfg.features.ffd, cfg.splits) | {"tau": 1e-3, "max_window": 200, "adf_level": 0.05}
    spec = next(f for f in read_contract(paths.feature_contract).features if f.name == "ffd_logclose")
    assert spec.params["d"] == sel["d"] and spec.params["window"] == sel["window"]
    resolved = resolve_ffd(cfg.features, sel["d"])
    feats = read_frame(paths.features)
    np.testing.assert_array_equal(feats["ffd_logclose"].to_numpy(),
                                  compute_features(bars, resolved)["ffd_logclose"].to_numpy())
    meta = _ffd_metadata(summary)
    assert meta["ffd_d"] == sel["d"] and meta["ffd_adf_p"] == sel["adf_p"] and meta["ffd_window"] == sel["window"]
    assert meta["ffd_tau"] == 1e-3
