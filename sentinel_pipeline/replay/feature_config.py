"""Rebuild the ``FeatureConfig`` a bundle's features were computed with from its feature contract.

``data/features.py`` turns a :class:`FeatureConfig` into a contract (``build_contract``) but offers no
inverse, and a replay must compute features exactly as at training time. Every window parameter a
feature depends on is in that feature's ``params`` (the features module's rule), so the config can be
read back from the contract. The result is accepted only if ``build_contract(config)`` hashes to the
contract's hash (which also covers ``FEATURE_CODE_VERSION``): a contract this code cannot reproduce —
other feature code, or a parameter this mapping does not know — is refused with a ``ContractError``.
"""

from __future__ import annotations

import re
from typing import Any

from sentinel_pipeline.data.feature_contract import ContractError, FeatureContract, FeatureSpec
from sentinel_pipeline.data.features import FEATURE_CODE_VERSION, FeatureConfig, build_contract
from sentinel_pipeline.data.ffd import FFDConfig


def _matching(contract: FeatureContract, group: str, pattern: str) -> list[FeatureSpec]:
    rx = re.compile(pattern)
    return [f for f in contract.features if f.group == group and rx.fullmatch(f.name)]


def _param(specs: list[FeatureSpec], key: str) -> Any:
    """The value of ``key`` shared by ``specs`` (refused when they disagree); ``None`` when absent."""
    values = {repr(f.params[key]): f.params[key] for f in specs if key in f.params}
    if len(values) > 1:
        raise ContractError(f"features {[f.name for f in specs]} disagree on {key!r}: {sorted(values)}")
    return next(iter(values.values()), None)


def feature_config_from_contract(contract: FeatureContract) -> FeatureConfig:
    """The :class:`FeatureConfig` whose ``build_contract`` is ``contract`` (hash-checked)."""
    if contract.code_version != FEATURE_CODE_VERSION:
        raise ContractError(
            f"feature contract {contract.hash} was built by feature code version {contract.code_version!r}; "
            f"this code is version {FEATURE_CODE_VERSION!r} and cannot reproduce its features"
        )
    kw: dict[str, Any] = {"seq_len": contract.seq_len, "context_features": contract.context_features}

    def lags(group: str, pattern: str, key: str = "lag") -> tuple[int, ...]:
        return tuple(int(f.params[key]) for f in _matching(contract, group, pattern))

    def put(field: str, specs: list[FeatureSpec], key: str) -> None:
        value = _param(specs, key)
        if value is not None:
            kw[field] = value

    kw["atr_window"] = _param([f for f in contract.features if "atr_window" in f.params], "atr_window")
    if kw["atr_window"] is None:
        del kw["atr_window"]
    # seq
    kw["return_lags"] = lags("seq", r"ret_\d+")
    momentum = _matching(contract, "seq", r"ret_\d+_vn")
    kw["momentum_lags"] = tuple(int(f.params["lag"]) for f in momentum)
    put("momentum_rv_window", momentum, "rv_window")
    kw["rv_windows"] = lags("seq", r"rv_\d+", "window")
    put("rsi_window", _matching(contract, "seq", r"rsi_\d+"), "window")
    macd = _matching(contract, "seq", r"macd_(line|hist)")
    put("macd_fast", macd, "fast")
    put("macd_slow", macd, "slow")
    put("macd_signal", macd, "signal")
    put("volume_z_window", _matching(contract, "seq", r"vol_z_\d+"), "window")
    # snap
    kw["range_windows"] = lags("snap", r"dist_high_\d+", "window")
    kw["sma_windows"] = lags("snap", r"px_sma_\d+", "window")
    ratio = _matching(contract, "snap", r"vol_ratio_\d+_\d+")
    if ratio:
        kw["vol_ratio_windows"] = (int(ratio[0].params["short"]), int(ratio[0].params["long"]))
    zret = _matching(contract, "snap", r"ret_\d+_z")
    kw["zret_lags"] = tuple(int(f.params["lag"]) for f in zret)
    put("zret_rv_window", zret, "rv_window")
    put("snap_rsi_window", _matching(contract, "snap", r"rsi_\d+"), "window")
    put("snap_volume_z_window", _matching(contract, "snap", r"vol_z_\d+"), "window")
    # context
    put("hours_per_bucket", _matching(contract, "ctx_cat", "hour_bucket"), "hours_per_bucket")
    vol_regime = _matching(contract, "ctx_cat", "vol_regime")
    put("vol_regime_rv_window", vol_regime, "rv_window")
    put("vol_regime_history", vol_regime, "history")
    put("vol_regime_min_periods", vol_regime, "min_periods")
    trend = _matching(contract, "ctx_cat", "trend_regime")
    put("trend_ema_window", trend, "ema_window")
    put("trend_slope_bars", trend, "slope_bars")
    put("trend_threshold_atr", trend, "threshold_atr")
    put("symbol_buckets", _matching(contract, "ctx_cat", "symbol_bucket"), "buckets")
    put("session_bar_scale", _matching(contract, "ctx_cont", "session_bar"), "scale")
    xs = _matching(contract, "ctx_cont", "xs_ret_z")
    put("xs_rv_window", xs, "rv_window")
    put("xs_clip", xs, "clip")
    # daily bars: month and the cross-sectional ranks carry bar_frequency="daily" and their sources' params
    if any(f.params.get("bar_frequency") == "daily" for f in contract.features):
        kw["bar_frequency"] = "daily"
        ranks = _matching(contract, "seq", r"xs_rank_.+")
        kw["xs_rank_return_lags"] = tuple(int(f.params["lag"]) for f in ranks if "lag" in f.params)
        put("xs_rank_rv_window", [f for f in ranks if f.params.get("source", "").startswith("rv_")], "window")
        put("xs_rank_volume_z_window", [f for f in ranks if f.params.get("source", "").startswith("vol_z_")], "window")

    # the optional FFD group: its order d was chosen on the train window and is in the contract
    ffd = _matching(contract, "seq", "ffd_logclose")
    if ffd:
        p = ffd[0].params
        grid = p.get("d_grid", [0.0, 1.0, 0.05])
        kw["ffd"] = FFDConfig(d=p.get("d"), tau=p.get("tau", 1e-4), max_window=p.get("max_window", 500),
                              d_step=grid[2], d_max=grid[1], adf_level=p.get("adf_level", 0.05),
                              min_adf_obs=p.get("min_adf_obs", 50))
    try:
        config = FeatureConfig(**kw)
    except (TypeError, ValueError) as exc:
        raise ContractError(f"feature contract {contract.hash}: cannot rebuild its FeatureConfig: {exc}") from exc
    rebuilt = build_contract(config)
    if rebuilt.hash != contract.hash:
        differ = sorted(set(map(repr, (f.to_dict() for f in rebuilt.features)))
                        ^ set(map(repr, (f.to_dict() for f in contract.features))))
        raise ContractError(
            f"feature contract {contract.hash} cannot be reproduced by this feature code: the rebuilt "
            f"FeatureConfig gives contract {rebuilt.hash} (differing features: {differ[:4]})"
        )
    return config
