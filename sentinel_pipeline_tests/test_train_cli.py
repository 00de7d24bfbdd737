"""The ``sentinel-train`` CLI: end to end in a subprocess, exit codes, config file + flag precedence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sentinel_pipeline import train as cli
from sentinel_pipeline.bundles import check_manifest, list_bundles
from sentinel_pipeline_tests.training_fixtures import TrainingData, make_training_data

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    return make_training_data(tmp_path_factory.mktemp("data"), signal=1.0)


def _flags(data: TrainingData, out_dir: Path, *extra: str) -> list[str]:
    return ["--train-h5", str(data.train_h5), "--val-h5", str(data.val_h5), "--feature-schema", str(data.schema),
            "--out-dir", str(out_dir), "--seq-len", str(data.contract.seq_len), "--threads", "1",
            "--device", "cpu", "--no-progress", *extra]


def test_cli_end_to_end_in_a_subprocess(data: TrainingData, tmp_path: Path) -> None:
    out, models = tmp_path / "run", tmp_path / "models"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "sentinel_pipeline.train",
         *_flags(data, out, "--limit-samples", "96", "--epochs", "1", "--models-dir", str(models))],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    for name in ("model_best.pt", "resume.pt", "metrics.json", "loss_curve.png", "train_log.txt"):
        assert (out / name).is_file(), name
    [bundle] = list_bundles(models)
    assert summary["bundle_dir"] == str(bundle) and check_manifest(bundle) == []
    assert json.loads((out / "metrics.json").read_text())["dataset"]["train"]["samples_used"] == 96
    assert "epoch 1/1" in proc.stderr and "epoch 1/1" in (out / "train_log.txt").read_text()


def test_config_file_with_flag_override(data: TrainingData, tmp_path: Path) -> None:
    cfg = tmp_path / "train.yaml"
    cfg.write_text("epochs: 3\nlearning_rate: 0.005\nlimit_samples: 64\nmodel: mlp_two_head\n"
                   "arch:\n  hidden_dim: 24\n")
    assert cli.main(["--config", str(cfg), *_flags(data, tmp_path / "run", "--epochs", "1")]) == 0
    written = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert written["epochs"] == 1  # the flag wins
    assert written["learning_rate"] == 0.005 and written["arch"]["hidden_dim"] == 24  # the file wins over defaults
    assert written["limit_samples"] == 64
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]) == 1


@pytest.mark.parametrize(("flag", "expected"), [([], False), (["--shuffle"], True), (["--no-shuffle"], False)])
def test_shuffle_flag(data: TrainingData, tmp_path: Path, flag: list[str], expected: bool) -> None:
    """Safe profile: temporal order unless ``--shuffle``; the resolved setting is what was trained."""
    assert cli.main(_flags(data, tmp_path / "run", "--limit-samples", "32", "--epochs", "1", *flag)) == 0
    written = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert written["resolved"]["shuffle"] is expected


def test_rerun_of_a_complete_run_reports_it(data: TrainingData, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flags = _flags(data, tmp_path / "run", "--limit-samples", "32", "--epochs", "1")
    assert cli.main(flags) == 0
    capsys.readouterr()
    assert cli.main(flags) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["already_complete"] is True and "already complete" in captured.err


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--learning-rate", "1e30"], 1, "diverged"),
        (["--expected-hash", "0000000000000000"], 2, "0000000000000000"),
        (["--model", "no_such_model"], 2, "no_such_model"),
        (["--epochs", "0"], 2, "epochs"),
        (["--seq-len", "50"], 2, "seq_len 50"),
    ],
)
def test_exit_codes(data: TrainingData, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str],
                    code: int, message: str) -> None:
    assert cli.main(_flags(data, tmp_path / "run", "--limit-samples", "64", "--epochs", "1", *extra)) == code
    assert message in capsys.readouterr().err


def test_missing_required_flag_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--val-h5", "v.h5", "--feature-schema", "s.txt", "--out-dir", str(tmp_path)]) == 2
    assert "train_h5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["--scheduler", "bogus"])
    assert exc.value.code == 2
