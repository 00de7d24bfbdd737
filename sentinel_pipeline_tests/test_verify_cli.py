"""The ``sentinel-verify`` CLI, run as a subprocess: exit codes, readable and JSON reports, records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sentinel_pipeline.training.engine import train
from sentinel_pipeline.verification import CHECK_NAMES, RECORD_NAME, require_verified
from sentinel_pipeline.verify import main
from sentinel_pipeline_tests.training_fixtures import (
    GATE_BARS,
    TrainingData,
    make_training_data,
    train_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    return make_training_data(tmp_path_factory.mktemp("data"), signal=1.0, n_bars=GATE_BARS)


@pytest.fixture(scope="module")
def trained(data: TrainingData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    config = train_config(data, out, model="mlp_two_head", epochs=3, batch_size=64, models_dir=out / "models")
    return train(config, progress=False).bundle_dir


@pytest.fixture()
def bundle(trained: Path, tmp_path: Path) -> Path:
    dst = tmp_path / trained.name
    shutil.copytree(trained, dst)
    return dst


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sentinel_pipeline.verify", *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_good_bundle_exits_0_with_a_readable_report(bundle: Path, data: TrainingData) -> None:
    proc = _cli("--bundle-dir", bundle, "--expected-hash", data.hash, "--val-h5", data.val_h5)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("bundle verification PASSED") and str(bundle) in lines[0]
    for name in CHECK_NAMES:
        assert any(line.split()[:2] == ["PASS", name] for line in lines), name
    assert not (bundle / RECORD_NAME).exists()  # no record unless asked for


def test_json_report_and_record(bundle: Path, data: TrainingData) -> None:
    proc = _cli("--bundle-dir", bundle, "--expected-hash", data.hash, "--json", "--write-record")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] is True and report["failed_checks"] == []
    assert [c["name"] for c in report["checks"]] == list(CHECK_NAMES)
    assert require_verified(bundle, expected_hash=data.hash)["manifest_digest"] == report["manifest_digest"]


def test_tampered_bundle_exits_1_naming_the_failed_check(bundle: Path, data: TrainingData) -> None:
    raw = bytearray((bundle / "model_best.pt").read_bytes())
    raw[100] ^= 0x01
    (bundle / "model_best.pt").write_bytes(bytes(raw))
    proc = _cli("--bundle-dir", bundle, "--expected-hash", data.hash, "--val-h5", data.val_h5)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stdout.splitlines()[0]
    fail_line = next(line for line in proc.stdout.splitlines() if line.split()[:2] == ["FAIL", "manifest"])
    assert "model_best.pt" in fail_line
    assert "failed checks: manifest" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "required"),
        (("--bundle-dir", "/nonexistent/bundle", "--expected-hash", "abc"), "not a directory"),
        (("--expected-hash", "abc"), "--bundle-dir"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...], message: str) -> None:
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and proc.stdout == ""


def test_missing_val_h5_exits_2(bundle: Path, data: TrainingData, tmp_path: Path) -> None:
    proc = _cli("--bundle-dir", bundle, "--expected-hash", data.hash, "--val-h5", tmp_path / "nope.h5")
    assert proc.returncode == 2 and "nope.h5" in proc.stderr


# in-process ``main()`` (the same code path; spares a torch import per case)


def test_gates_file_can_fail_a_good_bundle(
    bundle: Path, data: TrainingData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gates = tmp_path / "gates.yaml"
    gates.write_text("mlp_two_head:\n  min_directional_t: 1000.0\n")
    args = ["--bundle-dir", str(bundle), "--expected-hash", data.hash, "--val-h5", str(data.val_h5), "--json"]
    assert main([*args, "--gates", str(gates)]) == 1
    assert json.loads(capsys.readouterr().out)["failed_checks"] == ["quality_gates"]
    assert main(args) == 0


def test_bad_gates_file_exits_2(
    bundle: Path, data: TrainingData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gates = tmp_path / "gates.json"
    gates.write_text(json.dumps({"no_such_variant": {}}))
    with pytest.raises(SystemExit) as info:
        main(["--bundle-dir", str(bundle), "--expected-hash", data.hash, "--gates", str(gates)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown variants" in err and str(gates) in err
