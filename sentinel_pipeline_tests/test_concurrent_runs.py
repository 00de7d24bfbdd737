"""Two pipeline runs at once from two Dagster instances (two ``DAGSTER_HOME``s) on one data directory
and one models directory: nothing queues them, only the file locks (``sentinel_pipeline.locking``).

Each run materialises the data half, one variant's bundle (``mlp_two_head``, the fastest, to keep the
test near a minute on 2 cores; every variant goes through the same training asset and lock), its
``bundle_verified`` check and its replay. Without the locks both runs trained the variant at once in
the same run directory and wrote two bundles, and a check could verify the other run's bundle.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sentinel_pipeline.bundles import list_bundles
from sentinel_pipeline_tests.pipeline_fixtures import PipelineHome, leftover_temp_files

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANT = "mlp_two_head"
# one run in its own process and its own Dagster instance; starts when GO appears, writes a summary
RUN_WORKER = """
import json, sys, time
from pathlib import Path
import dagster as dg
from sentinel_pipeline.orchestration.bundle_checks import CHECK_NAME
from sentinel_pipeline.orchestration.data_assets import DATA_ASSETS
from sentinel_pipeline.orchestration.replay_assets import replay_asset_key
from sentinel_pipeline.orchestration.training_assets import bundle_asset_key
from sentinel_pipeline_tests.pipeline_fixtures import (
    TRAINING, TRAINING_OVERRIDES, PipelineHome, check_evaluations, materializations, step_failures)
root, dagster_home, variant, out, ready, go = sys.argv[1:]
home = PipelineHome(Path(root))
Path(dagster_home).mkdir(parents=True, exist_ok=True)
instance = dg.DagsterInstance.from_config(dagster_home)
job = home.defs().resolve_job_def("full_pipeline")
selection = [*(k for a in DATA_ASSETS for k in a.keys), bundle_asset_key(variant), replay_asset_key(variant)]
config = {"ops": {f"bundle_{variant}": {"config": {**TRAINING, **TRAINING_OVERRIDES.get(variant, {})}}}}
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
result = job.execute_in_process(run_config=config, instance=instance, asset_selection=selection,
                                raise_on_error=False)
mats = materializations(result)
checks = check_evaluations(result)
evaluation = checks.get(f"bundle_{variant}:{CHECK_NAME}")
target = getattr(evaluation, "target_materialization_data", None) if evaluation else None
Path(out).write_text(json.dumps({
    "success": result.success,
    "failures": step_failures(result),
    "run_id": result.run_id,
    "bundle": mats.get(f"bundle_{variant}", {}),
    "replay": sorted(k for k in mats if k.startswith("replay_")),
    "check_passed": bool(evaluation and evaluation.passed),
    "check_bundle": str(evaluation.metadata["bundle"].value) if evaluation else None,
    "check_target_run_id": target.run_id if target else None,
}, default=str))
instance.dispose()
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::dagster.PreviewWarning"),
    pytest.mark.filterwarnings("ignore::dagster.BetaWarning"),
]


def test_two_concurrent_runs_of_two_instances_write_one_bundle_and_check_their_own(tmp_path: Path) -> None:
    shared = PipelineHome(tmp_path / "shared")  # data/ and models/ of both runs
    go = tmp_path / "go"
    procs, outs, readies, logs = [], [], [], []
    for i in range(2):
        outs.append(tmp_path / f"run{i}.json")
        readies.append(tmp_path / f"ready{i}")
        logs.append(tmp_path / f"run{i}.log")
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", RUN_WORKER, str(shared.root), str(tmp_path / f"dagster_home{i}"), VARIANT,
                 str(outs[i]), str(readies[i]), str(go)],
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
            ))
    try:
        deadline = time.monotonic() + 300
        while not all(r.exists() for r in readies):  # both imported: start them at the same moment
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker did not start"
            time.sleep(0.05)
        go.touch()
        for p in procs:
            p.wait(timeout=900)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = "\n".join(log.read_text()[-4000:] for log in logs)
    assert [p.returncode for p in procs] == [0, 0], tails
    runs = [json.loads(o.read_text()) for o in outs]
    assert all(r["success"] for r in runs), [r["failures"] for r in runs]

    # exactly one bundle, trained by one run and reused by the other
    bundles = list_bundles(shared.models_dir)
    assert len(bundles) == 1 and list_bundles(shared.models_dir, VARIANT) == bundles, bundles
    assert [r["bundle"]["bundle_path"] for r in runs] == [str(bundles[0])] * 2
    assert sorted(bool(r["bundle"]["already_complete"]) for r in runs) == [False, True], [r["bundle"] for r in runs]

    # each run's check verified the bundle its own run materialised, and passed; each run replayed it
    for r in runs:
        assert r["check_passed"] and r["check_bundle"] == r["bundle"]["bundle_path"], r
        assert r["check_target_run_id"] == r["run_id"], r
        assert r["replay"] == [f"replay_{VARIANT}"], r
    assert leftover_temp_files(shared.root) == []
