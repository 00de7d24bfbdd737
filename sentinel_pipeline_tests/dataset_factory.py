"""Build a small, fully-formed labelled dataset in memory, without running stages 1-4.

Tests of the later stages (scalers, HDF5 splits, Arrow cache, training) need realistic inputs fast.
:func:`make_labelled_dataset` returns ``(dataset_df, assignment_df, contract)`` shaped exactly like
the outputs of ``labels.label_dataset`` and ``splits.assign_splits`` (docs/architecture.md):

- ``dataset_df``: one row per bar sorted by (symbol, timestamp), RangeIndex; ``symbol`` (str),
  ``timestamp`` (datetime64[ns, UTC], 5-minute grid), random-walk ``open/high/low/close/volume``,
  ``atr``, every contract feature (float32 random noise, ``ctx_cat`` int32 codes), ``feature_valid``,
  ``tb_label`` (int8), the float targets of ``split_arrays.TARGET_NAMES`` and ``label_eligible``.
  Symbols start at staggered times (symbol k starts ``3 * k`` bars after symbol 0), so they do not
  share one time range. Invalid features: the first ``seq_len + 2`` bars of each symbol (warm-up)
  and a few isolated bars with a NaN feature.
  ``tb_label`` is ``sign(fwd_ret_5)`` with a dead zone of 0.2% (the features are pure noise: the
  data is for plumbing tests, not for learning). Ineligible rows (the last ``LABEL_WINDOW`` bars of
  each symbol) have NaN targets and ``tb_label = 0``.
- ``assignment_df``: ``split`` (70/15/15 of the sorted unique timestamps), ``purged`` (the bar
  ``LABEL_WINDOW`` bars later lies in a later split or does not exist), ``embargoed`` (first
  ``EMBARGO_BARS`` distinct timestamps after each cut), ``sample_ok``.
- ``contract``: a :class:`FeatureContract` with 5 seq, 3 snap and (when ``context``) 2 ctx_cat and
  2 ctx_cont features; ``n_snap=0`` etc. give zero-width groups.

Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sentinel_pipeline.data.feature_contract import FeatureContract, FeatureSpec
from sentinel_pipeline.data.split_arrays import TARGET_NAMES

LABEL_WINDOW = 20
EMBARGO_BARS = 3
LABEL_PARAMS: dict[str, object] = {
    "pt": 1.5,
    "sl": 1.5,
    "horizon": 20,
    "fwd_horizons": [1, 5, 10, 20],
    "excursion_bars": 6,
}
CTX_CARDINALITIES = (3, 5)


def make_contract(
    seq_len: int = 8, context: bool = True, n_seq: int = 5, n_snap: int = 3, code_version: str = "test-factory-1"
) -> FeatureContract:
    """A contract with ``n_seq`` seq and ``n_snap`` snap features (+ 2 ctx_cat, 2 ctx_cont with context)."""
    feats = [FeatureSpec(f"seq_f{i}", "seq", "float32", {"i": i}) for i in range(n_seq)]
    feats += [FeatureSpec(f"snap_f{i}", "snap", "float32", {"i": i}) for i in range(n_snap)]
    if context:
        feats += [
            FeatureSpec(f"ctx_cat_{i}", "ctx_cat", "int32", {}, cardinality=c) for i, c in enumerate(CTX_CARDINALITIES)
        ]
        feats += [FeatureSpec(f"ctx_cont_{i}", "ctx_cont", "float32", {}) for i in range(2)]
    return FeatureContract(tuple(feats), seq_len=seq_len, context_features=context, code_version=code_version)


def make_labelled_dataset(
    n_symbols: int = 4,
    n_bars: int = 300,
    seq_len: int = 8,
    context: bool = True,
    seed: int = 0,
    n_seq: int = 5,
    n_snap: int = 3,
    train_frac: float = 0.7,
    val_frac: float = 0.15,
) -> tuple[pd.DataFrame, pd.DataFrame, FeatureContract]:
    """Return ``(dataset_df, assignment_df, contract)``; see the module docstring for the layout."""
    rng = np.random.default_rng(seed)
    contract = make_contract(seq_len, context, n_seq, n_snap)
    n = n_symbols * n_bars
    sym_code = np.repeat(np.arange(n_symbols), n_bars)
    pos = np.tile(np.arange(n_bars), n_symbols)  # bar number within its symbol
    grid = pos + 3 * sym_code  # staggered starts on a shared 5-minute grid
    t0 = pd.Timestamp("2024-01-02 09:30", tz="UTC")
    timestamp = pd.DatetimeIndex(t0 + pd.to_timedelta(grid * 5, unit="min")).as_unit("ns")

    # random-walk OHLCV
    steps = rng.normal(0.0, 0.002, size=n)
    steps[pos == 0] = 0.0
    log_close = np.log(50.0 + 10.0 * sym_code) + _group_cumsum(steps, sym_code)
    close = np.exp(log_close)
    open_ = close * np.exp(-steps)
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.001, n)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.001, n)))
    volume = rng.integers(100, 10_000, size=n).astype(np.float64)
    atr = (high - low) * 1.0 + 1e-6

    df = pd.DataFrame(
        {
            "symbol": pd.array([f"SYM{k:02d}" for k in sym_code], dtype="str"),
            "timestamp": timestamp,
            "open": open_,
            "high": high,
            "low": low,
            "close": close,
            "volume": volume,
            "atr": atr,
        }
    )
    valid = pos >= seq_len + 2
    holes = rng.random(n) < 0.01  # isolated invalid bars mid-series
    valid &= ~holes
    cards = dict(zip(contract.names("ctx_cat"), contract.ctx_cat_cardinalities, strict=True))
    for j, spec in enumerate(contract.features):  # contract order, like features.compute_features
        if spec.group == "ctx_cat":
            df[spec.name] = rng.integers(0, cards[spec.name], size=n).astype(np.int32)
        else:
            col = rng.standard_t(df=4, size=n).astype(np.float32) * np.float32(1.0 + j % 4)
            col[~valid] = np.nan
            df[spec.name] = col
    df["feature_valid"] = valid

    # targets from the future path of the same symbol; NaN on the last LABEL_WINDOW bars
    eligible = pos < n_bars - LABEL_WINDOW
    targets = {}
    for h in (1, 5, 10, 20):
        fut = np.roll(close, -h)
        targets[f"fwd_ret_{h}"] = fut / close - 1.0
    targets["mfe_6"] = np.abs(rng.normal(0, 1, n))
    targets["mae_6"] = np.abs(rng.normal(0, 1, n))
    targets["early_move"] = targets["mfe_6"] - targets["mae_6"]
    targets["tb_return"] = targets["fwd_ret_20"]
    targets["tb_return_atr"] = targets["tb_return"] * close / atr
    label = np.sign(targets["fwd_ret_5"]) * (np.abs(targets["fwd_ret_5"]) > 0.002)
    df["tb_label"] = np.where(eligible, label, 0).astype(np.int8)
    for name in TARGET_NAMES:
        df[name] = np.where(eligible, targets[name], np.nan)
    df["label_eligible"] = eligible

    assignment = _assign(df, sym_code, pos, n_bars, train_frac, val_frac)
    return df, assignment, contract


def _group_cumsum(x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at each new code (codes sorted)."""
    total = np.cumsum(x)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    offsets = np.r_[0.0, total][starts]
    lengths = np.diff(np.r_[starts, len(x)])
    return total - np.repeat(offsets, lengths)


def _assign(
    df: pd.DataFrame, sym_code: np.ndarray, pos: np.ndarray, n_bars: int, train_frac: float, val_frac: float
) -> pd.DataFrame:
    ts = df["timestamp"].to_numpy(dtype="datetime64[ns]").view("int64")
    uniq = np.unique(ts)
    cut1 = uniq[int(len(uniq) * train_frac)]
    cut2 = uniq[int(len(uniq) * (train_frac + val_frac))]
    split_code = (ts >= cut1).astype(np.int8) + (ts >= cut2).astype(np.int8)
    split = np.array(["train", "val", "test"], dtype=object)[split_code]
    # purged: the bar LABEL_WINDOW later (same symbol) is in a later split, or does not exist
    has_future = pos + LABEL_WINDOW < n_bars
    fut_idx = np.minimum(np.arange(len(df)) + LABEL_WINDOW, len(df) - 1)
    purged = ~has_future | (split_code[fut_idx] > split_code)
    # embargo: the first EMBARGO_BARS distinct timestamps at/after each cut
    emb_ts = np.concatenate([uniq[uniq >= c][:EMBARGO_BARS] for c in (cut1, cut2)])
    embargoed = np.isin(ts, emb_ts)
    sample_ok = df["label_eligible"].to_numpy() & df["feature_valid"].to_numpy() & ~purged & ~embargoed
    return pd.DataFrame(
        {"split": pd.array(split, dtype="str"), "purged": purged, "embargoed": embargoed, "sample_ok": sample_ok}
    )
