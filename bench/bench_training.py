"""Benchmark: training throughput per variant, and peak memory of a training run at two dataset sizes.

Data: the real data half (``data_half.run_data_half``) on two synthetic markets (20 symbols, hourly
bars) sized so that the train split holds about ``--sizes`` rows (default 200k and 800k;
``--quick``: 20k and 80k). Built once per run in a temp dir (not timed here; see
``bench_data_half.py``).

1. Throughput: for each variant (``mlp_two_head``, ``seq_ctx_fusion``, ``transformer_tbm``)
   ``training.engine.train()`` runs ``--epochs`` epochs (default 2) with batch size ``--batch-size``
   (256), shuffled, on the first ``--train-samples`` samples of the smaller dataset (the engine's
   ``limit_samples``, which caps the val split too), on ``--device``
   (``auto``: CUDA when available, else CPU). Printed per epoch, from ``metrics.json["history"]``:
   ``throughput_samples_per_s`` and ``loader_share`` (time waiting for the next batch / epoch training
   time). Reference measured in the same run: the bare step, i.e. forward + loss + backward + clip +
   AdamW step of the same model repeated on one pre-built batch (no loader, no bookkeeping), and the
   time ``WindowBatcher.batch`` takes to build one batch; from those two the loader share one would
   expect (build / (build + step)).
2. Memory: ``seq_ctx_fusion`` (``--memory-variant``), 1 epoch over every sample of each dataset, in a
   child process (wall time from outside; peak RSS = the child's own ``VmHWM`` as it ends, since the
   ``ru_maxrss`` of a vfork-spawned child starts at the parent's peak), next to a child that only
   imports the engine (the fixed cost). Printed: train rows N, the flat arrays the run loads (all
   split arrays of train + val; ``N x F_seq x 4`` for the seq matrix alone) and what materialised
   ``samples x L x F_seq`` float32 windows would take. The growth of peak RSS between the two sizes
   is compared with the growth of the flat arrays and of the windows: the loader gathers windows per
   batch, so peak RSS should grow by about the flat arrays' growth, not L (= 30) times it.

Torch threads: the engine default (``runtime.default_thread_count``) unless ``--threads``. A list
(``--threads 1,2``) compares thread counts: every variant is trained once per count in this process
and a table prints the last epoch's samples/s for each count side by side. On a machine shared with
other torch jobs more threads than free cores oversubscribe them and OpenMP spin-waiting can slow a
step many times over. Timings on a shared machine are noisy.

    python bench/bench_training.py                  # 200k / 800k train rows, 50k samples per epoch
    python bench/bench_training.py --quick          # 20k / 80k train rows, 5k samples per epoch
    python bench/bench_training.py --quick --threads 1,2 --skip-memory   # 1 vs 2 threads per variant
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

VARIANTS = ("mlp_two_head", "seq_ctx_fusion", "transformer_tbm")
N_SYMBOLS = 20
BARS_PER_DAY = 7
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


# -- data -----------------------------------------------------------------------------------------
def build_dataset(root: Path, train_rows: int) -> tuple[Any, float]:
    """Run the data half on a synthetic market whose train split has about ``train_rows`` rows."""
    from sentinel_pipeline import data_half
    from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig
    from sentinel_pipeline.paths import ArtifactPaths

    cfg = data_half.DataHalfConfig()
    per_symbol = train_rows / cfg.splits.train_frac / N_SYMBOLS
    cfg.synthetic = SyntheticMarketConfig(n_symbols=N_SYMBOLS, n_days=math.ceil(per_symbol / BARS_PER_DAY),
                                          bars_per_day=BARS_PER_DAY)
    paths = ArtifactPaths(data_dir=root, models_dir=root / "models")
    t0 = time.perf_counter()
    data_half.run_data_half(paths, cfg, log=lambda _msg: None)
    return paths, time.perf_counter() - t0


def split_sizes(paths: Any) -> dict[str, Any]:
    """Rows, samples and array bytes of the train and val splits (memory-mapped, nothing read)."""
    from sentinel_pipeline.data import arrow_cache

    out: dict[str, Any] = {"rows": 0, "samples": 0, "flat_bytes": 0, "seq_flat_bytes": 0, "window_bytes": 0}
    for name in ("train", "val"):
        s = arrow_cache.open_split(paths.arrow(name))
        flat = sum(a.nbytes for a in s.arrays().values())
        if name == "train":
            out.update(train_rows=s.n_rows, train_samples=s.n_samples, seq_features=s.seq.shape[1],
                       seq_len=s.seq_len)
        out["rows"] += s.n_rows
        out["samples"] += s.n_samples
        out["flat_bytes"] += flat
        out["seq_flat_bytes"] += s.seq.nbytes
        out["window_bytes"] += s.n_samples * s.seq_len * s.seq.shape[1] * 4
    return out


def train_config(paths: Any, out_dir: Path, variant: str, args: argparse.Namespace, epochs: int,
                 limit: int | None) -> Any:
    from sentinel_pipeline.training.config import TrainConfig

    return TrainConfig(
        train_h5=paths.h5("train"), val_h5=paths.h5("val"), feature_schema=paths.feature_schema, out_dir=out_dir,
        model=variant, batch_size=args.batch_size, epochs=epochs, device=args.device, shuffle=True,
        num_workers=args.num_workers, threads=args.threads, limit_samples=limit, patience=epochs + 1, fresh=True,
        log_every=10**9, profile=args.profile,
    )


# -- reference: the bare step ---------------------------------------------------------------------
def bare_step_reference(paths: Any, variant: str, args: argparse.Namespace, n_steps: int) -> dict[str, float]:
    """Samples/s of forward + loss + backward + clip + AdamW on one pre-built batch, and batch build time."""
    import torch

    from sentinel_pipeline.data import arrow_cache
    from sentinel_pipeline.data.feature_contract import FEATURE_GROUPS, read_contract
    from sentinel_pipeline.training import runtime
    from sentinel_pipeline.training.data_loader import WindowBatcher, to_device
    from sentinel_pipeline.training.losses import compute_losses
    from sentinel_pipeline.training.models import build_model, get_variant, resolve_arch

    if args.threads is not None:
        runtime.configure_threads(args.threads)
    device = runtime.select_device(args.device)
    contract = read_contract(paths.feature_contract)
    split = arrow_cache.open_split(paths.arrow("train"))
    spec = get_variant(variant)
    dims = {g: len(contract.names(g)) for g in FEATURE_GROUPS}
    model = build_model(resolve_arch(spec, dims, contract.ctx_cat_cardinalities, split.seq_len)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    batcher = WindowBatcher(split, seq_len=split.seq_len, batch_size=args.batch_size, shuffle=True, seed=1)
    n_build = min(len(batcher), 50)
    t0 = time.perf_counter()
    for i in range(n_build):
        batcher.batch(i)
    build_s = (time.perf_counter() - t0) / n_build
    batch = to_device(batcher.batch(0), device)
    model.train()

    def step() -> None:
        outputs = {k: v.float() for k, v in model(batch).items()}
        total, _ = compute_losses(spec, outputs, batch, None)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(3):  # warm-up
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / n_steps
    b = batch["seq"].shape[0]
    return {"step_samples_per_s": b / step_s, "build_s": build_s, "step_s": step_s,
            "expected_loader_share": build_s / (build_s + step_s)}


# -- children -------------------------------------------------------------------------------------
def child_main(args: argparse.Namespace) -> None:
    out = Path(args.child_out)
    if args.child == "baseline":
        import sentinel_pipeline.training.engine  # noqa: F401  (the imports a training run pays for)

        out.write_text(json.dumps({"peak_rss_bytes": own_peak_rss()}), encoding="utf-8")
        return
    from sentinel_pipeline.paths import ArtifactPaths
    from sentinel_pipeline.training.engine import train

    root = Path(args.child_data)
    paths = ArtifactPaths(data_dir=root, models_dir=root / "models")
    result = train(train_config(paths, root / "run_memory", args.memory_variant, args, 1, None), progress=False)
    record = result.history[-1]
    out.write_text(json.dumps({
        "source": result.metrics["data_source"], "samples": record["n_train_samples"],
        "throughput_samples_per_s": record["throughput_samples_per_s"], "loader_share": record["loader_share"],
        "epoch_seconds": record["epoch_seconds"], "peak_rss_bytes": own_peak_rss(),
    }), encoding="utf-8")


def run_child(args: argparse.Namespace, role: str, out: Path, data: Path | None = None) -> tuple[dict[str, Any], float]:
    """Run this script as ``--child role``; returns (its JSON result, wall seconds)."""
    cmd = [sys.executable, __file__, "--child", role, "--child-out", str(out), "--device", args.device, "--profile", args.profile,
           "--batch-size", str(args.batch_size), "--memory-variant", args.memory_variant,
           "--num-workers", str(args.num_workers)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if data is not None:
        cmd += ["--child-data", str(data)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child {role!r} failed with exit code {proc.returncode}")
    return json.loads(out.read_text(encoding="utf-8")), wall


# -- report ---------------------------------------------------------------------------------------
def throughput(args: argparse.Namespace, paths: Any, workdir: Path) -> None:
    import torch

    from sentinel_pipeline.training import runtime
    from sentinel_pipeline.training.engine import train

    device = runtime.select_device(args.device)
    print(f"\nthroughput: {args.train_samples:,} train samples per epoch, batch {args.batch_size}, shuffled, "
          f"{args.epochs} epochs, device {device}, num_workers {args.num_workers}, torch threads "
          f"{args.threads or torch.get_num_threads()}")
    print(f"  {'variant':16s} {'epoch':>5s} {'samples/s':>11s} {'loader share':>12s} {'train s':>8s} "
          f"{'val s':>6s} | bare step samples/s, build ms/batch, expected loader share")
    for variant in args.variants:
        cfg = train_config(paths, workdir / "runs" / variant, variant, args, args.epochs, args.train_samples)
        result = train(cfg, progress=False)
        ref = bare_step_reference(paths, variant, args, n_steps=args.ref_steps)
        for rec in result.history:
            tail = ""
            if rec["epoch"] == result.history[-1]["epoch"]:
                tail = (f"| {ref['step_samples_per_s']:10,.0f}  {1000 * ref['build_s']:6.1f}  "
                        f"{100 * ref['expected_loader_share']:5.1f}%")
            print(f"  {variant:16s} {rec['epoch']:5d} {rec['throughput_samples_per_s']:11,.0f} "
                  f"{100 * rec['loader_share']:11.1f}% {rec['train_seconds']:8.1f} {rec['val_seconds']:6.1f} {tail}")


def thread_counts(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]`` (each >= 1)."""
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected thread counts such as 1 or 1,2, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return counts


def compare_threads(args: argparse.Namespace, paths: Any, workdir: Path, counts: list[int]) -> None:
    """Each variant trained once per thread count; last epoch's samples/s side by side."""
    from sentinel_pipeline.training import runtime
    from sentinel_pipeline.training.engine import train

    device = runtime.select_device(args.device)
    print(f"\nthreads: {args.train_samples:,} train samples per epoch, batch {args.batch_size}, shuffled, "
          f"{args.epochs} epochs, device {device}; samples/s of the last epoch; usable CPUs "
          f"{runtime.usable_cpu_count()}, engine default {runtime.default_thread_count()} thread(s), "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"  {'variant':16s} " + " ".join(f"{f'{n} thread(s)':>12s}" for n in counts)
          + f" {f'{counts[-1]} vs {counts[0]}':>9s}")
    for variant in args.variants:
        rates = []
        for n in counts:
            args.threads = n
            cfg = train_config(paths, workdir / "runs" / f"{variant}_t{n}", variant, args, args.epochs,
                               args.train_samples)
            rates.append(train(cfg, progress=False).history[-1]["throughput_samples_per_s"])
        print(f"  {variant:16s} " + " ".join(f"{r:12,.0f}" for r in rates) + f" {rates[-1] / rates[0]:8.2f}x",
              flush=True)
    args.threads = None


def memory(args: argparse.Namespace, datasets: list[tuple[Path, Any]], workdir: Path) -> None:
    base, _ = run_child(args, "baseline", workdir / "baseline.json")
    base_rss = base["peak_rss_bytes"]
    print(f"\nmemory: {args.memory_variant}, 1 epoch over every sample, batch {args.batch_size}, child process "
          f"(peak RSS = its VmHWM); import-only child: peak RSS {base_rss / MIB:,.0f} MiB")
    print(f"  {'train rows':>10s} {'samples*':>9s} {'flat arrays*':>12s} {'seq NxFx4':>10s} {'NxLxF windows':>14s} "
          f"{'peak RSS':>9s} {'RSS-base':>9s} {'wall s':>7s} {'samples/s':>9s} source   (* train + val)")
    rows = []
    for root, paths in datasets:
        sizes = split_sizes(paths)
        res, wall = run_child(args, "memory", root / "memory.json", root)
        rss = res["peak_rss_bytes"]
        rows.append((sizes, rss))
        print(f"  {sizes['train_rows']:10,d} {sizes['samples']:9,d} {sizes['flat_bytes'] / MIB:8,.0f} MiB "
              f"{sizes['seq_flat_bytes'] / MIB:6,.0f} MiB {sizes['window_bytes'] / MIB:10,.0f} MiB "
              f"{rss / MIB:5,.0f} MiB {(rss - base_rss) / MIB:5,.0f} MiB {wall:7.1f} "
              f"{res['throughput_samples_per_s']:9,.0f} {res['source']['train']}")
    (small, rss_small), (large, rss_large) = rows
    d_rss = rss_large - rss_small
    d_flat = large["flat_bytes"] - small["flat_bytes"]
    d_win = large["window_bytes"] - small["window_bytes"]
    d_seq = large["seq_flat_bytes"] - small["seq_flat_bytes"]
    print(f"  growth: rows x{large['train_rows'] / small['train_rows']:.2f}; peak RSS +{d_rss / MIB:,.0f} MiB; "
          f"flat arrays +{d_flat / MIB:,.0f} MiB (seq alone +{d_seq / MIB:,.0f} MiB); "
          f"N x L x F windows would add +{d_win / MIB:,.0f} MiB (L = {large['seq_len']}, F_seq = "
          f"{large['seq_features']})")
    d_rows = large["rows"] - small["rows"]
    d_samples = large["samples"] - small["samples"]
    print(f"  per added row (train + val): peak RSS +{d_rss / d_rows:,.0f} B; flat arrays +{d_flat / d_rows:,.0f} B; "
          f"materialised windows would add +{d_win / d_rows:,.0f} B ({d_samples / d_rows:.2f} samples/row x L x "
          f"F_seq x 4)")
    verdict = "grows with N x F (windows are not materialised)" if d_rss < 0.5 * d_win else "grows like N x L x F"
    print(f"  peak RSS growth / flat-array growth = {d_rss / d_flat:.2f}; / window growth = {d_rss / d_win:.2f} "
          f"-> {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k / 80k train rows, 5k samples per epoch")
    ap.add_argument("--sizes", type=int, nargs=2, default=None, help="train rows of the two datasets")
    ap.add_argument("--train-samples", type=int, default=None, help="samples per epoch in the throughput runs")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--profile", choices=("safe", "throughput"), default="safe",
                    help="the training profile (throughput: larger batches, pinned memory on CUDA)")
    ap.add_argument("--threads", type=thread_counts, default=None,
                    help="torch threads (default: the engine's); a list such as 1,2 compares thread counts")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--memory-variant", choices=VARIANTS, default="seq_ctx_fusion")
    ap.add_argument("--ref-steps", type=int, default=None, help="steps timed for the bare-step reference")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--workdir", default=None, help="keep the datasets here (default: a temp dir, removed)")
    ap.add_argument("--child", choices=("baseline", "memory"), help=argparse.SUPPRESS)
    ap.add_argument("--child-data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    counts: list[int] = args.threads or []
    args.threads = counts[0] if len(counts) == 1 else None
    if args.child:
        child_main(args)
        return
    args.sizes = args.sizes or ([20_000, 80_000] if args.quick else [200_000, 800_000])
    args.train_samples = args.train_samples or (5_000 if args.quick else 50_000)
    args.ref_steps = args.ref_steps or (5 if args.quick else 20)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_training_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        datasets = []
        for rows in sorted(args.sizes):
            root = workdir / f"data_{rows}"
            paths, seconds = build_dataset(root, rows)
            sizes = split_sizes(paths)
            datasets.append((root, paths))
            print(f"dataset ~{rows:,} train rows: data half in {seconds:.1f} s -> train {sizes['train_rows']:,} rows / "
                  f"{sizes['train_samples']:,} samples, train+val {sizes['rows']:,} rows, seq {sizes['seq_features']} "
                  f"features x L {sizes['seq_len']}")
        if len(counts) > 1:
            compare_threads(args, datasets[0][1], workdir, counts)
        else:
            throughput(args, datasets[0][1], workdir)
        if not args.skip_memory:
            memory(args, datasets, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
