"""The synthetic panel preset: a deterministic daily OHLCV universe with a planted cross-sectional signal.

The daily panel configuration (``data_half.panel_config``) reads this panel by default: it is generated
by :func:`ensure_synthetic_panel` into its own folder (``data/synthetic_panel/``, never a raw landing
zone) and named "synthetic panel" in every ``data_source`` line (:func:`describe_panel`). The same
configuration always gives the identical frame; the file name carries a digest of the configuration.

Model (symbol ``i`` in sector ``s(i)``, trading day ``t``; returns are daily log returns of the close)::

    r[i,t]     = mu[i,t] + beta_i * sqrt(hm[t]) * zm[t] + gamma_i * f[s(i),t] + sqrt(hi[i,t]) * zi[i,t]
    hm, hi     GARCH(1,1) variances of the market and idiosyncratic shocks (as in synthetic_market)
    f[s,t]     sector factor: sector_vol / sqrt(252) * Student-t shock (n_sectors independent factors)
    sigma[i,t] = sqrt(beta_i^2 hm[t] + gamma_i^2 var_f + hi[i,t])          (the symbol's daily vol)
    c[i,t+1]   = phi * c[i,t] + sqrt(1 - phi^2) * eta[i,t]                   (latent characteristic, AR(1))
    q[i,t]     = 2 * (rank of c[i,t] among the symbols on day t - 1) / (n - 1) - 1     (in [-1, 1])
    mu[i,t+1]  = signal_strength * sigma[i,t+1] * q[i,t]                    (planted drift, next day)

- **Sectors** (``n_sectors``, default 10): symbols are dealt to sectors in turn after a seeded
  shuffle, so sectors are of equal size (+-1). Each sector has its own factor with loading
  ``gamma_i`` ~ U(``sector_loading_range``); with the market factor (``beta_i`` ~ U(``beta_range``))
  the daily return correlation is 0.35 within a sector and 0.22 across sectors at the defaults.
- **Volatility**: GARCH(1,1) on the market and on every symbol's idiosyncratic shock (volatility
  clustering); all shocks are Student-t with ``t_dof`` degrees of freedom, scaled to unit variance
  (fat tails).
- **Planted cross-sectional signal**: ``c`` is a slowly varying latent characteristic (AR(1) with a
  half-life of ``characteristic_half_life`` days, stationary N(0, 1), independent of the returns).
  Its cross-sectional rank on day ``t``, centred to ``q`` in [-1, 1], sets the next day's drift in
  units of that day's volatility. The drift is zero-sum in rank across the universe, so it moves
  **relative** returns: the top-ranked symbol drifts up ``signal_strength`` sigma a day, the bottom one
  down. ``signal_strength = 0`` gives exactly zero drift (a null panel, same shocks and prices
  otherwise).
- **How a model can learn it**: the drift persists (``c`` has a half-life of months), so it
  accumulates into the trailing returns: the cross-sectional rank of the 60-day momentum (the daily
  feature ``xs_rank_ret_60``; also ``ret_60_z``, ``xs_rank_ret_20``) is correlated with ``q`` and
  therefore predicts next-k-day relative returns. Nothing else carries the signal (volume does not
  depend on ``c``). Measured with :func:`signal_report` (mean per-day Spearman IC against the
  next-5-day log return over the last 15 % of days, Newey-West t with 4 lags; 320 symbols x 1008
  days, seeds 0-2); the figures are in docs/architecture.md, "Daily panel configuration".
- **Bars**: ``open`` = previous close x exp(overnight gap), the gap a share ``overnight_share`` of the
  day's return plus the matching Brownian-bridge noise; ``high``/``low`` are exact draws of the
  maximum/minimum of a Brownian bridge from ``open`` to ``close`` (the machinery of synthetic_market),
  so ``high >= max(open, close)`` and ``low <= min(open, close)`` by construction and every price is
  > 0. Volume: per-symbol base level x ``sigma / long-run sigma`` x ``exp(volume_abs_coef *
  |standardised shock| + noise)``, whole shares, at least 1.
- **Calendar**: ``n_days`` weekdays from ``start`` skipping the fixed holidays of synthetic_market,
  stamped 00:00 UTC (like the real daily panel). Every symbol trades every day (a rectangular panel).

Vectorised NumPy: the AR(1) characteristic is ``scipy.signal.lfilter`` along time, the ranks are
``scipy.stats.rankdata`` per day, the GARCH recursion is synthetic_market's numba kernel.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import signal as sps_signal
from scipy import stats as sps_stats

from sentinel_pipeline.atomic_io import atomic_path
from sentinel_pipeline.data.raw_bars import RAW_COLUMNS
from sentinel_pipeline.data.synthetic_market import _garch_variance, trading_days

PANEL_FILE_PREFIX = "synthetic_panel-"


@dataclass(frozen=True)
class SyntheticPanelConfig:
    """Parameters of the synthetic daily panel (see the module docstring for the model)."""

    seed: int = 0
    n_symbols: int = 320
    n_days: int = 1008  # trading days: four years
    start: str = "2019-01-02"
    n_sectors: int = 10
    signal_strength: float = 0.12  # drift of the top/bottom ranked symbol, in daily sigmas; 0 = null
    characteristic_half_life: float = 120.0  # days
    t_dof: float = 5.0
    garch_alpha: float = 0.05
    garch_beta: float = 0.93
    market_vol_annual: float = 0.16
    sector_vol_annual: float = 0.12
    idio_vol_annual: tuple[float, float] = (0.15, 0.40)
    beta_range: tuple[float, float] = (0.6, 1.4)
    sector_loading_range: tuple[float, float] = (0.6, 1.4)
    price_range: tuple[float, float] = (10.0, 500.0)
    base_volume_range: tuple[float, float] = (2e5, 2e7)
    overnight_share: float = 0.3  # share of the day's variance that falls between close and open
    volume_abs_coef: float = 0.5
    volume_noise: float = 0.3

    def __post_init__(self) -> None:
        if self.n_symbols < 20:
            raise ValueError(f"SyntheticPanelConfig.n_symbols must be >= 20, got {self.n_symbols}")
        if self.n_days < 2:
            raise ValueError(f"SyntheticPanelConfig.n_days must be >= 2, got {self.n_days}")
        if not 1 <= self.n_sectors <= self.n_symbols:
            raise ValueError(f"SyntheticPanelConfig.n_sectors must be in [1, n_symbols], got {self.n_sectors}")
        if not (math.isfinite(self.signal_strength) and self.signal_strength >= 0):
            raise ValueError(f"SyntheticPanelConfig.signal_strength must be finite and >= 0, got {self.signal_strength}")
        if not self.characteristic_half_life > 0:
            raise ValueError("SyntheticPanelConfig.characteristic_half_life must be > 0")
        if self.t_dof <= 2:
            raise ValueError(f"SyntheticPanelConfig.t_dof must be > 2 (finite variance), got {self.t_dof}")
        if self.garch_alpha < 0 or self.garch_beta < 0 or self.garch_alpha + self.garch_beta >= 1:
            raise ValueError("SyntheticPanelConfig: GARCH needs alpha, beta >= 0 and alpha + beta < 1")
        if not 0.0 <= self.overnight_share < 1.0:
            raise ValueError("SyntheticPanelConfig.overnight_share must be in [0, 1)")


@dataclass
class SyntheticPanel:
    """A generated panel: ``bars`` (RAW_COLUMNS, sorted by symbol then day) and the oracle state,
    row-aligned with ``bars``: ``sector`` (int per symbol, also per row in ``row_sector``),
    ``characteristic_rank`` (``q[i,t]`` in [-1, 1], known at day t's close), ``drift_next`` (the planted
    drift of day t+1's log return; exactly 0 at strength 0), ``sigma`` (day t's volatility)."""

    bars: pd.DataFrame
    symbols: list[str]
    sector: np.ndarray
    row_sector: np.ndarray
    characteristic_rank: np.ndarray
    drift_next: np.ndarray
    sigma: np.ndarray
    config: SyntheticPanelConfig


def _unit_t(rng: np.random.Generator, dof: float, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_t(dof, shape) / math.sqrt(dof / (dof - 2.0))


def centred_ranks(x: np.ndarray) -> np.ndarray:
    """Per column (day) of ``x`` (symbols x days): the rank of each symbol mapped to [-1, 1], ties averaged."""
    n = x.shape[0]
    r = sps_stats.rankdata(x, axis=0, method="average")
    return 2.0 * (r - 1.0) / (n - 1.0) - 1.0 if n > 1 else np.zeros_like(x)


def simulate_panel(config: SyntheticPanelConfig | None = None) -> SyntheticPanel:
    """Generate the synthetic panel and its oracle state (see the module docstring)."""
    cfg = config if config is not None else SyntheticPanelConfig()
    rng = np.random.default_rng(cfg.seed)
    n, t_len, k = cfg.n_symbols, cfg.n_days, cfg.n_sectors

    # per-symbol parameters
    sector = np.empty(n, dtype=np.int64)
    sector[rng.permutation(n)] = np.arange(n) % k
    betas = rng.uniform(*cfg.beta_range, n)
    gammas = rng.uniform(*cfg.sector_loading_range, n)
    idio_var = rng.uniform(*cfg.idio_vol_annual, n) ** 2 / 252.0
    log_p0 = rng.uniform(np.log(cfg.price_range[0]), np.log(cfg.price_range[1]), n)
    base_volume = np.exp(rng.uniform(np.log(cfg.base_volume_range[0]), np.log(cfg.base_volume_range[1]), n))

    # shocks and variances
    zm = _unit_t(rng, cfg.t_dof, (1, t_len))
    zi = _unit_t(rng, cfg.t_dof, (n, t_len))
    zs = _unit_t(rng, cfg.t_dof, (k, t_len))
    persistence = 1.0 - cfg.garch_alpha - cfg.garch_beta
    market_var = cfg.market_vol_annual**2 / 252.0
    hm = _garch_variance(zm, np.array([market_var * persistence]), cfg.garch_alpha, cfg.garch_beta)[0]
    hi = _garch_variance(zi, idio_var * persistence, cfg.garch_alpha, cfg.garch_beta)
    sector_var = cfg.sector_vol_annual**2 / 252.0
    sector_ret = math.sqrt(sector_var) * zs  # (k, T)
    common = betas[:, None] * np.sqrt(hm[None, :t_len]) * zm + gammas[:, None] * sector_ret[sector]
    shock = common + np.sqrt(hi[:, :t_len]) * zi
    sigma = np.sqrt(betas[:, None] ** 2 * hm[None, :t_len] + gammas[:, None] ** 2 * sector_var + hi[:, :t_len])

    # latent characteristic: stationary AR(1) along time, independent of the returns
    phi = 0.5 ** (1.0 / cfg.characteristic_half_life)
    eta = rng.standard_normal((n, t_len))
    eta[:, 0] /= math.sqrt(1.0 - phi * phi)  # start in the stationary distribution
    c = sps_signal.lfilter([math.sqrt(1.0 - phi * phi)], [1.0, -phi], eta, axis=1)
    q = centred_ranks(c)
    drift = np.zeros((n, t_len))
    if cfg.signal_strength > 0:
        drift[:, 1:] = cfg.signal_strength * sigma[:, 1:] * q[:, :-1]
    r = drift + shock
    drift_next = np.zeros((n, t_len))
    drift_next[:, :-1] = drift[:, 1:]
    if cfg.signal_strength > 0:  # the drift of the day after the last (the oracle's last prediction)
        sig_last = np.sqrt(betas**2 * hm[t_len] + gammas**2 * sector_var + hi[:, t_len])
        drift_next[:, -1] = cfg.signal_strength * sig_last * q[:, -1]

    # prices: close from cumulated log returns; open/high/low from Brownian-bridge draws
    log_close = log_p0[:, None] + np.cumsum(r, axis=1)
    log_prev = np.concatenate([log_p0[:, None], log_close[:, :-1]], axis=1)
    w = cfg.overnight_share
    bar_var = sigma**2
    gap = w * r + np.sqrt(w * (1.0 - w) * bar_var) * rng.standard_normal((n, t_len))
    log_open = log_prev + gap
    move = r - gap
    v = (1.0 - w) * bar_var
    up = 0.5 * (move + np.sqrt(move**2 - 2.0 * v * np.log1p(-rng.random((n, t_len)))))
    down = 0.5 * (move - np.sqrt(move**2 - 2.0 * v * np.log1p(-rng.random((n, t_len)))))

    # volume: level x volatility regime x exp(|standardised shock| + noise); E|shock| is about 0.8
    long_run = np.sqrt(betas**2 * market_var + gammas**2 * sector_var + idio_var)[:, None]
    volume = base_volume[:, None] * (sigma / long_run) * np.exp(
        cfg.volume_abs_coef * (np.abs(shock) / sigma - 0.8) + cfg.volume_noise * rng.standard_normal((n, t_len)))
    volume = np.maximum(np.round(volume), 1.0)

    days_ns = trading_days(cfg.start, t_len).astype("datetime64[ns]").astype(np.int64)
    width = max(3, len(str(n - 1)))
    symbols = [f"PNL{i:0{width}d}" for i in range(n)]
    codes = np.repeat(np.arange(n, dtype=np.int32), t_len)
    columns = {
        "symbol": pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(symbols)).cast(pa.string()),
        "timestamp": pa.array(np.tile(days_ns, n), type=pa.timestamp("ns", tz="UTC")),
        "open": np.exp(log_open).ravel(),
        "high": np.exp(log_open + up).ravel(),
        "low": np.exp(log_open + down).ravel(),
        "close": np.exp(log_close).ravel(),
        "volume": volume.ravel(),
    }
    bars = pa.table({col: columns[col] for col in RAW_COLUMNS}).to_pandas()
    return SyntheticPanel(bars=bars, symbols=symbols, sector=sector, row_sector=np.repeat(sector, t_len),
                          characteristic_rank=q.ravel(), drift_next=drift_next.ravel(), sigma=sigma.ravel(),
                          config=cfg)


def sector_map(panel: SyntheticPanel) -> pd.DataFrame:
    """The panel's sectors as a ``symbol, sector`` table (``sector`` = ``"S00"``, ``"S01"``, ...): the
    form a user-supplied sector map takes (e.g. the symbol graph's sector edges)."""
    width = max(2, len(str(panel.config.n_sectors - 1)))
    return pd.DataFrame({"symbol": panel.symbols, "sector": [f"S{k:0{width}d}" for k in panel.sector]})


def generate_synthetic_panel(config: SyntheticPanelConfig | None = None) -> pd.DataFrame:
    """The synthetic panel's bars: RAW_COLUMNS, sorted by (symbol, timestamp), deterministic for a config."""
    return simulate_panel(config).bars


# -- measurement -------------------------------------------------------------------------------
def daily_rank_ic(score: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per day (column) Spearman correlation of ``score`` and ``target`` (symbols x days) over the
    symbols where both are finite; NaN for a day with fewer than 3 such symbols."""
    score = np.asarray(score, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    ok = np.isfinite(score) & np.isfinite(target)
    a = np.where(ok, score, np.nan)
    b = np.where(ok, target, np.nan)
    ra = pd.DataFrame(a).rank(axis=0).to_numpy(copy=True)  # NaN stays NaN; ties averaged
    rb = pd.DataFrame(b).rank(axis=0).to_numpy(copy=True)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN days (no forward window) stay NaN
        ra -= np.nanmean(ra, axis=0)
        rb -= np.nanmean(rb, axis=0)
    num = np.nansum(ra * rb, axis=0)
    den = np.sqrt(np.nansum(ra * ra, axis=0) * np.nansum(rb * rb, axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        ic = num / den
    ic[ok.sum(axis=0) < 3] = np.nan
    return ic


def signal_report(panel: SyntheticPanel, horizon: int = 5, last_fraction: float = 0.15,
                  momentum_lag: int = 60) -> dict[str, Any]:
    """The planted signal, measured: per-day Spearman IC against the next-``horizon``-day log return
    (days t+1..t+horizon) of (a) the oracle ``q`` (latent characteristic rank) and (b) a plain feature,
    the cross-sectional rank of the ``momentum_lag``-day log return up to day t; mean IC with a
    Newey-West t (``horizon - 1`` lags: the forward windows overlap) over the last ``last_fraction`` of
    the days that have a full forward window, and over all of them."""
    from sentinel_pipeline.evaluation.statistics import hac_mean_test  # statistics only; no stage code

    cfg = panel.config
    n, t_len = cfg.n_symbols, cfg.n_days
    lc = np.log(panel.bars["close"].to_numpy()).reshape(n, t_len)
    fwd = np.full((n, t_len), np.nan)
    fwd[:, :-horizon] = lc[:, horizon:] - lc[:, :-horizon]
    mom = np.full((n, t_len), np.nan)
    mom[:, momentum_lag:] = lc[:, momentum_lag:] - lc[:, :-momentum_lag]
    q = panel.characteristic_rank.reshape(n, t_len)
    usable = np.arange(t_len) < t_len - horizon
    first_tail = int(np.flatnonzero(usable)[-1] + 1 - round(last_fraction * usable.sum()))
    out: dict[str, Any] = {"horizon": horizon, "last_fraction": last_fraction, "hac_lag": horizon - 1,
                           "signal_strength": cfg.signal_strength, "seed": cfg.seed,
                           "tail_days": int(usable.sum() - first_tail)}
    for name, score in (("oracle", q), (f"xs_rank_ret_{momentum_lag}", mom)):
        ic = daily_rank_ic(score, fwd)
        tail = ic[first_tail:][usable[first_tail:]]
        whole = ic[usable]
        t_tail, t_all = hac_mean_test(tail, horizon - 1), hac_mean_test(whole, horizon - 1)
        out[name] = {"ic_tail": t_tail.mean, "t_tail": t_tail.t, "ic_all": t_all.mean, "t_all": t_all.t,
                     "n_days_tail": t_tail.n}
    return out


def sector_correlations(panel: SyntheticPanel) -> dict[str, float]:
    """Mean pairwise correlation of daily close-to-close log returns within and across sectors."""
    cfg = panel.config
    lc = np.log(panel.bars["close"].to_numpy()).reshape(cfg.n_symbols, cfg.n_days)
    corr = np.corrcoef(np.diff(lc, axis=1))
    same = panel.sector[:, None] == panel.sector[None, :]
    off = ~np.eye(cfg.n_symbols, dtype=bool)
    return {"within_sector": float(corr[same & off].mean()), "across_sectors": float(corr[~same].mean())}


# -- files ---------------------------------------------------------------------------------------
def panel_digest(config: SyntheticPanelConfig | None = None) -> str:
    """16 hex digits of sha256 over the configuration (every field), naming its generated file."""
    body = json.dumps(asdict(config or SyntheticPanelConfig()), sort_keys=True, default=str)
    return hashlib.sha256(f"synthetic_panel:{body}".encode()).hexdigest()[:16]


def describe_panel(config: SyntheticPanelConfig | None = None) -> str:
    """One line that says plainly that the data is the synthetic panel, and which one."""
    c = config or SyntheticPanelConfig()
    return (f"synthetic panel (seed {c.seed}, {c.n_symbols} symbols x {c.n_days} daily bars, {c.n_sectors} sectors, "
            f"cross-sectional signal strength {c.signal_strength:g}); not real market data")


def ensure_synthetic_panel(directory: str | Path, config: SyntheticPanelConfig | None = None) -> Path:
    """The parquet file of the synthetic panel for ``config`` in ``directory`` (its own folder, e.g.
    ``data/synthetic_panel/``), generated when absent; other generated panels there are removed. The file
    is ``synthetic_panel-<digest>.parquet`` with a JSON sidecar of the configuration and the sector map
    ``synthetic_panel-<digest>.sectors.csv`` (:func:`panel_sector_file`). Never point ``directory`` at a
    raw landing zone (the data half reads the parquet file alone, never the folder)."""
    config = config or SyntheticPanelConfig()
    directory = Path(directory)
    name = f"{PANEL_FILE_PREFIX}{panel_digest(config)}"
    path = directory / f"{name}.parquet"
    sectors = panel_sector_file(directory, config)
    if not (path.is_file() and sectors.is_file()):
        panel = simulate_panel(config)
        with atomic_path(sectors) as tmp:
            sector_map(panel).to_csv(tmp, index=False)
        with atomic_path(path) as tmp:
            panel.bars.to_parquet(tmp, index=False)
        with atomic_path(directory / f"{name}.json") as tmp:
            tmp.write_text(json.dumps({"description": describe_panel(config), "config": asdict(config)},
                                      indent=2, sort_keys=True, default=str) + "\n")
    for old in directory.glob(f"{PANEL_FILE_PREFIX}*"):
        if old.name.split(".")[0] != name and old.is_file():
            old.unlink()
    return path


def panel_sector_file(directory: str | Path, config: SyntheticPanelConfig | None = None) -> Path:
    """Where :func:`ensure_synthetic_panel` writes the panel's ``symbol, sector`` CSV."""
    return Path(directory) / f"{PANEL_FILE_PREFIX}{panel_digest(config or SyntheticPanelConfig())}.sectors.csv"
