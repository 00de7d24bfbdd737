"""The bundle trust boundary (issue 9, security items 1-3): an attacker who can write ``models/`` can
recompute every sha256, so trust comes from a signature by a key outside the bundle, nothing in the
trust path unpickles, verification recomputes what it can, and symlinks, special files, extra files
and look-alike records are refused everywhere.

Every tampering below recomputes the manifest, as the attacker of the issue did. Three levels:
unsigned (the old signature no longer matches), signed by the attacker's own key (not trusted), and
re-signed with the trusted training key (the worst case: proves the later checks on their own, and
that a planted file reaching the loaders still runs nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sentinel_pipeline import signing
from sentinel_pipeline.bundles import (
    BUNDLE_FILES,
    RECORD_FILES,
    BundleError,
    build_manifest,
    load_bundle,
    records_dir,
    sha256_file,
    write_record,
)
from sentinel_pipeline.evaluation.backtest import BacktestConfig
from sentinel_pipeline.evaluation.backtest_stage import run_backtest_stage
from sentinel_pipeline.training.checkpoints import load_best, save_best
from sentinel_pipeline.training.engine import train
from sentinel_pipeline.verification import (
    CHECK_NAMES,
    BundleNotVerifiedError,
    VerificationReport,
    require_verified,
    verify_bundle,
    write_verification_record,
)
from sentinel_pipeline_tests.bundle_tamper import (
    malicious_pickle,
    plant_pickles_in_scalers_and_records,
    resign,
    rewrite_manifest,
    sign_untrusted,
)
from sentinel_pipeline_tests.training_fixtures import (
    GATE_BARS,
    TrainingData,
    make_training_data,
    train_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ALL_NAMES = (*BUNDLE_FILES, "model.onnx", "manifest.json", "manifest.sig")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    return make_training_data(tmp_path_factory.mktemp("data"), signal=1.0, n_bars=GATE_BARS)


@pytest.fixture(scope="module")
def other_data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    """Another dataset with the same feature contract (other seed): its scalers fit the contract."""
    return make_training_data(tmp_path_factory.mktemp("other"), signal=1.0, n_bars=GATE_BARS, seed=5)


@pytest.fixture(scope="module")
def trained(data: TrainingData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    config = train_config(data, out / "mlp", model="mlp_two_head", epochs=3, batch_size=64, models_dir=out / "models")
    return train(config, progress=False).bundle_dir


@pytest.fixture()
def bundle(trained: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "models" / trained.name
    shutil.copytree(trained, dst)
    return dst


def _verify(bundle: Path, data: TrainingData, **kwargs) -> VerificationReport:
    return verify_bundle(bundle, data.hash, val_h5=data.val_h5, **kwargs)


def _first_failure(report: VerificationReport) -> str:
    assert not report.passed, report.render()
    return report.failed_checks[0]


def _manifest_over(bundle: Path) -> None:
    """Recompute the manifest following symlinks (what a naive tool would do)."""
    files = {}
    for p in sorted(bundle.iterdir()):
        if p.name in ("manifest.json", "manifest.sig", "records"):
            continue
        raw = p.read_bytes()
        files[p.name] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    (bundle / "manifest.json").write_text(json.dumps({"algorithm": "sha256", "files": files}))


# -- the good bundle and the keys ------------------------------------------------------------------


def test_good_bundle_is_signed_and_verifies(bundle: Path, data: TrainingData) -> None:
    report = _verify(bundle, data, scalers_dir=data.scalers_dir)
    assert report.passed, report.render()
    assert report.checks[0].name == "signature" and "trusted key" in report.checks[0].detail
    assert "reproduces metrics.json" in report.check("metrics_reproduced").detail
    assert "same parameters as" in report.check("scalers_load").detail


def test_metrics_of_a_class_weighted_classifier_are_reproduced(
    data: TrainingData, tmp_path: Path
) -> None:
    """The focal loss averages by the batch's class weights, so the validation loss depends on the
    batching: verification batches the split as training did (``settings.eval_batch_size``)."""
    config = train_config(data, tmp_path / "tbm", model="transformer_tbm", epochs=2, batch_size=64,
                          models_dir=tmp_path / "models")
    result = train(config, progress=False)
    assert json.loads((result.bundle_dir / "metrics.json").read_text())["settings"]["eval_batch_size"] == 256
    report = _verify(result.bundle_dir, data)
    assert report.check("metrics_reproduced").passed, report.check("metrics_reproduced").detail
    # batched otherwise, the same model gives another mean loss: the recorded batching is what counts
    bundle = result.bundle_dir
    metrics = json.loads((bundle / "metrics.json").read_text())
    metrics["settings"]["eval_batch_size"] = 7
    (bundle / "metrics.json").write_text(json.dumps(metrics))
    rewrite_manifest(bundle)
    resign(bundle)
    detail = _verify(bundle, data).check("metrics_reproduced").detail
    assert "validation loss" in detail and "accuracy" not in detail, detail


def test_signing_key_is_generated_on_first_use_private_and_trusted(tmp_path: Path) -> None:
    key_path, trusted = tmp_path / "keys" / "signing_key.pem", tmp_path / "trusted"
    key = signing.load_signing_key(key_path, trusted_dir=trusted)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert list(signing.trusted_keys(trusted)) == [signing.key_id(key.public_key())]
    again = signing.load_signing_key(key_path, trusted_dir=trusted)  # the same key, not a new one
    assert signing.key_id(again.public_key()) == signing.key_id(key.public_key())
    key_path.chmod(0o644)
    with pytest.raises(signing.SignatureError, match="chmod 600"):
        signing.load_signing_key(key_path)
    link = tmp_path / "link.pem"
    link.symlink_to(key_path)
    with pytest.raises(signing.SignatureError, match="not a regular file"):
        signing.load_signing_key(link)
    with pytest.raises(signing.SignatureError, match="no signing key"):
        signing.load_signing_key(tmp_path / "absent.pem", create=False)


def test_key_locations_come_from_the_environment_not_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # conftest points both at a temporary directory; without the variables: the user's config directory
    assert signing.signing_key_path() == Path(os.environ["SENTINEL_SIGNING_KEY"])
    monkeypatch.delenv("SENTINEL_SIGNING_KEY")
    monkeypatch.delenv("SENTINEL_TRUSTED_KEYS")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert signing.signing_key_path() == tmp_path / "sentinel-pipeline" / "signing_key.pem"
    assert signing.trusted_keys_dir() == tmp_path / "sentinel-pipeline" / "trusted_keys"


# -- item 2: the three reproduced cases, each with the manifest recomputed -------------------------


def _rewrite_weights(bundle: Path, data: TrainingData) -> None:
    ckpt = load_best(bundle / "model_best.pt")
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in ckpt["model_state_dict"].items()}
    save_best(bundle / "model_best.pt", state, ckpt["arch"], ckpt["epoch"], ckpt["val_loss"])


def _other_datasets_scaler(other: TrainingData) -> Callable[[Path, TrainingData], None]:
    def swap(bundle: Path, data: TrainingData) -> None:
        for name in ("scalers.json", "seq_scaler.joblib", "snap_scaler.joblib"):
            shutil.copyfile(other.scalers_dir / name, bundle / name)
        meta = json.loads((bundle / "bundle_metadata.json").read_text())  # digests updated too
        meta["data_half_scalers"]["sha256"] = {n: sha256_file(bundle / n) for n in meta["data_half_scalers"]["sha256"]}
        (bundle / "bundle_metadata.json").write_text(json.dumps(meta))
    return swap


def _better_metrics(bundle: Path, data: TrainingData) -> None:
    metrics = json.loads((bundle / "metrics.json").read_text())
    for head in metrics["final_val"]["heads"].values():
        head["mse"] *= 0.5
        head["rank_ic"] = min(1.0, head["rank_ic"] + 0.2)
    (bundle / "metrics.json").write_text(json.dumps(metrics))


@pytest.mark.parametrize("case", ["rewritten_weights", "other_datasets_scaler", "better_metrics"])
def test_reproduced_tamperings_are_refused_at_every_signing_level(
    case: str, bundle: Path, data: TrainingData, other_data: TrainingData, tmp_path: Path
) -> None:
    assert other_data.hash == data.hash  # same contract: the scaler fits, only its parameters differ
    tamper = {"rewritten_weights": _rewrite_weights, "other_datasets_scaler": _other_datasets_scaler(other_data),
              "better_metrics": _better_metrics}[case]
    tamper(bundle, data)
    rewrite_manifest(bundle)
    # 1. manifest recomputed, old signature kept: refused by the signature, nothing else is read
    report = _verify(bundle, data, scalers_dir=data.scalers_dir)
    assert _first_failure(report) == "signature" and "does not match" in report.check("signature").detail
    assert all(report.check(n).detail.startswith("skipped") for n in CHECK_NAMES[2:])
    with pytest.raises(BundleError, match="signature"):
        load_bundle(bundle, data.hash)
    # 2. signed with the attacker's own key: not trusted
    sign_untrusted(bundle, tmp_path / "attacker" / "key.pem")
    report = _verify(bundle, data, scalers_dir=data.scalers_dir)
    assert _first_failure(report) == "signature" and "not among the trusted keys" in report.check("signature").detail
    with pytest.raises(BundleError, match="not among the trusted keys"):
        load_bundle(bundle, data.hash)
    # 3. re-signed with the trusted key: verification's own recomputation refuses it
    resign(bundle)
    report = _verify(bundle, data, scalers_dir=data.scalers_dir)
    expected = {"rewritten_weights": "metrics_reproduced", "other_datasets_scaler": "scalers_load",
                "better_metrics": "metrics_reproduced"}[case]
    assert _first_failure(report) == expected, report.render()
    if case == "other_datasets_scaler":
        assert "not the data half's" in report.check(expected).detail and "center differs" in report.check(expected).detail
    else:
        assert "is not what the bundle's model gives" in report.check(expected).detail


def test_an_unsigned_old_bundle_is_refused_with_how_to_resign_or_retrain(bundle: Path, data: TrainingData) -> None:
    (bundle / "manifest.sig").unlink()
    report = _verify(bundle, data)
    detail = report.check("signature").detail
    assert _first_failure(report) == "signature"
    assert "not signed" in detail and "sentinel_pipeline.sign sign --bundle-dir" in detail and "retrain" in detail
    with pytest.raises(BundleError, match="not signed"):
        load_bundle(bundle, data.hash)
    with pytest.raises(BundleNotVerifiedError, match="not signed"):
        require_verified(bundle)
    # the documented way back for a bundle one trusts: re-sign it (its files must still match)
    proc = subprocess.run([sys.executable, "-m", "sentinel_pipeline.sign", "sign", "--bundle-dir", str(bundle)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert _verify(bundle, data).passed
    # ... and it refuses to sign a bundle whose files no longer match their manifest
    (bundle / "manifest.sig").unlink()
    (bundle / "train_log.txt").write_text("edited")
    proc = subprocess.run([sys.executable, "-m", "sentinel_pipeline.sign", "sign", "--bundle-dir", str(bundle)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and "train_log.txt" in proc.stderr and not (bundle / "manifest.sig").exists()


# -- item 1: a malicious pickle under every bundle file name runs nothing --------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_malicious_pickle_under_every_file_name_runs_nothing(
    name: str, bundle: Path, data: TrainingData, tmp_path: Path
) -> None:
    marker = tmp_path / f"pwned-{name}"
    (bundle / name).write_bytes(malicious_pickle(marker))
    if name not in ("manifest.json", "manifest.sig"):
        rewrite_manifest(bundle)
    # forged but unsigned: refused before anything is read
    report = _verify(bundle, data, scalers_dir=data.scalers_dir)
    assert not report.passed and not report.check("signature").passed
    with pytest.raises(BundleError):
        load_bundle(bundle, data.hash)
    with pytest.raises(BundleNotVerifiedError):
        require_verified(bundle)
    assert not marker.exists()
    if name == "manifest.sig":
        return  # re-signing would replace the planted file
    # the worst case: the planted file re-signed with the trusted key reaches the loaders
    resign(bundle)
    report = _verify(bundle, data, scalers_dir=data.scalers_dir)
    try:
        loaded = load_bundle(bundle, data.hash)
    except BundleError:
        loaded = None
    if report.passed:
        write_verification_record(bundle, report)
        require_verified(bundle, data.hash)
    assert not marker.exists(), f"code ran while reading a planted {name}"
    if name.endswith(".joblib"):
        # user copies: the only trace is that they are not the data half's files recorded at bundle time
        assert _first_failure(report) == "scalers_load" and name in report.check("scalers_load").detail
        assert loaded is not None  # loading never opens them
    elif name in ("loss_curve.png", "train_log.txt"):
        assert loaded is not None  # never parsed by anything: signed bytes, whatever they are
    elif name == "model.onnx":
        # parsed as ONNX only (never unpickled): not a model, so the parity check and runtime onnx refuse it
        assert _first_failure(report) == "onnx_parity" and "not a readable ONNX model" in report.check(
            "onnx_parity").detail
        assert loaded is not None  # the torch runtime never opens it
        with pytest.raises(BundleError, match="not a readable ONNX model"):
            load_bundle(bundle, data.hash, runtime="onnx")
        assert not marker.exists()
    else:  # every parsed file refuses the pickle as data (JSON, text, weights_only torch.load)
        assert not report.passed and loaded is None


def test_malicious_pickles_through_the_cli_and_the_backtest(
    bundle: Path, data: TrainingData, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    plant_pickles_in_scalers_and_records(bundle, marker)

    def cli() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sentinel_pipeline.verify", "--bundle-dir", str(bundle), "--expected-hash",
             data.hash, "--val-h5", str(data.val_h5), "--json"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)

    proc = cli()  # forged, unsigned
    assert proc.returncode == 1 and json.loads(proc.stdout)["failed_checks"][0] == "signature"
    assert not marker.exists()
    resign(bundle)  # planted files signed by the trusted key: verification reads everything, runs nothing
    proc = cli()
    assert proc.returncode in (0, 1), proc.stderr
    assert "signature" not in json.loads(proc.stdout)["failed_checks"]
    assert not marker.exists()
    report = _verify(bundle, data)
    with pytest.raises(BundleNotVerifiedError, match="unreadable signature record|unreadable verification record"):
        require_verified(bundle)  # the planted records are listed, but they are not JSON (and never unpickled)
    if report.passed:  # with a genuine record: the backtest loads the bundle (never the joblib files)
        write_verification_record(bundle, report)
        try:
            run_backtest_stage(bundle, data.hash, data.test_h5, data.val_h5, tmp_path / "bt",
                               BacktestConfig(n_random=1000, min_days=1, min_trades=1),
                               scalers_dir=data.scalers_dir)
        except ValueError:
            pass  # refusals (window, scalers) are fine: what matters is what ran
    assert not marker.exists()


# -- item 3 (issue's 3): symlinks, special files, extra files, look-alike records -------------------


def test_symlink_to_etc_passwd_is_refused(bundle: Path, data: TrainingData) -> None:
    (bundle / "train_log.txt").unlink()
    (bundle / "train_log.txt").symlink_to("/etc/passwd")
    _manifest_over(bundle)
    resign(bundle)
    report = _verify(bundle, data)
    assert _first_failure(report) == "files_present" and "train_log.txt: a symlink" in report.check("files_present").detail
    with pytest.raises(BundleError, match="train_log.txt: a symlink"):
        load_bundle(bundle, data.hash)


def test_symlink_to_another_datasets_scaler_is_refused(
    bundle: Path, data: TrainingData, other_data: TrainingData
) -> None:
    for name in ("scalers.json", "seq_scaler.joblib", "snap_scaler.joblib"):
        (bundle / name).unlink()
        (bundle / name).symlink_to(other_data.scalers_dir / name)
    _manifest_over(bundle)
    resign(bundle)
    report = _verify(bundle, data)
    assert _first_failure(report) == "files_present" and "scalers.json: a symlink" in report.check("files_present").detail
    with pytest.raises(BundleError, match="scalers.json: a symlink"):
        load_bundle(bundle, data.hash)
    with pytest.raises(BundleNotVerifiedError, match="symlink"):
        require_verified(bundle)


def test_a_symlinked_bundle_directory_and_special_files_are_refused(
    bundle: Path, data: TrainingData, tmp_path: Path
) -> None:
    link = tmp_path / "models" / (bundle.name + "__2")
    link.symlink_to(bundle)
    with pytest.raises(BundleError, match="not a directory"):
        load_bundle(link, data.hash)
    assert not _verify(link, data).check("files_present").passed
    (bundle / "loss_curve.png").unlink()
    os.mkfifo(bundle / "loss_curve.png")  # a reader that followed it would block forever
    report = _verify(bundle, data)
    assert _first_failure(report) == "files_present" and "loss_curve.png: a special file" in report.check("files_present").detail
    with pytest.raises(BundleError, match="loss_curve.png: a special file"):
        load_bundle(bundle, data.hash)


def test_load_bundle_refuses_an_extra_file_as_verify_does(bundle: Path, data: TrainingData) -> None:
    (bundle / "notes.txt").write_text("hello")
    with pytest.raises(BundleError, match="notes.txt: unexpected"):
        load_bundle(bundle, data.hash)
    assert "notes.txt: unexpected" in _verify(bundle, data).check("files_present").detail
    # listing it in a re-signed manifest does not make it a bundle file either
    (bundle / "manifest.json").write_text(json.dumps(build_manifest(bundle)))
    resign(bundle)
    with pytest.raises(BundleError, match="notes.txt"):
        load_bundle(bundle, data.hash)


@pytest.mark.parametrize("name", RECORD_FILES)
def test_a_file_named_like_a_record_is_not_exempt(name: str, bundle: Path, data: TrainingData) -> None:
    """Outside records/ it is an unexpected file; inside, it must be in the records' own manifest."""
    (bundle / name).write_text('{"passed": true}')
    report = _verify(bundle, data)
    assert _first_failure(report) == "files_present" and f"{name}: unexpected" in report.check("files_present").detail
    with pytest.raises(BundleError, match=f"{name}: unexpected"):
        load_bundle(bundle, data.hash)
    (bundle / name).unlink()
    records_dir(bundle).mkdir()
    (records_dir(bundle) / name).write_text('{"passed": true}')  # no records manifest
    report = _verify(bundle, data)
    assert _first_failure(report) == "manifest" and "records/manifest.json" in report.check("manifest").detail
    with pytest.raises(BundleError, match="records/manifest.json"):
        load_bundle(bundle, data.hash)
    write_record(bundle, name, b'{"passed": true}')  # listed properly: a record, never part of the model
    assert _verify(bundle, data).passed
    (records_dir(bundle) / name).write_text('{"passed": true, "forged": 1}')  # changed after listing
    report = _verify(bundle, data)
    assert _first_failure(report) == "manifest" and f"records/{name}: sha256/size differ" in report.check("manifest").detail
    with pytest.raises(BundleError, match=f"records/{name}"):
        load_bundle(bundle, data.hash)
    (records_dir(bundle) / "replay_trades.parquet").write_bytes(b"x")  # an unknown record name
    with pytest.raises(BundleError, match="records/replay_trades.parquet: unexpected"):
        load_bundle(bundle, data.hash)


def test_records_of_another_bundle_are_refused(bundle: Path, trained: Path, data: TrainingData) -> None:
    report = _verify(trained, data)
    write_verification_record(trained, report)
    require_verified(trained)
    shutil.copytree(records_dir(trained), records_dir(bundle))
    require_verified(bundle)  # a copy of the same bundle: same manifest, the records belong to it
    _rewrite_weights(bundle, data)
    rewrite_manifest(bundle)
    resign(bundle)
    with pytest.raises(BundleNotVerifiedError, match="records/manifest.json belongs to bundle manifest"):
        require_verified(bundle)
    shutil.rmtree(records_dir(trained))


def test_a_forged_verification_record_is_refused_without_the_event_log(bundle: Path, data: TrainingData) -> None:
    """Plain Python (no Dagster event log) trusts a verification record only when a trusted key signed it:
    whoever can write ``models/`` can write a passing record for a bundle that failed its gates, but not
    sign it."""
    failing = _verify(bundle, data, gates={"mlp_two_head": {"min_directional_t": 1e9}})
    assert not failing.passed and "quality_gates" in failing.failed_checks
    write_verification_record(bundle, failing)  # signed with the trusted key: an honest failure
    assert (records_dir(bundle) / "verification.sig").is_file()
    with pytest.raises(BundleNotVerifiedError, match="failed verification"):
        require_verified(bundle)

    forged = json.loads((records_dir(bundle) / "verification.json").read_text())
    forged.update(passed=True, failed_checks=[], checks=[{**c, "passed": True} for c in forged["checks"]])
    forged_bytes = json.dumps(forged).encode()
    write_record(bundle, "verification.json", forged_bytes)  # the old signature no longer matches
    with pytest.raises(BundleNotVerifiedError, match="signature does not match"):
        require_verified(bundle)

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    attacker_key = Ed25519PrivateKey.generate()
    write_record(bundle, "verification.sig", signing.sign_bytes(forged_bytes, attacker_key))
    with pytest.raises(BundleNotVerifiedError, match="not among the trusted keys"):
        require_verified(bundle)

    (records_dir(bundle) / "verification.sig").unlink()
    write_record(bundle, "verification.json", forged_bytes)  # relists the records without the signature
    with pytest.raises(BundleNotVerifiedError, match="not signed"):
        require_verified(bundle)

    # the trusted side's honest pass is accepted
    passing = _verify(bundle, data)
    assert passing.passed, passing.render()
    write_verification_record(bundle, passing)
    assert require_verified(bundle)["passed"] is True


def test_the_summary_says_pass_only_for_a_record_that_still_holds(
    bundle: Path, data: TrainingData, tmp_path: Path
) -> None:
    from sentinel_pipeline.paths import ArtifactPaths
    from sentinel_pipeline.summary import summarise

    paths = ArtifactPaths(data_dir=tmp_path / "no-data", models_dir=bundle.parent)
    report = _verify(bundle, data)
    assert report.passed, report.render()
    write_verification_record(bundle, report)
    line = next(x for x in summarise(paths) if bundle.name in x)
    assert "verified: PASS" in line
    record = json.loads((records_dir(bundle) / "verification.json").read_text())
    record["gate_results"] = []  # edited by someone without the key
    write_record(bundle, "verification.json", json.dumps(record).encode())
    line = next(x for x in summarise(paths) if bundle.name in x)
    assert "verification record REFUSED" in line and "signature does not match" in line
