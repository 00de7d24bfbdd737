"""Stage 3: triple-barrier labels, forward returns and excursions, computed by one numba kernel.

For every bar ``t`` of a symbol (entry at ``close[t]``, volatility unit ``atr[t]``):

- **Triple barrier** on high/low. ``upper = close[t] + pt * atr[t]``, ``lower = close[t] - sl * atr[t]``.
  Bars ``t+1 .. t+horizon`` of the same symbol are scanned in order; the first bar with
  ``high >= upper`` gives ``+1``, the first with ``low <= lower`` gives ``-1``. A bar that touches both
  gives ``-1`` (conservative: the order inside a bar is unknown) and ``tb_both_touched = True``. No touch
  gives ``0`` at the vertical barrier (bar ``t+horizon``).
- ``tb_touch_time``: timestamp of the touching bar (vertical: of bar ``t+horizon``);
  ``tb_bars_to_touch``: how many bars after ``t`` that is (``horizon`` when vertical);
  ``tb_return``: simple return from ``close[t]`` to the barrier price (``pt*atr/close``, ``-sl*atr/close``)
  or to ``close[t+horizon]`` at the vertical barrier; ``tb_return_atr``: the same move in ATR units.
- ``fwd_ret_{h} = close[t+h] / close[t] - 1`` for each ``h`` in ``fwd_horizons``.
- ``mfe_{E} = max(max(high[t+1..t+E]) - close[t], 0) / atr[t]`` and
  ``mae_{E} = max(close[t] - min(low[t+1..t+E]), 0) / atr[t]`` with ``E = excursion_bars`` (default 6,
  hence ``mfe_6``/``mae_6``); ``early_move = mfe_E - mae_E``.
- ``label_eligible``: all ``label_window_bars(config)`` future bars exist in the same symbol,
  ``atr[t]`` is finite and > 0, and the label window meets none of the bar quirks in
  ``config.protect_from`` (see below). Ineligible rows get NaN float targets, ``tb_label = 0``,
  ``tb_both_touched = False``, ``tb_touch_time = NaT`` and ``tb_bars_to_touch = -1``: never a made-up
  label.

**Bar quirks** (``sentinel_pipeline.data.bar_quality``; per bar a uint8 of ``QUIRK_BITS`` that the raw
stage writes to its flags table). With ``W = label_window_bars(config)``, the window of row ``t`` meets
a transition quirk (``jump``, ``hole``: the step into bar ``j``) when ``t < j <= t + W``, and a bar quirk
(``spike``, ``zero_volume_run``, ``flat_run``) when ``t <= j <= t + W``, always within the row's
symbol (the window is cut at the symbol's last bar). ``label_quirks`` (uint8) holds the bits of every
quirk the window meets, plus ``LABEL_CLIPPED`` when a target was clipped; a row whose window meets a
kind in ``protect_from`` (default: hole, jump, spike) is ineligible, counted per kind in the stats.
So no label spans a long hole, an unadjusted split or a bad tick.

**Winsorised ATR-unit targets**: with ``target_clip_atr = B`` (default 20), ``mfe_E`` and ``mae_E``
are capped at ``B``, ``early_move = mfe_E - mae_E`` of the capped values (so it lies in ``[-B, B]``)
and ``tb_return_atr`` is clipped to ``[-B, B]`` (it never exceeds ``max(pt, sl)`` anyway, and ``B``
must be at least that). Clipped rows keep their label and eligibility and get ``LABEL_CLIPPED``;
the stats count them per target with the largest value before clipping. ``tb_return`` and ``fwd_ret_h``
are simple returns and are not clipped. ``triple_barrier`` (the barrier outcome alone) knows neither
quirks nor clipping.

The kernel runs over flat arrays with per-row symbol codes and never reads across a symbol boundary. One
pass writes every output element once (outputs allocated with ``np.empty``) and counts the stats as it goes;
it runs over blocks of rows, on several threads for large inputs (``default_label_threads``); each row's outputs
depend only on its own window, so the result is the same for any block size and thread count.
``sentinel_pipeline_tests/reference_labeller.py`` is a slow per-event implementation of the same
semantics that the tests compare against.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numba
import numpy as np
import pandas as pd

from sentinel_pipeline.data.bar_quality import QUIRK_BITS, QUIRK_KINDS, TRANSITION_QUIRKS

REQUIRED_COLUMNS: tuple[str, ...] = ("symbol", "timestamp", "high", "low", "close", "atr")
LABEL_METHOD = "triple_barrier_high_low"
LABEL_CLIPPED = 128  # bit of ``label_quirks``: an ATR-unit target of the row was clipped
DEFAULT_PROTECT_FROM: tuple[str, ...] = ("jump", "spike", "hole")


@dataclass(frozen=True)
class LabelConfig:
    """Barrier widths in ATR units, horizons in bars; which bar quirks make a label window unusable
    (``protect_from``, kinds of ``bar_quality.QUIRK_KINDS``) and the bound of the ATR-unit targets
    (``target_clip_atr``, None: no clipping)."""

    pt: float = 1.5
    sl: float = 1.5
    horizon: int = 20
    fwd_horizons: tuple[int, ...] = (1, 5, 10, 20)
    excursion_bars: int = 6
    protect_from: tuple[str, ...] = DEFAULT_PROTECT_FROM
    target_clip_atr: float | None = 20.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "fwd_horizons", tuple(int(h) for h in self.fwd_horizons))
        kinds = (self.protect_from,) if isinstance(self.protect_from, str) else tuple(self.protect_from)
        unknown = [k for k in kinds if k not in QUIRK_KINDS]
        if unknown or len(set(kinds)) != len(kinds):
            raise ValueError(
                f"LabelConfig.protect_from must hold distinct kinds of {list(QUIRK_KINDS)}, got {self.protect_from!r}"
            )
        object.__setattr__(self, "protect_from", tuple(k for k in QUIRK_KINDS if k in kinds))  # canonical order
        clip = self.target_clip_atr
        if clip is not None:
            if isinstance(clip, bool) or not isinstance(clip, int | float) or not (math.isfinite(clip) and clip > 0):
                raise ValueError(f"LabelConfig.target_clip_atr must be None or a finite number > 0, got {clip!r}")
            object.__setattr__(self, "target_clip_atr", float(clip))
        for name in ("pt", "sl"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"LabelConfig.{name} must be a finite number > 0, got {value!r}")
        if int(self.horizon) != self.horizon or self.horizon < 1:
            raise ValueError(f"LabelConfig.horizon must be an integer >= 1, got {self.horizon!r}")
        if int(self.excursion_bars) != self.excursion_bars or self.excursion_bars < 1:
            raise ValueError(
                f"LabelConfig.excursion_bars must be an integer >= 1, got {self.excursion_bars!r}"
            )
        if not self.fwd_horizons or min(self.fwd_horizons) < 1:
            raise ValueError(
                f"LabelConfig.fwd_horizons must be non-empty integers >= 1, got {self.fwd_horizons!r}"
            )
        if len(set(self.fwd_horizons)) != len(self.fwd_horizons):
            raise ValueError(f"LabelConfig.fwd_horizons has duplicates: {self.fwd_horizons!r}")
        if self.target_clip_atr is not None and self.target_clip_atr < max(self.pt, self.sl):
            raise ValueError(
                f"LabelConfig.target_clip_atr ({self.target_clip_atr}) must be at least max(pt, sl) "
                f"({max(self.pt, self.sl)}): a barrier touch must keep its return"
            )


DAILY_LABEL_PRESET: dict[str, Any] = {"pt": 2.0, "sl": 2.0, "horizon": 10, "fwd_horizons": (1, 5, 10, 20),
                                      "excursion_bars": 6}


def daily_label_config(**overrides: Any) -> LabelConfig:
    """Labels of the daily panel preset, horizons in trading days: a triple barrier at 2 ATR over 10 days
    (a daily ATR is about one day's range, so 1.5 ATR over 20 days touched a barrier on most rows), and
    forward returns over 1, 5, 10 and 20 days (the ranking targets; ``split_arrays.TARGET_NAMES`` keeps
    these names). The label window is 20 days."""
    return LabelConfig(**{**DAILY_LABEL_PRESET, **overrides})


def label_window_bars(config: LabelConfig) -> int:
    """How many future bars a row needs for a complete label: max(horizon, fwd horizons, excursion bars)."""
    return int(max(config.horizon, max(config.fwd_horizons), config.excursion_bars))


def label_params(config: LabelConfig) -> dict[str, Any]:
    """The labelling parameters as a JSON-able dict (stored in HDF5 attrs and model bundles)."""
    params = asdict(config)
    params["fwd_horizons"] = list(config.fwd_horizons)
    params["protect_from"] = list(config.protect_from)
    params["label_window_bars"] = label_window_bars(config)
    params["method"] = LABEL_METHOD
    params["both_touched_label"] = -1
    params["entry_price"] = "close"
    return params


def target_columns(config: LabelConfig) -> list[str]:
    """The float target columns ``label_dataset`` adds, in the order of ``split_arrays.TARGET_NAMES``
    for the default config: forward returns, excursions, early move, barrier returns."""
    e = config.excursion_bars
    return [
        *(f"fwd_ret_{h}" for h in config.fwd_horizons),
        f"mfe_{e}",
        f"mae_{e}",
        "early_move",
        "tb_return",
        "tb_return_atr",
    ]


def label_columns(config: LabelConfig) -> list[str]:
    """Every column ``label_dataset`` appends, in the order it appends them."""
    e = config.excursion_bars
    return [
        "tb_label",
        "tb_both_touched",
        "tb_touch_time",
        "tb_bars_to_touch",
        "tb_return",
        "tb_return_atr",
        *(f"fwd_ret_{h}" for h in config.fwd_horizons),
        f"mfe_{e}",
        f"mae_{e}",
        "early_move",
        "label_eligible",
        "label_quirks",
    ]


# Rows per work item. The kernel runs over blocks of rows, each in one call that releases the GIL (nogil),
# spread over a few Python threads when there are several blocks. Written by hand instead of numba's
# ``prange`` because, measured on 2 shared cores: with numba's default threading layer (GNU OpenMP) each
# parallel call left its worker threads spin-waiting ~15 ms after the loop (3x the CPU time of a 200k-row
# call, and a core taken from whatever runs next), OpenMP's pool is not fork-safe (a forked worker that
# labels again is terminated), and the ``workqueue`` layer is not thread-safe and process-wide. Plain
# threads that end with the call have none of these costs. A block is large enough that its set-up (a look
# at the next ``window`` rows) and its dispatch are negligible; inputs of one block run in the caller's thread.
_BLOCK_ROWS = 1 << 18

# which outputs need the barrier scan / the excursions (``label_quirks`` carries the clipping bit, which
# depends on both)
_BARRIER_OUTPUTS = ("tb_label", "tb_both_touched", "tb_touch_row", "tb_bars_to_touch", "tb_return",
                    "tb_return_atr")
# per-block counters of the kernel (columns of ``counts``) and the ATR-unit targets of ``maxabs``
_C_ELIGIBLE, _C_DOWN, _C_VERTICAL, _C_UP, _C_BOTH, _C_BARS, _C_BLOCKED = range(7)
_C_BLOCKED_BY = 7  # + kind index (QUIRK_KINDS order)
_C_WINDOWS_WITH = _C_BLOCKED_BY + len(QUIRK_KINDS)
_C_CLIPPED = _C_WINDOWS_WITH + len(QUIRK_KINDS)  # + target index: mfe, mae, early move, tb_return_atr
_C_ROWS_CLIPPED = _C_CLIPPED + 4
_N_COUNTS = _C_ROWS_CLIPPED + 1
_NO_QUIRK = np.iinfo(np.int64).max


@numba.njit(cache=True, nogil=True)
def _label_kernel(start, stop, high_, low_, close_, atr_, codes_, quirks_, kind_bits, step_bits, protect, pt, sl,
                  horizon, window, fwd_horizons, excursion_bars, clip, do_barrier, do_exc,
                  label_, both_, touch_row_, bars_, ret_, ret_atr_, fwd_, mfe_, mae_, early_, eligible_,
                  label_quirks_, counts, maxabs):
    """Rows ``start .. stop-1``: every requested output written once per row (an output of length 0 is not
    requested), the block's counters added to ``counts`` and the largest ``|value|`` of each ATR-unit target
    (before clipping) kept in ``maxabs`` (-1: none). Rows are visited backwards, so that the end of the
    current symbol and the next quirk of each kind after the row are known when the row is reached."""
    # Work on views that begin at ``start``: indices counted from 0 are provably >= 0, which lets the
    # compiler drop numba's negative-index wraparound (a select per access for a signed index it cannot
    # prove non-negative).
    high, low, close, atr, codes = high_[start:], low_[start:], close_[start:], atr_[start:], codes_[start:]
    quirks = quirks_[start:]  # empty arrays (outputs not requested, no quirks) stay empty
    label, both, touch_row, bars = label_[start:], both_[start:], touch_row_[start:], bars_[start:]
    ret, ret_atr, mfe, mae, early = ret_[start:], ret_atr_[start:], mfe_[start:], mae_[start:], early_[start:]
    eligible, label_quirks, fwd = eligible_[start:], label_quirks_[start:], fwd_[:, start:]
    s = 0
    e = stop - start
    n = high.shape[0]
    n_fwd = fwd_horizons.shape[0]
    n_kinds = kind_bits.shape[0]
    has_quirks = quirks.shape[0] > 0
    # exclusive end of row e-1's symbol, as far as a window can see: rows e .. e+window-1 of the same code
    lim = min(n, e + window)
    end = e
    while end < lim and codes[end] == codes[e - 1]:
        end += 1
    # the counters live in locals during the loop (stores to the outputs could alias an array of counters)
    n_elig = n_down = n_vertical = n_up = n_both = sum_bars = n_blocked = n_rows_clipped = 0
    n_clip_mfe = n_clip_mae = n_clip_early = n_clip_ret = 0
    max_mfe = max_mae = max_early = max_ret = -1.0
    # nearest row >= the current one holding each quirk kind (for transition kinds: > the current row)
    nxt = np.full(n_kinds, _NO_QUIRK, np.int64)
    nearest = _NO_QUIRK
    if has_quirks:
        for j in range(end - 1, e - 1, -1):
            q = quirks[j]
            for k in range(n_kinds):
                if q & kind_bits[k]:
                    nxt[k] = j
                    nearest = j

    for i in range(e - 1, s - 1, -1):
        if i < e - 1 and codes[i] != codes[i + 1]:  # symbol boundary: nothing after it is in the window
            end = i + 1
            nxt[:] = _NO_QUIRK
            nearest = _NO_QUIRK
        met = 0
        if has_quirks:
            q = quirks[i]
            if q:  # bar quirks count on the entry bar itself
                for k in range(n_kinds):
                    if q & kind_bits[k] and not kind_bits[k] & step_bits:
                        nxt[k] = i
                        nearest = i
            last = min(i + window, end - 1)
            if nearest <= last:
                for k in range(n_kinds):
                    if nxt[k] <= last:
                        met |= kind_bits[k]
            if q:  # transition quirks of bar i count for the rows before it
                for k in range(n_kinds):
                    if q & kind_bits[k] and kind_bits[k] & step_bits:
                        nxt[k] = i
                        nearest = i
        a = atr[i]
        complete = i + window < end and np.isfinite(a) and a > 0.0
        usable = (met & protect) == 0
        if complete and met:
            for k in range(n_kinds):
                if met & kind_bits[k]:
                    counts[_C_WINDOWS_WITH + k] += 1
                    if not usable and protect & kind_bits[k]:
                        counts[_C_BLOCKED_BY + k] += 1
            if not usable:
                n_blocked += 1
        if eligible.shape[0]:
            eligible[i] = complete and usable
        if not (complete and usable):
            if label.shape[0]:
                label[i] = 0
            if both.shape[0]:
                both[i] = False
            if touch_row.shape[0]:
                touch_row[i] = -1
            if bars.shape[0]:
                bars[i] = -1
            if ret.shape[0]:
                ret[i] = np.nan
            if ret_atr.shape[0]:
                ret_atr[i] = np.nan
            for f in range(fwd.shape[0]):
                fwd[f, i] = np.nan
            if mfe.shape[0]:
                mfe[i] = np.nan
            if mae.shape[0]:
                mae[i] = np.nan
            if early.shape[0]:
                early[i] = np.nan
            if label_quirks.shape[0]:
                label_quirks[i] = met
            continue

        c = close[i]
        n_elig += 1
        clipped = False
        if do_barrier:
            upper = c + pt * a
            lower = c - sl * a
            hit = 0
            touched = False
            tj = i + horizon
            tk = horizon
            for k in range(1, horizon + 1):
                j = i + k
                up = high[j] >= upper
                down = low[j] <= lower
                if up or down:
                    tj = j
                    tk = k
                    if down:
                        hit = -1
                        touched = up
                    else:
                        hit = 1
                    break
            if hit == 1:
                r = pt * a / c
                ra = pt
            elif hit == -1:
                r = -sl * a / c
                ra = -sl
            else:
                r = close[tj] / c - 1.0
                ra = (close[tj] - c) / a
            if hit == 1:
                n_up += 1
            elif hit == -1:
                n_down += 1
            else:
                n_vertical += 1
            sum_bars += tk
            if touched:
                n_both += 1
            x = abs(ra)
            if x > max_ret:
                max_ret = x
            if x > clip:
                n_clip_ret += 1
                clipped = True
                ra = clip if ra > clip else -clip
            if label.shape[0]:
                label[i] = hit
            if both.shape[0]:
                both[i] = touched
            if touch_row.shape[0]:
                touch_row[i] = start + tj  # a row of the whole input
            if bars.shape[0]:
                bars[i] = tk
            if ret.shape[0]:
                ret[i] = r
            if ret_atr.shape[0]:
                ret_atr[i] = ra

        for f in range(n_fwd):
            fwd[f, i] = close[i + fwd_horizons[f]] / c - 1.0

        if do_exc:
            hi = high[i + 1]
            lo = low[i + 1]
            for k in range(2, excursion_bars + 1):
                hi = max(hi, high[i + k])
                lo = min(lo, low[i + k])
            up_move = max(hi - c, 0.0) / a
            down_move = max(c - lo, 0.0) / a
            move = up_move - down_move  # before clipping, for the stats
            x = abs(up_move)
            if x > max_mfe:
                max_mfe = x
            if x > clip:
                n_clip_mfe += 1
                clipped = True
                up_move = clip
            x = abs(down_move)
            if x > max_mae:
                max_mae = x
            if x > clip:
                n_clip_mae += 1
                clipped = True
                down_move = clip
            x = abs(move)
            if x > max_early:
                max_early = x
            if x > clip:
                n_clip_early += 1
            if mfe.shape[0]:
                mfe[i] = up_move
            if mae.shape[0]:
                mae[i] = down_move
            if early.shape[0]:
                early[i] = up_move - down_move
        if clipped:
            n_rows_clipped += 1
            met |= LABEL_CLIPPED
        if label_quirks.shape[0]:
            label_quirks[i] = met

    counts[_C_ELIGIBLE] += n_elig
    counts[_C_DOWN] += n_down
    counts[_C_VERTICAL] += n_vertical
    counts[_C_UP] += n_up
    counts[_C_BOTH] += n_both
    counts[_C_BARS] += sum_bars
    counts[_C_BLOCKED] += n_blocked
    counts[_C_CLIPPED] += n_clip_mfe
    counts[_C_CLIPPED + 1] += n_clip_mae
    counts[_C_CLIPPED + 2] += n_clip_early
    counts[_C_CLIPPED + 3] += n_clip_ret
    counts[_C_ROWS_CLIPPED] += n_rows_clipped
    maxabs[0] = max(maxabs[0], max_mfe)
    maxabs[1] = max(maxabs[1], max_mae)
    maxabs[2] = max(maxabs[2], max_early)
    maxabs[3] = max(maxabs[3], max_ret)


def _as_float_arrays(*arrays: Any) -> list[np.ndarray]:
    out = [np.ascontiguousarray(a, dtype=np.float64) for a in arrays]
    n = out[0].shape[0]
    if any(a.ndim != 1 or a.shape[0] != n for a in out):
        raise ValueError("high, low, close and atr must be 1-d arrays of the same length")
    return out


def _as_codes(symbol_codes: Any, n: int) -> np.ndarray:
    codes = np.ascontiguousarray(symbol_codes, dtype=np.int64)
    if codes.ndim != 1 or codes.shape[0] != n:
        raise ValueError(f"symbol_codes must hold one code per row ({n}), got shape {codes.shape}")
    return codes


def default_label_threads() -> int:
    """Threads the labeller uses when none are given: half of ``NUMBA_NUM_THREADS`` (numba's thread count:
    the environment variable, by default the CPUs of the process's affinity mask), at least 1. On 2 CPUs
    that is 1 thread:
    measured there (bench/bench_labels.py), a second thread cut the wall time of 10M bars from ~0.4 s to
    ~0.2 s at best but took 0.79-1.13x the CPU time per bar of one thread (more in 3 of 4 runs: memory
    bandwidth, page faults on the fresh output arrays), and a labels stage's time is mostly its file I/O."""
    return max(1, int(numba.config.NUMBA_NUM_THREADS) // 2)


_KIND_BITS = np.array([QUIRK_BITS[k] for k in QUIRK_KINDS], dtype=np.int64)
_STEP_BITS = int(sum(QUIRK_BITS[k] for k in TRANSITION_QUIRKS))


def _run_kernel(
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    atr: np.ndarray,
    codes: np.ndarray,
    quirks: np.ndarray,
    *,
    pt: float,
    sl: float,
    horizon: int,
    window: int,
    fwd_horizons: tuple[int, ...],
    excursion_bars: int,
    protect: int,
    clip: float | None,
    wanted: set[str],
    threads: int | None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Allocate the ``wanted`` outputs once (``np.empty``: the kernel writes every element), run the kernel
    over blocks of ``_BLOCK_ROWS`` rows on ``threads`` threads (None: ``default_label_threads()``; the
    result does not depend on it); returns the outputs (kernel names, ``fwd`` as one 2-d array), the summed
    counters and the largest ``|value|`` per ATR-unit target before clipping (NaN: none)."""
    n = high.shape[0]

    def alloc(name: str, dtype: Any) -> np.ndarray:
        return np.empty(n if name in wanted else 0, dtype=dtype)

    fwd_h = np.array([h for h in fwd_horizons if f"fwd_ret_{h}" in wanted], dtype=np.int64)
    out = {
        "tb_label": alloc("tb_label", np.int8),
        "tb_both_touched": alloc("tb_both_touched", np.bool_),
        "tb_touch_row": alloc("tb_touch_row", np.int64),
        "tb_bars_to_touch": alloc("tb_bars_to_touch", np.int32),
        "tb_return": alloc("tb_return", np.float64),
        "tb_return_atr": alloc("tb_return_atr", np.float64),
        "fwd": np.empty((fwd_h.shape[0], n), dtype=np.float64),
        "mfe": alloc("mfe", np.float64),
        "mae": alloc("mae", np.float64),
        "early_move": alloc("early_move", np.float64),
        "label_eligible": alloc("label_eligible", np.bool_),
        "label_quirks": alloc("label_quirks", np.uint8),
    }
    clip_bound = math.inf if clip is None else float(clip)  # |x| > inf never holds: nothing is clipped
    # the clipping bit of label_quirks needs the barrier return and the excursions when clipping is on
    clip_bit = "label_quirks" in wanted and clip is not None
    do_barrier = clip_bit or any(k in wanted for k in _BARRIER_OUTPUTS)
    do_exc = clip_bit or any(k in wanted for k in ("mfe", "mae", "early_move"))
    args = (high, low, close, atr, codes, quirks, _KIND_BITS, _STEP_BITS, int(protect), float(pt), float(sl),
            int(horizon), int(window), fwd_h, int(excursion_bars), clip_bound, do_barrier, do_exc, *out.values())
    block = max(1, int(_BLOCK_ROWS))
    starts = range(0, n, block)
    counts = np.zeros((len(starts), _N_COUNTS), np.int64)
    maxabs = np.full((len(starts), 4), -1.0)

    def run(b: int) -> None:  # rows of block b; blocks write disjoint rows and their own counter rows
        _label_kernel(starts[b], min(starts[b] + block, n), *args, counts[b], maxabs[b])

    n_threads = min(len(starts), default_label_threads() if threads is None else int(threads))
    if n_threads > 1:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            list(pool.map(run, range(len(starts))))  # list(): re-raises an error of any block
    else:
        for b in range(len(starts)):
            run(b)
    best = maxabs.max(axis=0) if len(starts) else np.full(4, -1.0)
    return out, counts.sum(axis=0), np.where(best < 0.0, np.nan, best)


def triple_barrier(
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    atr: np.ndarray,
    symbol_codes: np.ndarray,
    pt: float,
    sl: float,
    horizon: int,
) -> dict[str, np.ndarray]:
    """Triple-barrier outcome per row over flat arrays.

    ``symbol_codes`` is one integer per row; rows of a symbol must be contiguous and in time order (a
    change of code is a symbol boundary). A row is labelled when ``horizon`` future bars of its symbol
    exist and its ATR is finite and > 0 (``eligible``). Returns ``tb_label`` (int8),
    ``tb_both_touched`` (bool), ``tb_touch_row`` (int64 row index of the touching/vertical bar, -1 when
    unlabelled), ``tb_bars_to_touch`` (int32, -1 when unlabelled), ``tb_return``, ``tb_return_atr``
    (float64, NaN when unlabelled) and ``eligible`` (bool). Forward returns and excursions are not computed.
    """
    high, low, close, atr = _as_float_arrays(high, low, close, atr)
    codes = _as_codes(symbol_codes, high.shape[0])
    out, _, _ = _run_kernel(
        high, low, close, atr, codes, np.empty(0, np.uint8), pt=pt, sl=sl, horizon=horizon, window=horizon,
        fwd_horizons=(), excursion_bars=0, protect=0, clip=None, wanted={*_BARRIER_OUTPUTS, "label_eligible"},
        threads=None,
    )
    return {**{k: out[k] for k in _BARRIER_OUTPUTS}, "eligible": out["label_eligible"]}


def _as_quirks(quirks: Any, n: int) -> np.ndarray:
    if quirks is None:
        return np.zeros(n, dtype=np.uint8)
    q = np.ascontiguousarray(quirks)
    if q.ndim != 1 or q.shape[0] != n:
        raise ValueError(f"quirks must hold one bit mask per row ({n}), got shape {q.shape}")
    if q.dtype != np.uint8:
        if q.size and (q.min() < 0 or q.max() > 255):
            raise ValueError("quirks must be bit masks of bar_quality.QUIRK_BITS (0..255)")
        q = q.astype(np.uint8)
    return q


def array_names(config: LabelConfig) -> list[str]:
    """The arrays ``label_arrays`` returns, in order (``label_columns`` with ``tb_touch_row`` for the
    touch time)."""
    return ["tb_touch_row" if c == "tb_touch_time" else c for c in label_columns(config)]


def _label_arrays_and_info(
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    atr: np.ndarray,
    symbol_codes: np.ndarray,
    config: LabelConfig,
    quirks: np.ndarray | None,
    outputs: Iterable[str] | None = None,
    threads: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``label_arrays`` plus what the stats need: rows made ineligible per quirk kind, clip counts and the
    label counts of ``_label_stats`` (the stats describe the requested outputs only)."""
    high, low, close, atr = _as_float_arrays(high, low, close, atr)
    n = high.shape[0]
    codes = _as_codes(symbol_codes, n)
    bar_quirks = np.empty(0, np.uint8) if quirks is None else _as_quirks(quirks, n)
    names = array_names(config)
    wanted = list(names) if outputs is None else list(outputs)
    unknown = [k for k in wanted if k not in names]
    if unknown:
        raise ValueError(f"label_arrays: unknown outputs {unknown}; choose from {names}")
    e = config.excursion_bars
    kernel_names = {f"mfe_{e}": "mfe", f"mae_{e}": "mae"}
    protect = 0
    for kind in config.protect_from:
        protect |= QUIRK_BITS[kind]
    arrays, counts, maxabs = _run_kernel(
        high, low, close, atr, codes, bar_quirks, pt=config.pt, sl=config.sl, horizon=config.horizon,
        window=label_window_bars(config), fwd_horizons=config.fwd_horizons, excursion_bars=e, protect=protect,
        clip=config.target_clip_atr, wanted={kernel_names.get(k, k) for k in wanted}, threads=threads,
    )
    info: dict[str, Any] = {
        "n_ineligible_by_quirk": {k: int(counts[_C_BLOCKED_BY + QUIRK_KINDS.index(k)]) for k in config.protect_from},
        "n_ineligible_quirk_total": int(counts[_C_BLOCKED]),
        "n_windows_with_quirk": {k: int(counts[_C_WINDOWS_WITH + i]) for i, k in enumerate(QUIRK_KINDS)},
    }
    n_eligible = int(counts[_C_ELIGIBLE])
    targets = (f"mfe_{e}", f"mae_{e}", "early_move", "tb_return_atr")
    info["target_clip"] = {
        "target_clip_atr": config.target_clip_atr,
        "n_clipped": {k: int(counts[_C_CLIPPED + i]) for i, k in enumerate(targets)},
        "n_rows_clipped": int(counts[_C_ROWS_CLIPPED]),
        "max_abs_before_clip": {k: (float(maxabs[i]) if n_eligible else None) for i, k in enumerate(targets)},
    }
    info["labels"] = {
        "n_eligible": n_eligible,
        "class_counts": counts[[_C_DOWN, _C_VERTICAL, _C_UP]],  # labels -1, 0, 1
        "n_both_touched": int(counts[_C_BOTH]),
        "sum_bars_to_touch": int(counts[_C_BARS]),
    }

    fwd = arrays.pop("fwd")
    fwd_rows = {f"fwd_ret_{h}": row for h, row in zip((h for h in config.fwd_horizons if f"fwd_ret_{h}" in wanted),
                                                      fwd, strict=True)}
    by_name = {**arrays, **fwd_rows, f"mfe_{e}": arrays["mfe"], f"mae_{e}": arrays["mae"]}
    return {k: by_name[k] for k in names if k in wanted}, info


def label_arrays(
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    atr: np.ndarray,
    symbol_codes: np.ndarray,
    config: LabelConfig,
    quirks: np.ndarray | None = None,
    outputs: Iterable[str] | None = None,
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """Every label column over flat arrays, in ``label_columns`` order, except that the touch is given as
    ``tb_touch_row`` (row index, -1 when unlabelled) instead of a timestamp. Eligibility uses the full
    ``label_window_bars(config)`` and ``quirks`` (per bar a uint8 of ``bar_quality.QUIRK_BITS``; None:
    no bar is flagged).

    ``outputs``: names of ``array_names(config)`` to compute (None: all); the others are neither allocated
    nor computed (the barrier scan runs only for barrier outputs or the clipping bit of ``label_quirks``, the
    excursions only for ``mfe``/``mae``/``early_move`` or that bit). The values are those of the full call.
    ``threads``: how many threads label blocks of rows (None: ``default_label_threads()``); same result."""
    return _label_arrays_and_info(high, low, close, atr, symbol_codes, config, quirks, outputs, threads)[0]


def timestamps_ns(ts: pd.Series) -> np.ndarray:
    """A datetime column as int64 nanoseconds since the epoch, UTC (naive timestamps are taken as UTC)."""
    idx = pd.DatetimeIndex(ts)
    if idx.tz is not None:
        idx = idx.tz_convert("UTC").tz_localize(None)
    return idx.as_unit("ns").asi8


def symbol_codes_checked(df: pd.DataFrame, where: str) -> np.ndarray:
    """Per-row int64 symbol codes of a bars-ordered frame, after checking the bars convention.

    Raises ``ValueError`` (prefixed with ``where``) unless each symbol's rows are contiguous and its
    timestamps strictly increase, i.e. the frame is sorted by ``(symbol, timestamp)`` without duplicates.
    """
    codes, uniques = pd.factorize(df["symbol"], sort=False, use_na_sentinel=True)
    if (codes < 0).any():
        raise ValueError(f"{where}: column 'symbol' has missing values")
    codes = codes.astype(np.int64)
    if len(codes) > 1 and (np.diff(codes) < 0).any():
        first_bad = int(np.flatnonzero(np.diff(codes) < 0)[0]) + 1
        raise ValueError(
            f"{where}: rows must be sorted by (symbol, timestamp); symbol {uniques[codes[first_bad]]!r} "
            f"reappears at row {first_bad} after other symbols"
        )
    ts = df["timestamp"]
    if not pd.api.types.is_datetime64_any_dtype(ts.dtype):
        raise ValueError(f"{where}: column 'timestamp' must be a datetime column, got dtype {ts.dtype}")
    if ts.isna().any():
        raise ValueError(f"{where}: column 'timestamp' has missing values")
    t = timestamps_ns(ts)
    same_symbol = codes[1:] == codes[:-1]
    bad = np.flatnonzero(same_symbol & (t[1:] <= t[:-1]))
    if bad.size:
        row = int(bad[0]) + 1
        raise ValueError(
            f"{where}: rows must be sorted by (symbol, timestamp) without duplicates; symbol "
            f"{uniques[codes[row]]!r} has timestamp {ts.iloc[row]} at row {row} not after {ts.iloc[row - 1]}"
        )
    return codes


def label_dataset(
    features_df: pd.DataFrame,
    config: LabelConfig = LabelConfig(),
    quirks: np.ndarray | None = None,
    threads: int | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Append the label columns to a bars-ordered frame (``symbol, timestamp, high, low, close, atr`` and
    any other columns, passed through). ``quirks``: per row a uint8 of ``bar_quality.QUIRK_BITS`` (the
    ``quirks`` column of the raw stage's flags table, same row order; None: nothing flagged).
    ``threads``: as in ``label_arrays``. Returns the frame (same row order, ``RangeIndex``) and stats."""
    missing = [c for c in REQUIRED_COLUMNS if c not in features_df.columns]
    if missing:
        raise ValueError(f"label_dataset: input frame lacks required columns {missing}")
    clash = [c for c in label_columns(config) if c in features_df.columns]
    if clash:
        raise ValueError(f"label_dataset: input frame already has label columns {clash}")
    df = features_df.reset_index(drop=True)
    codes = symbol_codes_checked(df, "label_dataset")
    high, low, close, atr = (
        df[c].to_numpy(np.float64, na_value=np.nan) for c in ("high", "low", "close", "atr")
    )
    arrays, info = _label_arrays_and_info(high, low, close, atr, codes, config, quirks, threads=threads)
    touch_row = arrays.pop("tb_touch_row")
    touch_time = df["timestamp"].array.take(touch_row, allow_fill=True)
    columns: dict[str, Any] = {}
    for name in label_columns(config):
        columns[name] = touch_time if name == "tb_touch_time" else arrays[name]
    labels = pd.DataFrame(columns, index=df.index, copy=False)  # fresh arrays: no need to copy them again
    out = pd.concat([df, labels], axis=1)
    stats = _label_stats(arrays, config, info["labels"])
    stats["quirks_given"] = quirks is not None
    stats["quirk_protection"] = {"protect_from": list(config.protect_from), **{k: v for k, v in info.items()
                                                                              if k not in ("target_clip", "labels")}}
    stats["target_clip"] = info["target_clip"]
    return out, stats


def _label_stats(arrays: dict[str, np.ndarray], config: LabelConfig, counted: dict[str, Any]) -> dict[str, Any]:
    """The label stats, from the kernel's counters (``counted``: ``info["labels"]``)."""
    n = int(arrays["label_eligible"].shape[0])
    n_eligible = counted["n_eligible"]
    counts = counted["class_counts"]  # labels -1, 0, 1
    balance = {str(k): (float(counts[k + 1] / n_eligible) if n_eligible else 0.0) for k in (-1, 0, 1)}
    return {
        "n_rows": n,
        "n_eligible": n_eligible,
        "eligibility_rate": float(n_eligible / n) if n else 0.0,
        "class_balance": balance,
        "n_both_touched": counted["n_both_touched"],
        # the exact integer sum over the eligible rows, divided once: what numpy's mean of them gives
        "mean_bars_to_touch": float(counted["sum_bars_to_touch"] / n_eligible) if n_eligible else None,
        "label_window_bars": label_window_bars(config),
    }
