"""Calibrate the blocking gate for the graph family on synthetic daily panels: pass rates with the planted
cross-sectional signal and on null panels (``signal_strength`` 0), each panel built through the real data
half (panel preset) and symbol graph, ``gat_multi_horizon`` trained with the pipeline's budget and verified
with the full ``verify_bundle`` (gate: HAC t of the 5-day head's daily rank IC vs the 5-day forward return,
scored on the test split that training and checkpoint selection never read).

    python bench/calibrate_panel_gate.py                         # 3 null + 3 signal seeds
    python bench/calibrate_panel_gate.py --null-seeds 2 --signal-seeds 1 --epochs 4

Writes every record to ``bench/results/calibrate_panel_gate.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel_pipeline.evaluation import calibration  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--null-seeds", type=int, default=3)
    ap.add_argument("--signal-seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=100)
    ap.add_argument("--strength", type=float, default=None, help="planted strength (default: the panel's)")
    ap.add_argument("--n-symbols", type=int, default=None)
    ap.add_argument("--n-days", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None, help="override the pipeline's epoch budget")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench/results/calibrate_panel_gate.json")
    args = ap.parse_args(argv)
    from sentinel_pipeline.data.synthetic_panel import SyntheticPanelConfig

    strength = args.strength if args.strength is not None else SyntheticPanelConfig().signal_strength
    panel = {k: v for k, v in (("n_symbols", args.n_symbols), ("n_days", args.n_days)) if v is not None}
    train = {k: v for k, v in (("epochs", args.epochs), ("threads", args.threads)) if v is not None}
    jobs = [(args.first_seed + i, 0.0) for i in range(args.null_seeds)]
    jobs += [(args.first_seed + i, strength) for i in range(args.signal_seeds)]
    records = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="calibrate-panel-") as tmp:
        for seed, s in jobs:
            records.append(calibration.calibrate_panel(Path(tmp) / f"s{seed}-{s}", seed, s, panel_overrides=panel,
                                                       train_overrides=train))
    rows = calibration.pass_rate_table(records)
    print("| variant | market | bundles | passed | pass rate |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['market']} | {r['bundles']} | {r['passed']} | {r['pass_rate']} |")
    print("\n| seed | strength | 5-day rank IC | HAC t | verdict | train s | epochs |\n|---|---|---|---|---|---|---|")
    for r in records:
        g = next((g for g in r["gates"] if g["name"] == "directional_skill"), {})
        ic = (g.get("extra") or {}).get("mean_ic")
        print(f"| {r['seed']} | {r['signal_strength']:g} | {'' if ic is None else f'{ic:+.4f}'} | "
              f"{g.get('value', float('nan')):+.2f} | {'PASS' if r['passed'] else 'FAIL'} | {r['train_seconds']} | "
              f"{r['epochs']} |")
    print(f"\n{len(records)} panels in {time.perf_counter() - t0:.0f}s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"records": records, "table": rows}, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
