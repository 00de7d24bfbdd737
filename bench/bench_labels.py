"""Benchmark of the triple-barrier labeller (``labels.label_arrays``) against a plain compiled scan.

    python bench/bench_labels.py [--quick] [--rounds 5] [--symbols 100 --bars-per-symbol 100000]

The reference (``plain_scan`` below) is the plainest numba loop that produces the same outputs over the same
flat arrays: one serial backward pass, outputs allocated once with numpy's ``np.empty``, every element written once
(label, both-touched, touch row, bars to touch, barrier return and its ATR-unit form, forward returns, MFE/MAE,
early move, eligibility, quirk bits with the clipping bit). It knows nothing of the labeller's blocks,
threads or stats counters. All are compiled (and run once) before timing; then ours (its default thread
count, ``default_label_threads``), ours on 1 and on ``NUMBA_NUM_THREADS`` threads where those differ, the reference and the previous labeller (``sentinel_pipeline_tests/frozen_labeller.py``,
the kernel before its single-pass rewrite; ``--no-previous`` skips it) run in turn for ``--rounds`` rounds
(each round starting with the next one), and the median of each is printed: bars per CPU-second (user +
system time of every thread of the process, ``getrusage`` around each call; the system part, mostly page
faults on the fresh output arrays, is shown) and per wall-second. The outputs of each are asserted identical (bytes) to the reference's.

Two markets of synthetic random-walk OHLC with a 14-bar mean true range as ATR (default 100 symbols x 100k bars
= 10M bars; ``--quick``: 20 x 10k): without bar quirks, and with 2 % of bars flagged (each row's window OR-ed
by the reference bar by bar).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout: make the repo importable
    sys.path.insert(0, str(REPO_ROOT))

from sentinel_pipeline.data.bar_quality import QUIRK_BITS  # noqa: E402
from sentinel_pipeline.data.labels import (  # noqa: E402
    LABEL_CLIPPED,
    LabelConfig,
    default_label_threads,
    label_arrays,
    label_window_bars,
)
from sentinel_pipeline_tests import frozen_labeller  # noqa: E402

BAR_BITS = QUIRK_BITS["spike"] | QUIRK_BITS["zero_volume_run"] | QUIRK_BITS["flat_run"]  # the entry bar counts
ALL_BITS = BAR_BITS | QUIRK_BITS["jump"] | QUIRK_BITS["hole"]


@numba.njit(cache=True)
def plain_scan(high, low, close, atr, codes, quirks, pt, sl, horizon, window, fwd_h, exc, clip, protect,
               label, both, touch, bars, ret, ret_atr, fwd, mfe, mae, early, eligible, lq):
    n = high.shape[0]
    end = n
    for i in range(n - 1, -1, -1):
        if i < n - 1 and codes[i] != codes[i + 1]:
            end = i + 1
        met = 0
        if quirks.shape[0]:
            for j in range(i, min(i + window, end - 1) + 1):
                met |= quirks[j] & (BAR_BITS if j == i else ALL_BITS)
        a, c = atr[i], close[i]
        ok = i + window < end and np.isfinite(a) and a > 0.0 and (met & protect) == 0
        eligible[i] = ok
        if not ok:
            label[i], both[i], touch[i], bars[i], lq[i] = 0, False, -1, -1, met
            ret[i] = ret_atr[i] = mfe[i] = mae[i] = early[i] = np.nan
            fwd[:, i] = np.nan
            continue
        hit, hit_both, j = 0, False, i + horizon
        for k in range(1, horizon + 1):
            up, down = high[i + k] >= c + pt * a, low[i + k] <= c - sl * a
            if up or down:
                hit, hit_both, j = (-1 if down else 1), up and down, i + k
                break
        label[i], both[i], touch[i], bars[i] = hit, hit_both, j, j - i
        if hit == 1:
            ret[i], r = pt * a / c, pt
        elif hit == -1:
            ret[i], r = -sl * a / c, -sl
        else:
            ret[i], r = close[j] / c - 1.0, (close[j] - c) / a
        for f in range(fwd_h.shape[0]):
            fwd[f, i] = close[i + fwd_h[f]] / c - 1.0
        hi, lo = high[i + 1], low[i + 1]
        for k in range(2, exc + 1):
            hi, lo = max(hi, high[i + k]), min(lo, low[i + k])
        up_move, down_move = max(hi - c, 0.0) / a, max(c - lo, 0.0) / a
        if abs(r) > clip or up_move > clip or down_move > clip:
            met |= LABEL_CLIPPED
        ret_atr[i], mfe[i], mae[i] = min(max(r, -clip), clip), min(up_move, clip), min(down_move, clip)
        early[i] = mfe[i] - mae[i]
        lq[i] = met


def reference(inputs: tuple, quirks: np.ndarray | None, config: LabelConfig) -> dict[str, np.ndarray]:
    protect = 0
    for kind in config.protect_from:
        protect |= QUIRK_BITS[kind]
    q = np.empty(0, np.uint8) if quirks is None else quirks
    fwd_h = np.asarray(config.fwd_horizons, dtype=np.int64)
    # outputs allocated once by numpy, as the labeller's are (numpy asks the kernel for huge pages for large
    # arrays; numba's own allocator does not, which alone made the scan ~1.6x slower per CPU-second at 10M bars)
    n = inputs[0].shape[0]
    label, both, touch, bars = np.empty(n, np.int8), np.empty(n, np.bool_), np.empty(n, np.int64), np.empty(n, np.int32)
    ret, ret_atr, mfe, mae, early = (np.empty(n) for _ in range(5))
    fwd, eligible, lq = np.empty((fwd_h.shape[0], n)), np.empty(n, np.bool_), np.empty(n, np.uint8)
    plain_scan(*inputs, q, config.pt, config.sl, config.horizon, label_window_bars(config), fwd_h,
               config.excursion_bars, math.inf if config.target_clip_atr is None else config.target_clip_atr,
               protect, label, both, touch, bars, ret, ret_atr, fwd, mfe, mae, early, eligible, lq)
    e = config.excursion_bars
    return {"tb_label": label, "tb_both_touched": both, "tb_touch_row": touch, "tb_bars_to_touch": bars,
            "tb_return": ret, "tb_return_atr": ret_atr, **{f"fwd_ret_{h}": fwd[f] for f, h in
                                                           enumerate(config.fwd_horizons)},
            f"mfe_{e}": mfe, f"mae_{e}": mae, "early_move": early, "label_eligible": eligible, "label_quirks": lq}


def random_walk_arrays(n_symbols: int, bars_per_symbol: int, seed: int = 0, atr_period: int = 14):
    """Random-walk high/low/close with a simple-moving-average ATR per symbol, flat, plus int64 symbol codes."""
    rng = np.random.default_rng(seed)
    shape = (n_symbols, bars_per_symbol)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.002, shape), axis=1))
    open_ = np.concatenate([close[:, :1], close[:, :-1]], axis=1)
    high = np.maximum(open_, close) * (1.0 + np.abs(rng.normal(0.0, 0.0015, shape)))
    low = np.minimum(open_, close) * (1.0 - np.abs(rng.normal(0.0, 0.0015, shape)))
    csum = np.pad(np.cumsum(high - low, axis=1), ((0, 0), (1, 0)))
    atr = np.full(shape, np.nan)
    atr[:, atr_period - 1:] = (csum[:, atr_period:] - csum[:, :-atr_period]) / atr_period
    codes = np.repeat(np.arange(n_symbols, dtype=np.int64), bars_per_symbol)
    return high.ravel(), low.ravel(), close.ravel(), atr.ravel(), codes


def timed(fn):
    """(result, user CPU s, system CPU s, wall s): CPU of every thread of the process (``getrusage``)."""
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return out, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, time.perf_counter() - w0


def run_market(name: str, inputs: tuple, quirks, config: LabelConfig, rounds: int, threads: int,
               previous: bool) -> None:
    n = inputs[0].shape[0]
    candidates = {
        f"ours (default, {threads} thr)": lambda: label_arrays(*inputs, config, quirks),
        "reference (plain scan)": lambda: reference(inputs, quirks, config),
    }
    for extra in sorted({1, numba.config.NUMBA_NUM_THREADS} - {threads}):
        candidates[f"ours ({extra} thr)"] = lambda extra=extra: label_arrays(*inputs, config, quirks, threads=extra)
    if previous:  # the labeller before its single-pass rewrite (tests' frozen copy), for the before/after
        candidates["previous labeller"] = lambda: frozen_labeller.label_arrays(*inputs, config, quirks)
    cpu: dict[str, list[float]] = {k: [] for k in candidates}
    sys_cpu: dict[str, list[float]] = {k: [] for k in candidates}
    wall: dict[str, list[float]] = {k: [] for k in candidates}
    keys = list(candidates)
    for r in range(rounds):
        outs = {}
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:  # each round starts with the next candidate
            outs[key], user, system, w = timed(candidates[key])
            cpu[key].append(user + system)
            sys_cpu[key].append(system)
            wall[key].append(w)
        want = outs["reference (plain scan)"]
        for key, got in outs.items():
            assert list(got) == list(want), key
            for col in want:
                assert got[col].dtype == want[col].dtype and got[col].tobytes() == want[col].tobytes(), (key, col)
        del outs, want, got
    ref_cpu = statistics.median(cpu["reference (plain scan)"])
    ref_wall = statistics.median(wall["reference (plain scan)"])
    print(f"{name}: {n:,} bars; median of {rounds} interleaved rounds; outputs identical to the reference: True")
    for key in candidates:
        c, w, sy = statistics.median(cpu[key]), statistics.median(wall[key]), statistics.median(sys_cpu[key])
        print(f"  {key:<24} {n / c / 1e6:7.2f} M bars/CPU-s ({c:6.3f} CPU-s of which sys {sy:5.3f}, "
              f"{ref_cpu / c:4.2f}x ref)   {n / w / 1e6:7.2f} M bars/wall-s ({w:6.3f} s, {ref_wall / w:4.2f}x ref)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 symbols x 10k bars")
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--bars-per-symbol", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-previous", action="store_true", help="skip the previous labeller (before/after)")
    args = parser.parse_args()
    n_symbols, per_symbol = (20, 10_000) if args.quick else (args.symbols, args.bars_per_symbol)
    config = LabelConfig()  # horizon 20, pt = sl = 1.5, forward returns 1/5/10/20, MFE/MAE over 6 bars
    threads = default_label_threads()  # what label_arrays uses by default
    print(f"bench_labels: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs, "
          f"numba {numba.__version__}, NUMBA_NUM_THREADS {numba.config.NUMBA_NUM_THREADS}, labeller default "
          f"{threads} thread(s)")

    inputs = random_walk_arrays(n_symbols, per_symbol, seed=1)
    quirks = np.zeros(inputs[0].shape[0], dtype=np.uint8)
    rng = np.random.default_rng(2)
    for bit in QUIRK_BITS.values():
        quirks[rng.random(quirks.shape[0]) < 0.02 / len(QUIRK_BITS)] |= bit
    t0 = time.perf_counter()
    small = tuple(a[:5000] for a in inputs)
    label_arrays(*small, config, quirks[:5000])  # compile (or load the cache) before timing
    reference(small, quirks[:5000], config)
    frozen_labeller.label_arrays(*small, config, quirks[:5000])
    print(f"  compile / cache load: {time.perf_counter() - t0:.1f} s")
    for name, q in (("no quirks", None), ("2 % of bars flagged", quirks)):
        run_market(name, inputs, q, config, args.rounds, threads, not args.no_previous)


if __name__ == "__main__":
    main()
