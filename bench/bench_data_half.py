"""Benchmark: the whole data half (raw parquet -> Arrow cache) end to end, against a pandas slice.

Writes a synthetic market (``SyntheticMarketConfig``: ``--symbols`` x about ``--bars`` hourly bars,
7 bars a day; default 100 x 100,000 = 10M bars) into a temporary raw dir, then runs
``data_half.run_data_half`` (every stage: raw bars, contract, features, labels, splits, scalers,
HDF5 splits, Arrow cache) in a **child process**: wall time from spawn to exit and CPU time are
measured from outside (``os.wait4``), peak RSS is the child's own high-water mark (``VmHWM``, read
by the child as it ends; the ``ru_maxrss`` of a vfork-spawned child starts at the parent's peak).
Per stage, a sampling thread in the child records the RSS at the stage's start and its peak. The
generator runs in its own child first and is reported separately, not in the pipeline figure.

Printed: per-stage seconds (the ``seconds`` of each stage summary), wall, bars/s end to end, peak
RSS, the final Arrow cache size (sum of ``*.arrow`` files) and peak RSS / cache size, next to the
issue targets (>= 400k bars/s on 2 cores; peak RSS < 2x the cache), the load average at the start
and the numba kernels the child had to compile (0 with the warm cache ``scripts/setup.sh`` makes).
Then what bounds the wall time on this machine: the cores the run used on average (CPU / wall) and
the wall time its CPU time would take with every core busy, and, measured by a third child after the
run, what the machine charges per GiB for the first touch of fresh memory, for refilling touched
memory, for a buffered file write and its fsync, with the bytes the run wrote; and the same write into
pages freed just before and, after an idle wait, by two threads at once, which tell a machine whose
host charges for fresh memory (a virtual machine that backs guest memory on first use) from one that
does not.

Reference, measured in the same run on the same raw file, also in a child process: a plain pandas
version of a representative slice: read the raw parquet, sort, five features with
``groupby(...).shift/rolling`` (ret_1, ret_5, ret_20, rv_20, vol_z_20) and the forward-return
labels ``fwd_ret_{1,5,10,20}`` with ``groupby(...).shift(-h)`` (no per-row loop, nothing written).
It is compared with the pipeline's raw_bars + features + labels stages, which do much more (ingest
validation and quarantine, 34 features plus ATR, triple-barrier labels, MFE/MAE, table writes).

Numba/BLAS thread counts are left at their defaults (the machine's cores). Timings on a shared
machine are noisy.

    python bench/bench_data_half.py                 # 100 symbols x 100k bars = 10M bars
    python bench/bench_data_half.py --quick         # 20 symbols x 10k bars = 200k bars
    python bench/bench_data_half.py --profile       # also cProfile + tracemalloc each stage (slow)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout: make the repo importable
    sys.path.insert(0, str(REPO_ROOT))

BARS_PER_DAY = 7
TARGET_BARS_PER_S = 400_000
TARGET_MEMORY_RATIO = 2.0
MIB = 2**20


def own_peak_rss() -> int:
    """Peak RSS of this process since its exec (``VmHWM`` of /proc/self/status, Linux), in bytes.

    Taken in the child itself because the ``ru_maxrss`` that ``wait4`` reports for a child started
    with vfork + exec (what ``subprocess`` does) starts from the parent's high-water mark.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak RSS needs Linux)")


# -- child roles ----------------------------------------------------------------------------------
def market_config(n_symbols: int, bars_per_symbol: int) -> Any:
    from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig

    return SyntheticMarketConfig(n_symbols=n_symbols, n_days=math.ceil(bars_per_symbol / BARS_PER_DAY),
                                 bars_per_day=BARS_PER_DAY)


def artifact_paths(workdir: Path) -> Any:
    from sentinel_pipeline.paths import ArtifactPaths

    return ArtifactPaths(data_dir=workdir / "data", models_dir=workdir / "models", raw_dir_override=workdir / "raw")


def child_generate(workdir: Path, n_symbols: int, bars_per_symbol: int) -> dict[str, Any]:
    from sentinel_pipeline.data.synthetic_market import ensure_default_raw_data

    t0 = time.perf_counter()
    files = ensure_default_raw_data(workdir / "raw", market_config(n_symbols, bars_per_symbol))
    return {"seconds": time.perf_counter() - t0, "files": [str(f) for f in files]}


def child_pipeline(workdir: Path, n_symbols: int, bars_per_symbol: int, profile: bool) -> dict[str, Any]:
    from sentinel_pipeline import data_half

    paths = artifact_paths(workdir)
    cfg = data_half.DataHalfConfig(synthetic=market_config(n_symbols, bars_per_symbol))
    if profile:
        return profile_stages(paths, cfg, workdir)
    sampler = RssSampler()
    baseline = sampler.current()

    def log(msg: str) -> None:  # called after each stage: take that stage's sampled peak RSS
        peaks.append((starts[-1], sampler.take_peak()))
        starts.append(sampler.current())
        print(msg, flush=True)

    peaks: list[tuple[int, int]] = []
    starts = [baseline]
    sampler.start()
    try:
        results = data_half.run_data_half(paths, cfg, log=log)
    finally:
        sampler.stop()
    results["_numba_compiled"] = numba_compiled()
    for (name, _), (start, peak) in zip(data_half.STAGES, peaks, strict=True):
        results[name]["start_rss_bytes"] = start
        results[name]["peak_rss_bytes"] = peak
    results["_baseline_rss_bytes"] = baseline
    return results


def numba_compiled() -> list[str]:
    """The numba kernels of the package this process compiled instead of loading from numba's cache."""
    import numba.core.registry

    out = []
    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith("sentinel_pipeline"):
            continue
        for name, obj in vars(module).items():
            if isinstance(obj, numba.core.registry.CPUDispatcher) and obj.stats.cache_misses:
                out.append(f"{module.__name__}.{name}")
    return sorted(set(out))


class RssSampler:
    """Samples this process's RSS (``/proc/self/statm``, Linux) every ``interval`` s in a daemon thread.

    Used for the per-stage peaks only (a spike shorter than ``interval`` can be missed); the overall
    peak is the kernel's high-water mark (:func:`own_peak_rss`), which misses nothing.
    """

    def __init__(self, interval: float = 0.01) -> None:
        import threading

        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * self.page
        except OSError:
            return 0

    def _run(self) -> None:
        while not self.done.wait(self.interval):
            rss = self.current()
            with self.lock:
                self.peak = max(self.peak, rss)

    def start(self) -> None:
        self.peak = self.current()
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def take_peak(self) -> int:
        """The peak since the last call (or start), then restart from the current RSS."""
        now = self.current()
        with self.lock:
            peak, self.peak = max(self.peak, now), now
        return peak


def profile_stages(paths: Any, cfg: Any, workdir: Path) -> dict[str, Any]:
    """Each stage under cProfile (top functions by own time) and tracemalloc (peak traced bytes;
    NumPy allocations are traced, Arrow's own buffers are not)."""
    import cProfile
    import io
    import pstats
    import tracemalloc

    from sentinel_pipeline import data_half

    results: dict[str, Any] = {}
    for name, fn in data_half.STAGES:
        prof = cProfile.Profile()
        tracemalloc.start()
        prof.enable()
        out = fn(paths, cfg)
        prof.disable()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
        (workdir / f"profile_{name}.txt").write_text(text.getvalue(), encoding="utf-8")
        out["tracemalloc_peak_bytes"] = peak
        results[name] = out
        print(f"[profile] {name}: {out.get('seconds', 0.0):.2f}s (profiled), tracemalloc peak "
              f"{peak / MIB:,.0f} MiB -> {workdir / f'profile_{name}.txt'}", flush=True)
    return results


def child_reference(raw_file: Path) -> dict[str, Any]:
    """Plain pandas: read + sort, 5 groupby-rolling features, 4 forward-return labels."""
    import numpy as np
    import pandas as pd

    t0 = time.perf_counter()
    bars = pd.read_parquet(raw_file).sort_values(["symbol", "timestamp"], ignore_index=True)
    t1 = time.perf_counter()
    key = bars["symbol"]
    out = pd.DataFrame(index=bars.index)
    logc = np.log(bars["close"])
    g_logc = logc.groupby(key, sort=False)
    for k in (1, 5, 20):
        out[f"ret_{k}"] = logc - g_logc.shift(k)
    sq = (out["ret_1"] ** 2).groupby(key, sort=False).rolling(20).mean()
    out["rv_20"] = np.sqrt(sq.reset_index(level=0, drop=True))
    lv = np.log1p(bars["volume"])
    roll = lv.groupby(key, sort=False).rolling(20)
    mean = roll.mean().reset_index(level=0, drop=True)
    std = roll.std(ddof=0).reset_index(level=0, drop=True)
    out["vol_z_20"] = (lv - mean) / std
    t2 = time.perf_counter()
    g_close = bars["close"].groupby(key, sort=False)
    for h in (1, 5, 10, 20):
        out[f"fwd_ret_{h}"] = g_close.shift(-h) / bars["close"] - 1.0
    out["label_eligible"] = out["fwd_ret_20"].notna()
    t3 = time.perf_counter()
    return {"rows": len(bars), "read_seconds": t1 - t0, "features_seconds": t2 - t1,
            "labels_seconds": t3 - t2, "seconds": t3 - t0, "columns": list(out.columns)}


RECLAIM_WAIT_S = 15.0  # idle time after which the probe writes again (a VM host takes back freed memory)


def _write_chunks(fh: Any, data: memoryview, chunk: int = 16 * MIB) -> None:
    for at in range(0, len(data), chunk):
        fh.write(data[at : at + chunk])


def _write_file(path: Path, data: memoryview) -> None:
    with open(path, "wb") as fh:
        _write_chunks(fh, data)


def child_machine(workdir: Path, gib: int = 1) -> dict[str, Any]:
    """What this machine charges for memory the data half cannot avoid touching, per GiB: the first
    touch of freshly allocated memory (page faults; the kernel hands over zeroed pages), the refill of
    memory already touched, a buffered write of a file into the page cache, and its fsync. Then why
    fresh memory costs what it does: the same write again right after the file was deleted (into pages
    the system has just freed), and, after ``RECLAIM_WAIT_S`` idle seconds, written by two threads at
    once (two files of half the size). On a virtual machine whose host backs guest memory on first use
    and takes freed memory back after a few seconds, the first is cheap, the second dear again, and
    two threads halve it when the host's cost is paid per core."""
    import threading

    import numpy as np

    n = gib * 2**30
    t0 = time.perf_counter()
    buf = np.empty(n, dtype=np.uint8)
    buf.fill(1)
    t1 = time.perf_counter()
    buf.fill(2)
    t2 = time.perf_counter()
    probe = workdir / "machine_probe.bin"
    data = memoryview(buf)
    with open(probe, "wb") as fh:
        t3 = time.perf_counter()
        _write_chunks(fh, data)
        fh.flush()
        t4 = time.perf_counter()
        os.fsync(fh.fileno())
        t5 = time.perf_counter()
    probe.unlink()
    t6 = time.perf_counter()
    _write_file(probe, data)  # into the page-cache pages the unlink has just freed
    t7 = time.perf_counter()
    probe.unlink()
    time.sleep(RECLAIM_WAIT_S)
    halves = [workdir / "machine_probe_a.bin", workdir / "machine_probe_b.bin"]
    threads = [threading.Thread(target=_write_file, args=(h, data[i * n // 2 : (i + 1) * n // 2]))
               for i, h in enumerate(halves)]
    t8 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t9 = time.perf_counter()
    for h in halves:
        h.unlink()
    return {"first_touch_s_per_gib": (t1 - t0) / gib, "refill_s_per_gib": (t2 - t1) / gib,
            "write_s_per_gib": (t4 - t3) / gib, "fsync_s_per_gib": (t5 - t4) / gib,
            "write_freed_s_per_gib": (t7 - t6) / gib, "write_2_threads_s_per_gib": (t9 - t8) / gib}


def child_main(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    if args.child == "generate":
        result = child_generate(workdir, args.symbols, args.bars)
    elif args.child == "pipeline":
        result = child_pipeline(workdir, args.symbols, args.bars, args.profile)
    elif args.child == "machine":
        result = child_machine(workdir)
    else:
        result = child_reference(next((workdir / "raw").glob("*.parquet")))
    out = {"result": result, "peak_rss_bytes": own_peak_rss()}
    (workdir / f"{args.child}.json").write_text(json.dumps(out, default=str), encoding="utf-8")


# -- parent ---------------------------------------------------------------------------------------
def run_child(role: str, args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], float, int, Any]:
    """Run this script as ``--child role``; returns (its result, wall s, its peak RSS bytes, its rusage)."""
    cmd = [sys.executable, __file__, "--child", role, "--workdir", str(workdir),
           "--symbols", str(args.symbols), "--bars", str(args.bars)]
    if args.profile:
        cmd.append("--profile")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child {role!r} failed with exit code {proc.returncode}")
    out = json.loads((workdir / f"{role}.json").read_text(encoding="utf-8"))
    return out["result"], wall, int(out["peak_rss_bytes"]), usage


def cpu_text(usage: Any) -> str:
    return f"CPU user {usage.ru_utime:.1f} s + sys {usage.ru_stime:.1f} s"


def dir_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def report(args: argparse.Namespace, workdir: Path) -> None:
    from sentinel_pipeline.data.tables import schema_of

    gen, gen_wall, gen_rss, _ = run_child("generate", args, workdir)
    raw_bytes = dir_bytes(workdir / "raw", "*.parquet")
    print(f"generator: {gen['seconds']:.1f} s in-process ({gen_wall:.1f} s wall with start-up), "
          f"peak RSS {gen_rss / MIB:,.0f} MiB, raw parquet {raw_bytes / MIB:,.0f} MiB  (not in the pipeline figure)")

    load = os.getloadavg()
    stages, wall, rss, usage = run_child("pipeline", args, workdir)
    cpu = cpu_text(usage)
    paths = artifact_paths(workdir)
    n_bars = int(stages["raw_bars"]["report"]["n_rows_in"])
    cache = dir_bytes(paths.arrow_dir, "*.arrow")
    h5 = dir_bytes(paths.hdf5_dir, "*.h5")
    print(f"\ndata half on {n_bars:,} bars ({args.symbols} symbols), child process, default threads "
          f"(cpu_count={os.cpu_count()}){' [profiled: times inflated]' if args.profile else ''}")
    print(f"  load average at the start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min), "
          f"at the end: {os.getloadavg()[0]:.2f}")
    compiled = stages.pop("_numba_compiled", None)
    if compiled is not None:
        print(f"  numba kernels compiled in the run (cold cache): {len(compiled)}{': ' + ', '.join(compiled) if compiled else ''}")
    baseline = stages.pop("_baseline_rss_bytes", 0)
    if baseline:
        print(f"  (RSS after imports, before the first stage: {baseline / MIB:,.0f} MiB)")
    staged = 0.0
    for name, summary in stages.items():
        sec = summary.get("seconds")
        if sec is None:
            print(f"  {name:17s}      -")
            continue
        staged += sec
        extra = ""
        if summary.get("peak_rss_bytes"):
            extra = (f"   RSS at start {summary['start_rss_bytes'] / MIB:6,.0f} MiB, peak in stage "
                     f"{summary['peak_rss_bytes'] / MIB:6,.0f} MiB (sampled)")
        if "tracemalloc_peak_bytes" in summary:
            extra = f"   tracemalloc peak {summary['tracemalloc_peak_bytes'] / MIB:8,.0f} MiB"
        print(f"  {name:17s} {sec:8.2f} s  {n_bars / sec:12,.0f} bars/s{extra}")
    rate = n_bars / wall
    ratio = rss / cache
    print(f"  {'sum of stages':17s} {staged:8.2f} s")
    print(f"  {'wall (child)':17s} {wall:8.2f} s  {rate:12,.0f} bars/s end to end ({cpu})   "
          f"target >= {TARGET_BARS_PER_S:,}: {'met' if rate >= TARGET_BARS_PER_S else 'MISSED'}")
    print(f"  peak RSS {rss / MIB:,.0f} MiB; Arrow cache {cache / MIB:,.0f} MiB (HDF5 {h5 / MIB:,.0f} MiB); "
          f"peak/cache {ratio:.2f}x   target < {TARGET_MEMORY_RATIO:.0f}x: "
          f"{'met' if ratio < TARGET_MEMORY_RATIO else 'MISSED'}")
    for s, info in stages["arrow_cache"]["splits"].items():
        if not info.get("matches_hdf5"):
            print(f"  WARNING: the {s} Arrow cache does not match its HDF5 source")
    written = dir_bytes(paths.data_dir / "artifacts", "*")
    cpu_s = usage.ru_utime + usage.ru_stime
    m, _, _, _ = run_child("machine", args, workdir)
    print(f"  cores used on average: {cpu_s / wall:.2f} of {os.cpu_count()} (CPU {cpu_s:.1f} s / wall {wall:.1f} s); "
          f"with every core busy the whole run, wall >= {cpu_s / (os.cpu_count() or 1):.1f} s for this CPU time")
    print(f"  machine, measured after the run: first touch of fresh memory {m['first_touch_s_per_gib']:.2f} s/GiB "
          f"(refilling touched memory {m['refill_s_per_gib']:.2f} s/GiB); writing a file into the page cache "
          f"{m['write_s_per_gib']:.2f} s/GiB + fsync {m['fsync_s_per_gib']:.2f} s/GiB")
    print(f"  the run's files: {written / 2**30:.2f} GiB, i.e. about {written / 2**30 * m['write_s_per_gib']:.1f} s of "
          f"writes at that rate")
    print(f"  the same write into pages freed just before: {m['write_freed_s_per_gib']:.2f} s/GiB; after "
          f"{RECLAIM_WAIT_S:.0f} s idle, by 2 threads at once: {m['write_2_threads_s_per_gib']:.2f} s/GiB "
          f"(fresh memory dearer than reused memory: its cost is the machine's, not the code's)")

    if args.skip_reference:
        return
    ref, ref_wall, ref_rss, ref_usage = run_child("reference", args, workdir)
    ref_cpu = cpu_text(ref_usage)
    ours = sum(stages[s]["seconds"] for s in ("raw_bars", "features", "labels"))
    n_feat = stages["feature_contract"]["n_features"]
    print(f"\nslice comparison on the same {ref['rows']:,} bars (stage seconds, in-process):")
    print(f"  pipeline raw_bars + features + labels : {ours:8.2f} s  {n_bars / ours:12,.0f} bars/s  "
          f"(validate + quarantine, {n_feat} features + ATR, triple barrier + targets, table writes)")
    print(f"  pandas read + 5 features + 4 fwd rets : {ref['seconds']:8.2f} s  {ref['rows'] / ref['seconds']:12,.0f} "
          f"bars/s  (read {ref['read_seconds']:.2f} s, features {ref['features_seconds']:.2f} s, labels "
          f"{ref['labels_seconds']:.2f} s; nothing written)")
    print(f"  pandas reference child: wall {ref_wall:.2f} s ({ref_cpu}), peak RSS {ref_rss / MIB:,.0f} MiB")
    n_cols = len(schema_of(paths.features).names) - 7 + len(schema_of(paths.labels).names) - 2  # minus raw, keys
    print(f"  output columns per bar: pipeline {n_cols} ({n_bars * n_cols / ours:,.0f} values/s), pandas "
          f"{len(ref['columns'])} ({ref['rows'] * len(ref['columns']) / ref['seconds']:,.0f} values/s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 symbols x 10k bars instead of 100 x 100k")
    ap.add_argument("--symbols", type=int, default=None)
    ap.add_argument("--bars", type=int, default=None, help="bars per symbol (rounded up to whole days of 7)")
    ap.add_argument("--workdir", default=None, help="keep the artefacts here (default: a temp dir, removed)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile + tracemalloc per stage (times inflated)")
    ap.add_argument("--child", choices=("generate", "pipeline", "reference", "machine"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.symbols = args.symbols or (20 if args.quick else 100)
    args.bars = args.bars or (10_000 if args.quick else 100_000)
    if args.child:
        child_main(args)
        return
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_data_half_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
