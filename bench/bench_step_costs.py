"""Benchmark: what a CPU training step costs - thread counts, dropout, attention - per window variant.

One training step = forward + loss + backward + gradient clip + AdamW step of the variant's model
(default architecture, the default intraday feature contract's dimensions) on one pre-built batch
of ``--batch-size`` (256) random windows of ``--seq-len`` (30) bars. Step times are medians over
``--rounds`` interleaved rounds (each round times every configuration once, in turn, so that a
machine whose load changes during the run penalises all configurations alike).

1. Threads: the step at 1, 2 and all usable CPUs (duplicates dropped), next to the count the
   engine picks by default (``runtime.default_thread_count``). Printed: samples/s per count, the
   fastest count and where the default stands. ``--busy N`` starts N spinning processes first (the
   situation of a training process next to other work) and measures again.
2. Dropout: the step with the configured dropout (``p`` = 0.1 in every variant) against the same
   model with every dropout at 0 and, for the transformer, with only the attention-weight dropout at
   0 (``arch={"attn_dropout": 0.0}``); the difference is dropout's cost (generating the masks and applying them). A profiler run
   of the configured step gives the share of CPU time in the random-mask kernels (``bernoulli_``)
   and in attention (``scaled_dot_product_attention`` and its math kernels).
3. Attention (``transformer_tbm``): heads 4 (default) vs 1 vs 8 at the same ``d_model``, and
   inference with the encoder's fast path (``eval`` + ``torch.inference_mode``) against the
   training-mode forward.

    python bench/bench_step_costs.py                 # 256 x 30, 7 rounds
    python bench/bench_step_costs.py --quick         # 3 rounds, fewer steps
    python bench/bench_step_costs.py --busy 1        # also with one core kept busy
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout: make the repo importable
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from sentinel_pipeline.data.feature_contract import FEATURE_GROUPS  # noqa: E402
from sentinel_pipeline.data.features import build_contract  # noqa: E402
from sentinel_pipeline.data.split_arrays import TARGET_NAMES  # noqa: E402
from sentinel_pipeline.training import runtime  # noqa: E402
from sentinel_pipeline.training.losses import compute_losses  # noqa: E402
from sentinel_pipeline.training.models import build_model, get_variant, resolve_arch  # noqa: E402

VARIANTS = ("mlp_two_head", "seq_ctx_fusion", "transformer_tbm")


def make_batch(contract: Any, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dims = {k: len(contract.names(k)) for k in FEATURE_GROUPS}
    cards = contract.ctx_cat_cardinalities
    return {
        "seq": torch.randn(batch_size, seq_len, dims["seq"], generator=g),
        "snap": torch.randn(batch_size, dims["snap"], generator=g),
        "ctx_cat": torch.stack([torch.randint(0, c, (batch_size,), generator=g) for c in cards], 1)
        if cards else torch.zeros(batch_size, 0, dtype=torch.int64),
        "ctx_cont": torch.randn(batch_size, dims["ctx_cont"], generator=g),
        "targets": torch.randn(batch_size, len(TARGET_NAMES), generator=g),
        "tb_class": torch.randint(0, 3, (batch_size,), generator=g),
    }


def make_step(variant: str, contract: Any, seq_len: int, batch: dict[str, torch.Tensor],
              arch_overrides: dict[str, Any] | None = None,
              tweak: Callable[[nn.Module], None] | None = None) -> Callable[[], None]:
    spec = get_variant(variant)
    dims = {k: len(contract.names(k)) for k in FEATURE_GROUPS}
    torch.manual_seed(0)
    arch = resolve_arch(spec, dims, contract.ctx_cat_cardinalities, seq_len, arch_overrides)
    model = build_model(arch)
    if tweak is not None:
        tweak(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)

    def step() -> None:
        outputs = {k: v.float() for k, v in model(batch).items()}
        total, _ = compute_losses(spec, outputs, batch, None)
        opt.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step.model = model  # type: ignore[attr-defined]
    return step


def timed(fn: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def interleaved(configs: dict[str, tuple[Callable[[], None], int]], rounds: int, n_steps: int) -> dict[str, float]:
    """Median seconds per call of each config; configs are ``{name: (fn, threads)}``, timed in turn."""
    for fn, threads in configs.values():  # warm-up (allocator, OpenMP pool, autograd graph)
        torch.set_num_threads(threads)
        timed(fn, 2)
    samples: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, (fn, threads) in configs.items():
            torch.set_num_threads(threads)
            samples[name].append(timed(fn, n_steps))
    return {k: float(np.median(v)) for k, v in samples.items()}


def steps_for(variant: str, quick: bool) -> int:
    base = {"mlp_two_head": 40, "seq_ctx_fusion": 10, "transformer_tbm": 4}[variant]
    return max(2, base // 2) if quick else base


def bench_threads(args: argparse.Namespace, contract: Any, batch: dict[str, torch.Tensor], label: str) -> None:
    usable = runtime.usable_cpu_count()
    default = runtime.default_thread_count()
    counts = sorted({1, 2, usable})
    print(f"\n1. threads ({label}; load average {os.getloadavg()[0]:.2f}): samples/s of one step, batch "
          f"{args.batch_size}; usable CPUs {usable}, engine default {default}")
    print(f"  {'variant':16s} " + " ".join(f"{f'{n} thread(s)':>12s}" for n in counts) + "  fastest  default vs fastest")
    for variant in args.variants:
        step = make_step(variant, contract, args.seq_len, batch)
        res = interleaved({str(n): (step, n) for n in counts}, args.rounds, steps_for(variant, args.quick))
        rates = {int(k): args.batch_size / v for k, v in res.items()}
        best = max(rates, key=rates.get)
        print(f"  {variant:16s} " + " ".join(f"{rates[n]:12,.0f}" for n in counts)
              + f"  {best:7d}  {rates[default] / rates[best]:8.2f}x", flush=True)
    torch.set_num_threads(1)


def _share(prof: Any, names: tuple[str, ...]) -> float:
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    part = sum(e.self_cpu_time_total for e in events if any(n in e.key for n in names))
    return part / total if total else float("nan")


def profile_shares(step: Callable[[], None], n: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    return {
        "dropout masks": _share(prof, ("bernoulli",)),
        "dropout (masks + apply)": _share(prof, ("bernoulli", "dropout", "native_dropout")),
        "attention": _share(prof, ("scaled_dot_product", "_softmax", "bmm", "baddbmm")),
    }


def bench_dropout(args: argparse.Namespace, contract: Any, batch: dict[str, torch.Tensor]) -> None:
    torch.set_num_threads(1)
    print(f"\n2. dropout (1 thread; load average {os.getloadavg()[0]:.2f}): ms per step, batch {args.batch_size}")
    print(f"  {'variant':16s} {'p=0.1 (default)':>16s} {'no attn-weight drop':>20s} {'p=0':>8s}  "
          f"dropout cost  profiler: masks / dropout / attention share of CPU")
    for variant in args.variants:
        configs = {
            "default": (make_step(variant, contract, args.seq_len, batch), 1),
            "p0": (make_step(variant, contract, args.seq_len, batch, {"dropout": 0.0}), 1),
        }
        if variant == "transformer_tbm":
            configs["no_attn"] = (make_step(variant, contract, args.seq_len, batch, {"attn_dropout": 0.0}), 1)
        res = interleaved(configs, args.rounds, steps_for(variant, args.quick))
        shares = profile_shares(configs["default"][0], steps_for(variant, True))
        no_attn = f"{1000 * res['no_attn']:20.1f}" if "no_attn" in res else f"{'-':>20s}"
        cost = (res["default"] - res["p0"]) / res["default"]
        print(f"  {variant:16s} {1000 * res['default']:16.1f} {no_attn} {1000 * res['p0']:8.1f}  "
              f"{100 * cost:11.1f}%  {100 * shares['dropout masks']:5.1f}% / "
              f"{100 * shares['dropout (masks + apply)']:5.1f}% / {100 * shares['attention']:5.1f}%", flush=True)


def bench_attention(args: argparse.Namespace, contract: Any, batch: dict[str, torch.Tensor]) -> None:
    torch.set_num_threads(1)
    variant = "transformer_tbm"
    print(f"\n3. attention, {variant} (1 thread; load average {os.getloadavg()[0]:.2f}): ms per training step "
          f"and per inference forward, batch {args.batch_size}")
    configs = {f"heads {h}": (make_step(variant, contract, args.seq_len, batch, {"n_heads": h}), 1) for h in (4, 1, 8)}
    res = interleaved(configs, args.rounds, steps_for(variant, args.quick))
    for name, sec in res.items():
        print(f"  train step, {name:8s}: {1000 * sec:7.1f} ms ({args.batch_size / sec:8,.0f} samples/s)")
    model = configs["heads 4"][0].model  # type: ignore[attr-defined]

    def fwd_train_mode() -> None:
        model.train()
        with torch.no_grad():
            model(batch)

    def fwd_fast_path() -> None:
        model.eval()
        with torch.inference_mode():
            model(batch)

    res = interleaved({"train-mode forward, no grad": (fwd_train_mode, 1),
                       "eval + inference_mode (fast path)": (fwd_fast_path, 1)}, args.rounds, 10)
    for name, sec in res.items():
        print(f"  {name:34s}: {1000 * sec:7.2f} ms ({args.batch_size / sec:9,.0f} samples/s)")
    model.train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds and half the steps")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--busy", type=int, default=0, help="also measure threads with N spinning processes")
    ap.add_argument("--only", choices=("threads", "dropout", "attention"), nargs="+", default=None)
    args = ap.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 7)
    only = set(args.only or ("threads", "dropout", "attention"))
    contract = build_contract()
    batch = make_batch(contract, args.batch_size, args.seq_len)
    print(f"torch {torch.__version__}, batch {args.batch_size}, seq_len {args.seq_len}, seq features "
          f"{len(contract.names('seq'))}, {args.rounds} interleaved rounds, median")
    if "threads" in only:
        bench_threads(args, contract, batch, "quiet")
        if args.busy:
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
            try:
                time.sleep(1.0)
                bench_threads(args, contract, batch, f"{args.busy} core(s) kept busy by a spinning process")
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()
    if "dropout" in only:
        bench_dropout(args, contract, batch)
    if "attention" in only:
        bench_attention(args, contract, batch)


if __name__ == "__main__":
    main()
