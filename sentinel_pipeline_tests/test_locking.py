"""File locks: exclusive and shared, timeouts naming the holder, release when the holder dies, and
``train()`` under its run directory's lock (two processes on one run directory: one trains, one reuses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sentinel_pipeline import atomic_io
from sentinel_pipeline.bundles import list_bundles
from sentinel_pipeline.locking import (
    LockTimeout,
    bundle_lock,
    bundle_lock_path,
    file_lock,
    run_dir_lock,
)
from sentinel_pipeline.training.engine import completed_run_if_idle, train
from sentinel_pipeline_tests.training_fixtures import TrainingData, make_training_data, train_config

REPO_ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from pathlib import Path
from sentinel_pipeline.locking import file_lock
path, shared, ready = sys.argv[1], sys.argv[2] == "shared", Path(sys.argv[3])
with file_lock(path, shared=shared):
    ready.touch()
    time.sleep(120)
"""
# one training process: waits for GO, trains the run directory, writes what train() returned
TRAIN_WORKER = """
import json, logging, sys, time
from pathlib import Path
from sentinel_pipeline.training.config import TrainConfig
from sentinel_pipeline.training.engine import train
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
config, out, ready, go = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
ready.touch()
while not go.exists():
    time.sleep(0.01)
result = train(TrainConfig(**config), progress=False, on_epoch_end=lambda record: time.sleep(1.0))
out.write_text(json.dumps({"already_complete": result.already_complete, "bundle": str(result.bundle_dir),
                           "run_id": result.metrics["run_id"], "epochs": len(result.history)}))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def _hold(path: Path, tmp_path: Path, shared: bool = False) -> subprocess.Popen:
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "shared" if shared else "exclusive", str(ready)],
                            cwd=REPO_ROOT, env=_env())
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
        time.sleep(0.02)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_exclusive_lock_times_out_naming_the_holder_pid(tmp_path: Path) -> None:
    path = tmp_path / "stage" / ".pipeline.lock"
    holder = _hold(path, tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockTimeout, match=rf"exclusive lock on .*within 0s: held by pid {holder.pid} on "):
            with file_lock(path, timeout_s=0.3):
                pass
        assert 0.3 <= time.monotonic() - t0 < 5
        with pytest.raises(LockTimeout, match=rf"shared lock .*pid {holder.pid} .*\(exclusive\)"):
            with file_lock(path, shared=True, timeout_s=0):
                pass
    finally:
        _stop(holder)


def test_a_killed_holder_releases_its_lock(tmp_path: Path) -> None:
    path = tmp_path / ".run.lock"
    holder = _hold(path, tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with file_lock(path, timeout_s=10):
        pass


def test_shared_locks_coexist_and_keep_the_exclusive_one_out(tmp_path: Path) -> None:
    path = tmp_path / "b.lock"
    reader = _hold(path, tmp_path, shared=True)
    try:
        with file_lock(path, shared=True, timeout_s=0):  # a second reader gets in at once
            with pytest.raises(LockTimeout, match=rf"pid {reader.pid} on .*\(shared\)"):
                with file_lock(path, timeout_s=0.2):
                    pass
    finally:
        _stop(reader)
    with file_lock(path, timeout_s=5):  # the readers are gone
        with pytest.raises(LockTimeout, match=rf"pid {os.getpid()} .*\(exclusive\)"):
            with file_lock(path, shared=True, timeout_s=0):
                pass


def test_bundle_locks_live_outside_the_bundle(tmp_path: Path) -> None:
    models = tmp_path / "models"
    bundle = models / "mlp_two_head__20260101T000000Z__abcdef"
    bundle.mkdir(parents=True)
    (bundle / "manifest.json").write_text("{}")
    with bundle_lock(bundle) as path:
        assert path == bundle_lock_path(models, bundle.name) == models / ".locks" / f"{bundle.name}.lock"
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json"]
    assert list_bundles(models) == [bundle]  # .locks is not taken for a bundle
    with pytest.raises(ValueError):
        bundle_lock_path(models, "../x")


# -- train() under the run directory's lock ------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    return make_training_data(tmp_path_factory.mktemp("data"), signal=1.5)


def test_two_processes_on_one_run_directory_train_once(data: TrainingData, tmp_path: Path) -> None:
    """Both start at the same moment: one takes the lock and trains, the other waits, then finds the
    run complete with its bundle and reuses it. One bundle, one run id."""
    models, run = tmp_path / "models", tmp_path / "run"
    config = train_config(data, run, limit_samples=120, epochs=2, models_dir=models).to_dict()
    go = tmp_path / "go"
    procs, outs, readies = [], [], []
    for i in range(2):
        outs.append(tmp_path / f"result{i}.json")
        readies.append(tmp_path / f"ready{i}")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", TRAIN_WORKER, json.dumps(config, default=str), str(outs[i]), str(readies[i]),
             str(go)],
            cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    try:
        deadline = time.monotonic() + 180
        while not all(r.exists() for r in readies):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker did not start"
            time.sleep(0.02)
        go.touch()
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            _stop(p)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    results = [json.loads(o.read_text()) for o in outs]
    assert sorted(r["already_complete"] for r in results) == [False, True], results
    assert results[0]["bundle"] == results[1]["bundle"] and results[0]["run_id"] == results[1]["run_id"]
    assert [str(p) for p in list_bundles(models)] == [results[0]["bundle"]]
    waiter = logs[[r["already_complete"] for r in results].index(True)]
    assert "waiting for the exclusive lock on training run" in waiter, waiter[-3000:]
    assert "already complete" in waiter


def test_completed_run_fast_path_skips_a_run_being_trained(data: TrainingData, tmp_path: Path) -> None:
    models, run = tmp_path / "models", tmp_path / "run"
    assert completed_run_if_idle(run, models) is None  # nothing there
    result = train(train_config(data, run, limit_samples=120, epochs=1, models_dir=models), progress=False)
    done = completed_run_if_idle(run, models)
    assert done is not None and done.bundle_dir == result.bundle_dir
    holder = _hold(run / ".run.lock", tmp_path)  # another train() on the run directory
    try:
        assert completed_run_if_idle(run, models) is None
    finally:
        _stop(holder)
    with run_dir_lock(run, shared=True, timeout_s=0):  # readers do not block each other
        assert completed_run_if_idle(run, models) is not None


def test_train_sweeps_dead_writers_leftovers_but_not_live_ones(data: TrainingData, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = atomic_io._host_tag()
    models, run = tmp_path / "models", tmp_path / "run"
    models.mkdir()
    run.mkdir()
    dead_bundle = models / f".mlp_two_head__20260101T000000Z__abc.tmp-{proc.pid}-{host}-0123abcd"
    dead_bundle.mkdir()
    (dead_bundle / "model_best.pt").write_bytes(b"half")
    dead_ckpt = run / f".resume.pt.tmp-{proc.pid}-{host}-0123abcd"
    dead_ckpt.write_bytes(b"half")
    live = models / f".other.tmp-{os.getpid()}-{host}-0123abcd"
    live.write_text("being written")
    result = train(train_config(data, run, limit_samples=120, epochs=1, models_dir=models), progress=False)
    assert result.bundle_dir is not None and result.bundle_dir.is_dir()
    assert not dead_bundle.exists() and not dead_ckpt.exists()
    assert live.exists()
