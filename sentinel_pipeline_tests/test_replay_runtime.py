"""Replay part B: the per-timestamp runtime, train/serve feature parity and the bundle comparison.

Bundles here are stand-ins with the fields of ``bundles.LoadedBundle`` that the replay reads: a
probe model (whose signal is a known function of its inputs) or a real, untrained model from
``training.models``, scalers fitted on the bars before the replay window, real feature code.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from sentinel_pipeline.data.feature_contract import ContractError, FeatureContract
from sentinel_pipeline.data.features import FeatureConfig, build_contract, compute_features
from sentinel_pipeline.data.scalers import ClippedRobustScaler, FittedScalers
from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig, generate_synthetic_market
from sentinel_pipeline.replay import (
    ReplayConfig,
    feature_config_from_contract,
    feature_parity,
    replay_bundle,
    replay_comparison,
    replay_window_mask,
    scaled_feature_frame,
    simulate_trades,
    write_replay_outputs,
)
from sentinel_pipeline.replay.runtime import check_replayable, scale_features
from sentinel_pipeline.training.families import HeadSpec, ModelFamily, VariantSpec, registered
from sentinel_pipeline.training.models import build_model, resolve_arch

SEQ_LEN = 8
FEATURE_CONFIG = FeatureConfig(seq_len=SEQ_LEN)
CONTRACT = build_contract(FEATURE_CONFIG)
LABEL_PARAMS = {"pt": 1.0, "sl": 1.0, "horizon": 4}
CFG = ReplayConfig(window_bars=6, threshold=0.05)


@dataclass
class StandInBundle:
    path: Path
    model: nn.Module
    arch: dict[str, Any]
    variant: str
    contract: FeatureContract
    scalers: FittedScalers
    metadata: dict[str, Any] = field(default_factory=lambda: {"label_params": dict(LABEL_PARAMS)})
    device: torch.device = torch.device("cpu")


class ProbeModel(nn.Module):
    """Regression stand-in (variant mlp_two_head): early_move is a fixed function of every input group,
    reading the first and the last row of the window; it records the mode it was called in."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls.append((self.training, torch.is_grad_enabled()))
        out = probe_signal(batch["seq"], batch["snap"], batch["ctx_cat"], batch["ctx_cont"]) * self.scale
        return {"early_move": out, "tb_return_atr": -out}


def probe_signal(seq: Any, snap: Any, ctx_cat: Any, ctx_cont: Any) -> Any:
    return seq[:, 0, 0] + 2 * seq[:, -1, 1] + 0.5 * snap[:, 0] + 0.01 * ctx_cat[:, 2] + ctx_cont[:, 1]


@pytest.fixture(scope="module")
def market() -> pd.DataFrame:
    return generate_synthetic_market(SyntheticMarketConfig(n_symbols=20, n_days=16, seed=3))


@pytest.fixture(scope="module")
def full_features(market: pd.DataFrame) -> pd.DataFrame:
    return compute_features(market, FEATURE_CONFIG)


@pytest.fixture(scope="module")
def scalers(market: pd.DataFrame, full_features: pd.DataFrame) -> FittedScalers:
    before = ~replay_window_mask(market["timestamp"], CFG) & full_features["feature_valid"].to_numpy()
    fitted = {}
    for g in ("seq", "snap"):
        fitted[g] = ClippedRobustScaler().fit(full_features.loc[before, CONTRACT.names(g)].to_numpy(np.float64))
        fitted[g].feature_contract_hash_ = CONTRACT.hash
    return FittedScalers(seq=fitted["seq"], snap=fitted["snap"], info={"feature_contract_hash": CONTRACT.hash})


def probe_bundle(scalers: FittedScalers, name: str = "probe") -> StandInBundle:
    return StandInBundle(Path(name), ProbeModel(), {"seq_len": SEQ_LEN}, "mlp_two_head", CONTRACT, scalers)


def real_bundle(scalers: FittedScalers, seed: int, variant: str = "seq_ctx_fusion") -> StandInBundle:
    overrides = {"dropout": 0.5, "hidden_dim": 16} if variant == "seq_ctx_fusion" else None
    arch = resolve_arch(variant, CONTRACT.dims(), CONTRACT.ctx_cat_cardinalities, SEQ_LEN, overrides)
    torch.manual_seed(seed)
    model = build_model(arch)
    model.train()  # the replay must switch it to eval mode itself
    return StandInBundle(Path(f"{variant}_{seed}"), model, arch, variant, CONTRACT, scalers)


@pytest.fixture(scope="module")
def probe_result(scalers: FittedScalers, market: pd.DataFrame):
    bundle = probe_bundle(scalers)
    return bundle, replay_bundle(bundle, market, CFG)


def test_runtime_signal_equals_the_model_on_windows_of_the_full_feature_table(
    probe_result, market: pd.DataFrame, full_features: pd.DataFrame, scalers: FittedScalers
) -> None:
    bundle, result = probe_result
    window = np.flatnonzero(replay_window_mask(market["timestamp"], CFG))
    assert result.info["n_steps"] == 6 and len(result.bars) == window.size
    assert result.bars["timestamp"].tolist() == market["timestamp"].iloc[window].tolist()
    # expected: windows of seq_len rows from the full table, scaled as the HDF5 splits are
    scaled = scale_features(full_features, CONTRACT, scalers)
    codes = pd.factorize(market["symbol"])[0]
    valid = full_features["feature_valid"].to_numpy()
    start = window - SEQ_LEN + 1
    ok = (codes[start] == codes[window]) & np.array([valid[s : e + 1].all() for s, e in zip(start, window, strict=True)])
    assert ok.sum() > 0.8 * window.size
    np.testing.assert_array_equal(result.bars["decided"].to_numpy(), ok)
    assert np.isnan(result.bars["signal"].to_numpy()[~ok]).all()
    seq = scaled["seq"][window[ok][:, None] + np.arange(-SEQ_LEN + 1, 1)]
    expected = probe_signal(seq, scaled["snap"][window[ok]], scaled["ctx_cat"][window[ok]].astype(np.int64),
                            scaled["ctx_cont"][window[ok]])
    np.testing.assert_allclose(result.bars["signal"].to_numpy()[ok], expected, rtol=1e-5, atol=1e-5)
    # one forward call per step, in eval mode, without autograd
    assert len(bundle.model.calls) == 6 and set(bundle.model.calls) == {(False, False)}


def test_runtime_features_are_causal_and_match_the_dataset(
    probe_result, market: pd.DataFrame, full_features: pd.DataFrame, scalers: FittedScalers
) -> None:
    _, result = probe_result
    assert result.info["prefix_consistency"] == {"max_abs_diff": 0.0, "ok": True}
    parity = feature_parity(result.raw_features, full_features)
    assert parity["ok"] and parity["max_abs_diff"] == 0.0
    assert parity["n_rows"] == len(result.bars) and parity["n_columns"] == len(CONTRACT.all_names) + 2
    scaled_parity = feature_parity(result.bars, scaled_feature_frame(full_features, CONTRACT, scalers))
    assert scaled_parity["ok"] and scaled_parity["n_columns"] == len(CONTRACT.all_names)
    # a dataset that differs in one cell by more than the tolerance fails, naming the cell
    tampered = full_features.copy()
    row = int(np.flatnonzero(replay_window_mask(market["timestamp"], CFG))[3])
    tampered.loc[row, "rv_5"] = tampered.loc[row, "rv_5"] + 1e-4
    bad = feature_parity(result.raw_features, tampered)
    assert not bad["ok"] and bad["n_mismatched"] == 1 and bad["max_abs_diff"] == pytest.approx(1e-4, rel=1e-2)
    assert bad["worst"]["column"] == "rv_5" and bad["worst"]["symbol"] == market.loc[row, "symbol"]
    assert not feature_parity(result.raw_features.iloc[:0], full_features)["ok"]  # nothing compared


def test_lookahead_in_the_feature_code_is_detected(monkeypatch, scalers: FittedScalers, market: pd.DataFrame) -> None:
    import sentinel_pipeline.replay.runtime as runtime

    def leaky(bars: pd.DataFrame, config: FeatureConfig) -> pd.DataFrame:
        out = compute_features(bars, config)
        out["rv_5"] = out["rv_5"] + np.float32(len(bars) * 1e-6)  # depends on how much data there is
        return out

    monkeypatch.setattr(runtime, "compute_features", leaky)
    result = replay_bundle(probe_bundle(scalers), market, ReplayConfig(window_bars=2))
    assert not result.info["prefix_consistency"]["ok"]
    assert result.info["prefix_consistency"]["max_abs_diff"] > 1e-5


def test_trades_metrics_and_baseline_are_wired_to_the_replay_signal(probe_result, market: pd.DataFrame) -> None:
    _, result = probe_result
    window_bars = market.loc[replay_window_mask(market["timestamp"], CFG)].reset_index(drop=True)
    again = simulate_trades(window_bars, result.bars["signal"], result.bars["atr"], LABEL_PARAMS, CFG)
    pd.testing.assert_frame_equal(again, result.trades)
    assert len(result.trades) > 0 and result.metrics["n_trades_created"] == len(result.trades)
    assert result.metrics["n_candidates"] == int((result.bars["signal"].abs() >= CFG.threshold).sum())
    assert len(result.baseline_trades) == len(result.trades)
    assert result.metrics["ic"] is not None and result.baseline_metrics["ic"] is None
    assert result.equity_curve.iloc[-1] == pytest.approx(1 + result.trades["return"].sum())
    json.dumps({"m": result.metrics, "b": result.baseline_metrics, "i": result.info}, allow_nan=False)


def test_real_model_runs_in_eval_mode_and_is_deterministic(scalers: FittedScalers, market: pd.DataFrame) -> None:
    cfg = ReplayConfig(window_bars=3)
    bundle = real_bundle(scalers, seed=1)
    a = replay_bundle(bundle, market, cfg)
    b = replay_bundle(bundle, market, cfg)  # dropout 0.5 would make these differ in training mode
    np.testing.assert_array_equal(a.bars["signal"].to_numpy(), b.bars["signal"].to_numpy())
    sig = a.bars["signal"].dropna().to_numpy()
    assert sig.size > 0 and (np.abs(sig) <= 1).all() and sig.std() > 0  # P(up) - P(down)
    assert bundle.model.training  # the caller's mode is restored
    transformer = replay_bundle(real_bundle(scalers, seed=2, variant="transformer_tbm"), market, cfg)
    np.testing.assert_array_equal(transformer.bars["decided"].to_numpy(), a.bars["decided"].to_numpy())


def test_feature_config_round_trip_and_refusals() -> None:
    for cfg in (FeatureConfig(), FeatureConfig(context_features=False, seq_len=5, rv_windows=(3, 9)),
                FeatureConfig(return_lags=(1, 4), macd_fast=5, macd_slow=8, hours_per_bucket=6, xs_clip=2.5)):
        contract = build_contract(cfg)
        assert build_contract(feature_config_from_contract(contract)).hash == contract.hash
    other_code = replace(CONTRACT, code_version="0-older")
    with pytest.raises(ContractError, match="feature code version"):
        feature_config_from_contract(other_code)
    specs = list(CONTRACT.features)
    i = next(k for k, f in enumerate(specs) if f.name == "rv_5")
    specs[i] = replace(specs[i], params={"window": 5, "ddof": 1})  # a parameter this code does not know
    with pytest.raises(ContractError, match="cannot be reproduced"):
        feature_config_from_contract(replace(CONTRACT, features=tuple(specs)))


def test_replay_refuses_bad_bundles_and_bars(scalers: FittedScalers, market: pd.DataFrame) -> None:
    bundle = probe_bundle(scalers)
    with pytest.raises(ContractError):
        replay_bundle(replace(bundle, contract=replace(CONTRACT, code_version="x")), market, CFG)
    with pytest.raises(ValueError, match="label_params"):
        replay_bundle(replace(bundle, metadata={}), market, CFG)
    with pytest.raises(ValueError, match="sorted"):
        replay_bundle(bundle, market.iloc[::-1], CFG)


class FakeDayFamily(ModelFamily):
    """A stand-in family whose batches are whole days (registered only inside the test)."""

    name = "fake_days"
    batch_kind = "days"
    variants = (VariantSpec(name="fake_day_ranker", inputs=("seq",),
                            heads=(HeadSpec("ret_5", "regression", "fwd_ret_5", 1, "mse"),),
                            default_arch={}, monitor="val_loss", monitor_mode="min", default_batch_size=1,
                            classifier=False, build=lambda arch: nn.Identity(), family="fake_days",
                            batch_kind="days"),)


def test_replay_refuses_a_bundle_whose_batches_are_not_windows(scalers: FittedScalers, market: pd.DataFrame) -> None:
    bundle = replace(probe_bundle(scalers, name="models/fake_day_ranker__x"), variant="fake_day_ranker")
    with registered(FakeDayFamily()):
        with pytest.raises(ValueError, match=r"models/fake_day_ranker__x: replay serves models of batch kind "
                                             r"'windows' only; 'fake_day_ranker' \(family 'fake_days'\) reads 'days'"):
            replay_bundle(bundle, market, CFG)
        with pytest.raises(ValueError, match="backtest stage"):
            replay_comparison(bundle, None, market, CFG)
    check_replayable(probe_bundle(scalers))  # a window-family bundle passes


def test_comparison_with_previous_bundle_and_outputs(tmp_path: Path, scalers: FittedScalers, market: pd.DataFrame) -> None:
    cfg = ReplayConfig(window_bars=4, threshold=0.05)
    current, previous = real_bundle(scalers, seed=1), real_bundle(scalers, seed=5)
    comp = replay_comparison(current, previous, market, cfg)
    assert comp.previous is not None and comp.previous_error is None
    t = comp.table
    assert t.loc["sharpe", "delta_vs_previous"] == pytest.approx(comp.current.metrics["sharpe"] - comp.previous.metrics["sharpe"])
    assert t.loc["n_trades_created", "delta_vs_baseline"] == 0.0  # the baseline takes the model's trade count
    paths = write_replay_outputs(comp, tmp_path / "replay")
    report = json.loads(paths["report"].read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert report["current"]["info"]["feature_contract_hash"] == CONTRACT.hash
    assert report["previous"]["metrics"]["n_trades_created"] == comp.previous.metrics["n_trades_created"]
    assert paths["equity_curves"].read_bytes()[:4] == b"\x89PNG"
    assert len(pd.read_csv(paths["trades"])) == len(comp.current.trades)
    # a previous bundle this code cannot replay is reported, not fatal
    stale = replace(previous, contract=replace(CONTRACT, code_version="0-older"))
    comp2 = replay_comparison(current, stale, market, cfg)
    assert comp2.previous is None and "cannot be replayed" in comp2.previous_error
    assert comp2.table["previous"].isna().all()


@pytest.mark.realdata
def test_replay_on_real_fx_bars(tmp_path: Path, shared_data_dir: Path) -> None:
    from sentinel_pipeline.data.raw_bars import load_raw_bars

    shutil.copy(shared_data_dir / "fx_eurusd_h1.parquet", tmp_path / "fx.parquet")
    bars = load_raw_bars(tmp_path).bars
    cfg = ReplayConfig(window_days=7.0, threshold=0.02)
    contract = build_contract(FeatureConfig(seq_len=16))
    feats = compute_features(bars, FeatureConfig(seq_len=16))
    before = ~replay_window_mask(bars["timestamp"], cfg) & feats["feature_valid"].to_numpy()
    fitted = {}
    for g in ("seq", "snap"):
        fitted[g] = ClippedRobustScaler().fit(feats.loc[before, contract.names(g)].to_numpy(np.float64))
    sc = FittedScalers(seq=fitted["seq"], snap=fitted["snap"], info={})
    arch = resolve_arch("transformer_tbm", contract.dims(), contract.ctx_cat_cardinalities, 16, None)
    torch.manual_seed(0)
    bundle = StandInBundle(Path("fx"), build_model(arch), arch, "transformer_tbm", contract, sc)
    result = replay_bundle(bundle, bars, cfg)
    assert 100 <= result.info["n_steps"] <= 130  # a week of hourly FX bars
    assert result.info["prefix_consistency"]["ok"]
    assert feature_parity(result.raw_features, feats)["ok"]
    assert result.metrics["ic_method"] in ("pooled", "none")  # one symbol: no cross-section
    assert result.metrics["sharpe_periods_per_year"] == 252.0
    assert result.bars["decided"].all()  # years of history before the window: every bar decides
