"""Benchmark: one training step of ``gat_multi_horizon`` on one day of 505 symbols x 30 bars x F features.

Input: one synthetic day batch in the shared day-batch format (random ``seq`` (n, L, F), ``--k`` = 10
random same-day sources per node with weights in [0.2, 1], random targets for the four horizons),
``--symbols`` 505 (the S&P 500 panel), ``--seq-len`` 30, ``--features`` 20 (the default contract has
16 ``seq`` columns; 20 leaves room for the panel's daily features).

Step = forward + ``multi_horizon_rank_loss`` (MSE + lambda (1 - soft Spearman), four horizons) +
backward + AdamW step, in train mode. Two models, timed interleaved in this process:

- ``gat``: ``GATMultiHorizonNet`` with ``DEFAULT_ARCH`` (GRU encoder, hidden 48, one graph-attention
  block of 4 heads, ``"log"`` edge weights);
- ``reference``: the same net with ``graph_layers = 0``: the same GRU encoder, heads, loss and optimiser
  without the graph block. The difference between the two is the cost of the graph attention inside a
  real step.

Also timed, interleaved: the loss alone (forward + backward on fixed outputs), whose pairwise soft
rank is O(n^2) per day and horizon. Printed: median step time over ``--reps`` (after ``--warmup``), samples (nodes) per second, parameter
counts, and the peak memory of a step: each model runs again in a child process that, after one
warm-up step, returns freed heap to the OS (``malloc_trim``), resets its peak-RSS mark
(``/proc/self/clear_refs``) and reports how far the peak RSS (``VmHWM``) rises above that base over
two more steps. Linux with glibc only. Timings on a shared machine are noisy.

    python bench/bench_gat_step.py
    python bench/bench_gat_step.py --symbols 3000 --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout: make the repo importable
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sentinel_pipeline.data.split_arrays import TARGET_NAMES  # noqa: E402
from sentinel_pipeline.training.layers import build, multi_horizon_rank_loss, resolve_arch  # noqa: E402

MIB = 2**20
MODELS = ("gat", "reference")


def proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


def settle_memory() -> int:
    """Return freed heap to the OS, reset the peak-RSS mark to the current RSS and return that RSS."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status("VmRSS")


def day_batch(n: int, seq_len: int, n_feat: int, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    offs = np.argsort(rng.random((n, n - 1)), axis=1)[:, :k]  # k distinct others per target
    tgt = np.repeat(np.arange(n), k)
    src = offs.reshape(-1)
    src = src + (src >= tgt)
    targets = np.full((n, len(TARGET_NAMES)), np.nan, dtype=np.float32)
    targets[:, :4] = rng.normal(size=(n, 4)) * 0.02  # fwd_ret_1/5/10/20
    return {
        "seq": torch.tensor(rng.normal(size=(n, seq_len, n_feat)).astype(np.float32)),
        "targets": torch.tensor(targets),
        "day": torch.zeros(n, dtype=torch.int64),
        "day_ptr": torch.tensor([0, n], dtype=torch.int64),
        "symbol_idx": torch.arange(n, dtype=torch.int64),
        "edge_index": torch.tensor(np.stack([src, tgt]), dtype=torch.int64),
        "edge_weight": torch.tensor(rng.uniform(0.2, 1.0, size=n * k).astype(np.float32)),
    }


def make(model_name: str, seq_len: int, n_feat: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    over = {} if model_name == "gat" else {"graph_layers": 0}
    model = build(resolve_arch(n_feat, seq_len, 0, over)).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    loss, _ = multi_horizon_rank_loss(model(batch), batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def child(model_name: str, args: argparse.Namespace) -> None:
    batch = day_batch(args.symbols, args.seq_len, args.features, args.k)
    model, opt = make(model_name, args.seq_len, args.features)
    step(model, opt, batch)  # optimiser state and lazy set-up exist from here on
    base = settle_memory()
    for _ in range(2):
        step(model, opt, batch)
    print(json.dumps({"base": base, "hwm": proc_status("VmHWM")}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--symbols", type=int, default=505)
    ap.add_argument("--seq-len", type=int, default=30)
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--k", type=int, default=10, help="incoming edges per node")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args)
        return

    batch = day_batch(args.symbols, args.seq_len, args.features, args.k)
    built = {m: make(m, args.seq_len, args.features) for m in MODELS}
    times: dict[str, list[float]] = {m: [] for m in (*MODELS, "loss")}
    gen = torch.Generator().manual_seed(1)
    outs = {f"ret_{h}": torch.randn(args.symbols, generator=gen, requires_grad=True) for h in (1, 5, 10, 20)}
    for rep in range(args.warmup + args.reps):
        for m in MODELS:  # interleaved: both models see the same machine load
            t0 = time.perf_counter()
            step(*built[m], batch)
            if rep >= args.warmup:
                times[m].append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # the loss alone (forward + backward), on fixed outputs
        multi_horizon_rank_loss(outs, batch)[0].backward()
        if rep >= args.warmup:
            times["loss"].append(time.perf_counter() - t0)
    n, n_edges = args.symbols, int(batch["edge_index"].shape[1])
    print(f"training step on one day: {n} symbols x {args.seq_len} bars x {args.features} features, "
          f"{n_edges} edges (k = {args.k}), {args.threads} thread(s), median of {args.reps} steps")
    for m in MODELS:
        med = statistics.median(times[m])
        cmd = [sys.executable, __file__, "--child", m, "--symbols", str(n), "--seq-len", str(args.seq_len),
               "--features", str(args.features), "--k", str(args.k), "--threads", str(args.threads)]
        rec = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        n_params = sum(p.numel() for p in built[m][0].parameters())
        print(f"  {m:9s}  {1e3 * med:8.1f} ms/step  {n / med:9.0f} samples/s  "
              f"peak +{(rec['hwm'] - rec['base']) / MIB:6.1f} MiB  ({n_params} parameters)")
    t_gat = statistics.median(times["gat"])
    extra = t_gat - statistics.median(times["reference"])
    print(f"graph block share of the gat step: {extra / t_gat:.0%} ({1e3 * extra:.1f} ms)")
    t_loss = statistics.median(times["loss"])
    print(f"rank loss alone (4 horizons, forward + backward, O(n^2) soft rank per day): {1e3 * t_loss:.1f} ms "
          f"= {t_loss / t_gat:.0%} of the gat step")


if __name__ == "__main__":
    main()
