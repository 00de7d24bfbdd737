"""The quick demo's gate against noise: the quick_pipeline job on its market with the planted signal
switched off (signal_strength 0), over several seeds, and on the planted market over the same seeds.

Prints, per market seed, the bundle_verified verdict and the gate numbers; a null market must fail.
Usage: python bench/quick_null.py [--seeds 7 8 9 10] [--signal 0.0 0.3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import dagster as dg

from sentinel_pipeline.bundles import list_bundles, records_dir
from sentinel_pipeline.definitions import defs
from sentinel_pipeline.orchestration import jobs


def run_once(seed: int, signal: float) -> dict:
    config = jobs.quick_run_config()
    market = config["resources"]["data_settings"]["config"]
    market.update(synthetic_seed=seed, signal_strength=signal)
    with tempfile.TemporaryDirectory() as root:
        cwd = os.getcwd()
        os.chdir(root)
        instance = dg.DagsterInstance.ephemeral()
        try:
            t0 = time.perf_counter()
            result = defs.resolve_job_def("quick_pipeline").execute_in_process(
                run_config=config, instance=instance, raise_on_error=False)
            seconds = time.perf_counter() - t0
            check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "bundle_verified")
            bundle = list_bundles(Path(root) / jobs.QUICK_MODELS_DIR, jobs.QUICK_VARIANT)[0]
            record = json.loads((records_dir(bundle) / "verification.json").read_text())
        finally:
            instance.dispose()
            os.chdir(cwd)
    gates = {g["name"]: g for g in record["gate_results"]}
    replayed = any(e.asset_key.to_user_string() == f"replay_{jobs.QUICK_VARIANT}"
                   for e in result.get_asset_materialization_events())
    return {"seed": seed, "signal": signal, "verified": bool(check.passed), "replayed": replayed,
            "failed_checks": record["failed_checks"],
            "directional_t": round(gates["directional_skill"]["value"], 2),
            "mse_t": next((round(g["value"], 2) for n, g in gates.items() if n.startswith("mse_skill")), None),
            "windows": gates["directional_skill"]["n_windows"], "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9, 10])
    ap.add_argument("--signal", type=float, nargs="+", default=[0.0])
    args = ap.parse_args()
    rows = [run_once(seed, signal) for signal in args.signal for seed in args.seeds]
    for r in rows:
        print(json.dumps(r))
    for signal in args.signal:
        sub = [r for r in rows if r["signal"] == signal]
        print(f"signal {signal}: {sum(r['verified'] for r in sub)}/{len(sub)} bundles verified, "
              f"{sum(r['replayed'] for r in sub)} replayed")


if __name__ == "__main__":
    main()
