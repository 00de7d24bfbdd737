"""Calibrate the verification gate: pass rates on null markets and on planted-signal markets.

For each market seed, the synthetic market is built through the real data half (``signal_strength``
0 for the null, the default signal otherwise), each variant is trained with the pipeline's budget
(``training.config.PIPELINE_TRAINING``) and verified with the full ``verify_bundle`` (gates scored on
the test split). Prints the pass-rate table of the README and, on the null markets, the distribution
of the directional HAC t of random no-skill feature signals (``--feature-null-draws``), whose 95th
percentile is what the default threshold is chosen from.

    python bench/calibrate_gate.py                       # 8 null + 4 signal seeds, all variants
    python bench/calibrate_gate.py --variants mlp_two_head --null-seeds 8 --signal-seeds 4 --jobs 2
    python bench/calibrate_gate.py --quick               # 2 + 1 seeds, MLP only (smoke run)

Writes every record to ``bench/results/calibrate_gate.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig  # noqa: E402
from sentinel_pipeline.evaluation import calibration  # noqa: E402


def _one(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    work = Path(job["work"])
    records = calibration.calibrate_market(
        work, job["seed"], job["strength"], variants=job["variants"], market_overrides=job["market"],
        train_overrides={"threads": 1}, keep=job["draws"] > 0,
    )
    null_t: list[float] = []
    if job["draws"] > 0:
        from sentinel_pipeline.paths import ArtifactPaths

        paths = ArtifactPaths(data_dir=work / "data", models_dir=work / "models")
        null_t = calibration.feature_null_statistics(paths, n_draws=job["draws"], seed=job["seed"]).tolist()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return {"records": records, "feature_null_t": null_t}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--null-seeds", type=int, default=8)
    ap.add_argument("--signal-seeds", type=int, default=4)
    ap.add_argument("--first-seed", type=int, default=101)
    ap.add_argument("--strength", type=float, default=None, help="planted signal (default: the market default)")
    ap.add_argument("--variants", nargs="+", default=list(calibration.DEFAULT_VARIANTS))
    ap.add_argument("--n-symbols", type=int, default=None)
    ap.add_argument("--n-days", type=int, default=None)
    ap.add_argument("--feature-null-draws", type=int, default=500)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "calibrate_gate.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.null_seeds, args.signal_seeds, args.variants, args.feature_null_draws = 2, 1, ["mlp_two_head"], 100
    market: dict[str, Any] = {}
    if args.n_symbols:
        market["n_symbols"] = args.n_symbols
    if args.n_days:
        market["n_days"] = args.n_days
    default = SyntheticMarketConfig(**market)
    strength = default.signal_strength if args.strength is None else args.strength
    root = Path(tempfile.mkdtemp(prefix="sentinel-calibration-"))
    jobs = []
    for i in range(args.null_seeds):
        seed = args.first_seed + i
        jobs.append({"seed": seed, "strength": 0.0, "work": str(root / f"null{seed}"), "variants": args.variants,
                     "market": market, "draws": args.feature_null_draws})
    for i in range(args.signal_seeds):
        seed = args.first_seed + 1000 + i
        jobs.append({"seed": seed, "strength": strength, "work": str(root / f"sig{seed}"), "variants": args.variants,
                     "market": market, "draws": 0})
    print(f"market: {default.n_symbols} symbols x {default.n_days} days x {default.bars_per_day} bars; "
          f"signal {strength}; {len(jobs)} markets; variants {args.variants}; {args.jobs} jobs", flush=True)
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    null_t: list[float] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for out in pool.map(_one, jobs):
            records += out["records"]
            null_t += out["feature_null_t"]
    seconds = time.perf_counter() - t0
    print(f"\n{len(records)} bundles in {seconds / 60:.1f} min\n")
    print("| variant | market | bundles | passed | pass rate |\n|---|---|---|---|---|")
    for row in calibration.pass_rate_table(records):
        print(f"| {row['variant']} | {row['market']} | {row['bundles']} | {row['passed']} | {row['pass_rate']:.0%} |")
    print("\nper bundle (gate statistics: directional HAC t; MSE t or shift-null percentile):")
    for r in records:
        vals = {g["name"]: g["value"] for g in r["gates"]}
        other = [c for c in r["failed_checks"] if c != "quality_gates"]
        print(f"  {r['variant']:<16} seed {r['seed']:<5} strength {r['signal_strength']:<5} "
              f"{'PASS' if r['passed'] else 'FAIL'}{' (also failed ' + ', '.join(other) + ')' if other else ''}  "
              + ", ".join(
                  f"{k} {v:+.2f}" if isinstance(v, float) else f"{k} n/a" for k, v in vals.items()))
    if null_t:
        t = np.asarray(null_t)
        t = t[np.isfinite(t)]
        qs = np.quantile(t, [0.5, 0.9, 0.95, 0.975, 0.99])
        print(f"\nfeature-null directional HAC t over {t.size} no-skill signals on {args.null_seeds} null markets: "
              f"median {qs[0]:+.2f}, q90 {qs[1]:.2f}, q95 {qs[2]:.2f}, q97.5 {qs[3]:.2f}, q99 {qs[4]:.2f}")
        for thr in (1.645, 2.0, 2.5, 3.0):
            print(f"  share of no-skill signals with t >= {thr}: {(t >= thr).mean():.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"market": calibration.asdict_market(default), "strength": strength,
                                    "records": records, "feature_null_t": null_t, "seconds": seconds},
                                   indent=1, default=str))
    print(f"\nrecords: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
