"""``model_final.zip``: packaging a trusted bundle (deterministic, manifest-driven, refused when the bundle
is not trusted) and reading an archive back (the unpacking rules, each tried with a hand-crafted
malicious archive; verification of an archive as of a directory)."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest

from sentinel_pipeline import bundle_archive
from sentinel_pipeline.bundle_archive import (
    ArchiveError,
    ArchiveLimits,
    inspect_archive,
    unpack_archive,
    unpacked_bundle,
)
from sentinel_pipeline.bundles import (
    BUNDLE_FILES,
    METADATA_NAME,
    build_manifest,
    trusted_bundle_problems,
    write_record,
)
from sentinel_pipeline.package import (
    ARCHIVE_NAME,
    PackageError,
    default_archive_path,
    package_bundle,
)
from sentinel_pipeline.signing import MANIFEST_NAME, SIGNATURE_NAME, load_signing_key, sign_manifest
from sentinel_pipeline.training.engine import train
from sentinel_pipeline.training.families import FAMILIES
from sentinel_pipeline.verification import CHECK_NAMES, verify_bundle
from sentinel_pipeline_tests.bundle_tamper import rewrite_manifest, sign_untrusted
from sentinel_pipeline_tests.training_fixtures import (
    GATE_BARS,
    TrainingData,
    make_training_data,
    train_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_NAME = "mlp_two_head__20240102T000000Z__0123456789abcdef"


# -- a signed bundle without training (the trust checks read names, types, digests and the metadata) --


def fake_bundle(root: Path, family: str = "window_models", name: str = BUNDLE_NAME) -> Path:
    """A bundle directory signed by the trusted test key: every bundle file (random-ish bytes), the
    family's extra files, a metadata naming the family. Passes ``trusted_bundle_problems``."""
    fam = FAMILIES[family]
    bundle = root / name
    bundle.mkdir(parents=True)
    rng = __import__("random").Random(0)
    for i, fname in enumerate((*BUNDLE_FILES, *fam.bundle_file_names)):
        size = 200_000 if fname == "model_best.pt" else 500 + 37 * i
        (bundle / fname).write_bytes(bytes(rng.getrandbits(8) for _ in range(size)))
    meta = {"bundle_format_version": 2, "model_family": fam.name, "model_variant": fam.variants[0].name,
            "batch_kind": fam.batch_kind}
    (bundle / METADATA_NAME).write_text(json.dumps(meta))
    (bundle / MANIFEST_NAME).write_text(json.dumps(build_manifest(bundle)))
    sign_manifest(bundle, load_signing_key())
    assert trusted_bundle_problems(bundle) == []
    return bundle


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return fake_bundle(tmp_path / "models")


@pytest.fixture()
def archive(bundle: Path) -> Path:
    return package_bundle(bundle).path


def manifest_files(bundle: Path) -> list[str]:
    return sorted(json.loads((bundle / MANIFEST_NAME).read_text())["files"])


# -- packaging -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_archive_holds_the_manifest_its_signature_and_every_listed_file(tmp_path: Path, family: str) -> None:
    bundle = fake_bundle(tmp_path / "models", family)
    write_record(bundle, "replay_report.json", b"{}")  # records are not signed: they stay behind
    result = package_bundle(bundle)
    assert result.path == default_archive_path(bundle) == bundle.parent / "archives" / bundle.name / ARCHIVE_NAME
    expected = [MANIFEST_NAME, SIGNATURE_NAME, *manifest_files(bundle)]
    assert list(result.members) == expected
    assert set(FAMILIES[family].bundle_file_names) <= set(result.members)  # e.g. the graph family's files
    with zipfile.ZipFile(result.path) as zf:
        assert zf.namelist() == expected
        for name in expected:
            assert zf.read(name) == (bundle / name).read_bytes(), name
        for info in zf.infolist():
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.external_attr >> 16 == 0o100644
        assert zf.comment.decode() == bundle.name
    assert result.size == result.path.stat().st_size
    assert not any(p.name.startswith(".") for p in result.path.parent.iterdir())  # no temp left behind


def test_an_added_manifest_file_travels_without_a_change_to_the_packager(tmp_path: Path, monkeypatch) -> None:
    """Driven by the manifest: a file a later format lists (here ``model.onnx``) is shipped."""
    import sentinel_pipeline.bundles as bundles

    bundle = fake_bundle(tmp_path / "models")
    monkeypatch.setattr(bundles, "BUNDLE_FILES", (*bundles.BUNDLE_FILES, "model.onnx"))
    monkeypatch.setattr(bundles, "REQUIRED_FILES", (*bundles.REQUIRED_FILES, "model.onnx"))
    (bundle / "model.onnx").write_bytes(b"onnx graph bytes")
    rewrite_manifest(bundle)
    sign_manifest(bundle, load_signing_key())
    assert "model.onnx" in package_bundle(bundle).members


def test_two_packagings_are_byte_identical(bundle: Path, tmp_path: Path) -> None:
    first = package_bundle(bundle, tmp_path / "a" / ARCHIVE_NAME)
    for p in bundle.iterdir():  # other file times, another output place: the same bytes
        os.utime(p, (1_000_000_000, 1_000_000_000))
    second = package_bundle(bundle, tmp_path / "b" / ARCHIVE_NAME)
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.sha256 == second.sha256
    again = package_bundle(bundle, first.path)  # replaces the old archive in place
    assert again.path.read_bytes() == second.path.read_bytes()


def test_a_tampered_bundle_is_not_packaged(bundle: Path) -> None:
    raw = bytearray((bundle / "model_best.pt").read_bytes())
    raw[100] ^= 0x01
    (bundle / "model_best.pt").write_bytes(bytes(raw))
    with pytest.raises(PackageError) as exc:
        package_bundle(bundle)
    assert str(bundle) in str(exc.value) and "model_best.pt" in str(exc.value)
    assert not default_archive_path(bundle).exists()


def test_a_bundle_with_a_recomputed_manifest_or_an_untrusted_signature_is_not_packaged(
        bundle: Path, tmp_path: Path) -> None:
    (bundle / "metrics.json").write_text('{"edited": true}')
    rewrite_manifest(bundle)  # as an attacker would: the signature no longer matches
    with pytest.raises(PackageError, match="signature"):
        package_bundle(bundle)
    sign_untrusted(bundle, tmp_path / "attacker" / "key.pem")
    with pytest.raises(PackageError, match="not among the trusted keys"):
        package_bundle(bundle)
    os.remove(bundle / SIGNATURE_NAME)
    with pytest.raises(PackageError, match="not signed"):
        package_bundle(bundle)
    assert not default_archive_path(bundle).parent.exists()


def test_an_extra_file_or_a_symlink_in_the_bundle_is_not_packaged(bundle: Path, tmp_path: Path) -> None:
    (bundle / "extra.bin").write_bytes(b"x")
    with pytest.raises(PackageError, match="extra.bin"):
        package_bundle(bundle)
    os.remove(bundle / "extra.bin")
    target = tmp_path / "outside.txt"
    target.write_bytes((bundle / "train_log.txt").read_bytes())
    os.remove(bundle / "train_log.txt")
    os.symlink(target, bundle / "train_log.txt")
    with pytest.raises(PackageError, match="train_log.txt"):
        package_bundle(bundle)


def test_records_of_another_manifest_are_refused_though_records_are_not_shipped(bundle: Path) -> None:
    write_record(bundle, "replay_report.json", b"{}")
    (bundle / "train_log.txt").write_text("rewritten")
    rewrite_manifest(bundle)
    sign_manifest(bundle, load_signing_key())  # validly signed: only the stale records tell
    with pytest.raises(PackageError, match="records/manifest.json belongs to bundle manifest"):
        package_bundle(bundle)


def test_a_file_changed_after_the_trust_checks_aborts_the_write(bundle: Path, monkeypatch) -> None:
    """The race: the checks passed, then a file changed. Each file is hashed as it is copied in."""
    import sentinel_pipeline.bundles as bundles

    monkeypatch.setattr(bundles, "trusted_bundle_problems", lambda *a, **k: [])  # the checks ran "before"
    (bundle / "metrics.json").write_text('{"swapped": true}')
    with pytest.raises(PackageError, match="metrics.json changed while it was packaged"):
        package_bundle(bundle)
    assert not default_archive_path(bundle).parent.exists() or not any(default_archive_path(bundle).parent.iterdir())


def test_packaging_requires_the_verified_manifest_when_given(bundle: Path) -> None:
    with pytest.raises(PackageError, match="not the verified manifest"):
        package_bundle(bundle, verified_manifest_sha256="0" * 64)
    with pytest.raises(PackageError, match="has not been verified"):
        package_bundle(bundle, require_verified=True)


def test_the_archive_is_never_written_inside_the_bundle(bundle: Path) -> None:
    with pytest.raises(PackageError, match="inside the bundle"):
        package_bundle(bundle, bundle / ARCHIVE_NAME)


def test_a_good_archive_round_trips(bundle: Path, archive: Path) -> None:
    with unpacked_bundle(archive) as unpacked:
        assert unpacked.name == bundle.name  # named by the archive's comment
        assert sorted(p.name for p in unpacked.iterdir()) == sorted([MANIFEST_NAME, SIGNATURE_NAME,
                                                                     *manifest_files(bundle)])
        for p in unpacked.iterdir():
            assert p.read_bytes() == (bundle / p.name).read_bytes()
            assert stat.S_ISREG(os.lstat(p).st_mode)
        assert stat.S_IMODE(os.stat(unpacked).st_mode) == 0o700
        assert trusted_bundle_problems(unpacked) == []
        parent = unpacked.parent
    assert not parent.exists()  # the private copy is removed


# -- the unpacking rules, one malicious archive each -----------------------------------------------


def members_of(archive: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(archive) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def craft(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]], comment: bytes = b"") -> Path:
    """Write ``members`` as given (duplicates and odd names included) with the stdlib writer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.comment = comment
            for name, data in members:
                zf.writestr(name, data)
    return path


def with_member(archive: Path, out: Path, name: str | zipfile.ZipInfo, data: bytes) -> Path:
    return craft(out, [*members_of(archive).items(), (name, data)])


def refused(archive: Path, member: str, match: str, limits: ArchiveLimits = bundle_archive.DEFAULT_LIMITS) -> str:
    """The archive is refused by inspection and by unpacking, naming the archive and the member, and
    nothing is left behind."""
    with pytest.raises(ArchiveError) as exc:
        inspect_archive(archive, limits)
    msg = str(exc.value)
    assert str(archive) in msg and repr(member) in msg and match in msg, msg
    dest = archive.parent / "unpacked"
    with pytest.raises(ArchiveError, match=match):
        unpack_archive(archive, dest, limits)
    assert not dest.exists()
    return msg


@pytest.mark.parametrize(("name", "match"), [
    ("../model_best.pt", "path traversal"),
    ("a/../../model_best.pt", "path traversal"),
    ("..\\..\\model_best.pt", "path traversal"),
    ("/etc/cron.d/x", "absolute name"),
    ("\\\\server\\share\\x", "absolute name"),
    ("C:\\Windows\\x", "absolute name"),
    ("C:x", "absolute name"),
    ("sub/model_best.pt", "folders"),
])
def test_traversal_absolute_and_nested_names_are_refused(archive: Path, tmp_path: Path, name: str,
                                                         match: str) -> None:
    bad = with_member(archive, tmp_path / "bad.zip", name, b"payload")
    refused(bad, name, match)
    assert not (tmp_path / "model_best.pt").exists()  # where a traversal out of tmp_path/unpacked lands


def test_a_nul_in_a_member_name_is_refused(archive: Path, tmp_path: Path) -> None:
    good = members_of(archive)
    bad = craft(tmp_path / "bad.zip", [(n, d) for n, d in good.items() if n != "train_log.txt"]
                + [("train_log.txt#../../x", good["train_log.txt"])])
    bad.write_bytes(bad.read_bytes().replace(b"train_log.txt#", b"train_log.txt\x00"))  # zipfile cuts at a NUL
    assert "train_log.txt" in zipfile.ZipFile(bad).namelist()  # what a reader trusting ZipInfo.filename sees
    refused(bad, "train_log.txt\x00../../x", "NUL")


def test_a_symlink_member_is_refused(archive: Path, tmp_path: Path) -> None:
    good = members_of(archive)
    link = zipfile.ZipInfo("train_log.txt")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    bad = craft(tmp_path / "bad.zip", [(n, d) for n, d in good.items() if n != "train_log.txt"]
                + [(link, b"/etc/passwd")])
    refused(bad, "train_log.txt", "a symlink")


@pytest.mark.parametrize(("mode", "match"), [(stat.S_IFIFO | 0o644, "not a regular file"),
                                             (stat.S_IFCHR | 0o644, "not a regular file"),
                                             (stat.S_IFDIR | 0o755, "a directory entry")])
def test_special_members_are_refused(archive: Path, tmp_path: Path, mode: int, match: str) -> None:
    good = members_of(archive)
    info = zipfile.ZipInfo("train_log.txt")
    info.create_system = 3
    info.external_attr = mode << 16
    bad = craft(tmp_path / "bad.zip", [(n, d) for n, d in good.items() if n != "train_log.txt"] + [(info, b"x")])
    refused(bad, "train_log.txt", match)


def test_a_directory_entry_is_refused(archive: Path, tmp_path: Path) -> None:
    bad = with_member(archive, tmp_path / "bad.zip", "records/", b"")
    refused(bad, "records/", "a directory entry")


def test_duplicate_names_are_refused(archive: Path, tmp_path: Path) -> None:
    bad = with_member(archive, tmp_path / "bad.zip", "model_best.pt", b"the second copy wins in extractall")
    refused(bad, "model_best.pt", "duplicate name")
    bad = with_member(archive, tmp_path / "bad2.zip", "MODEL_BEST.PT", b"collides on a case-insensitive disk")
    refused(bad, "MODEL_BEST.PT", "duplicate name")


def test_a_member_not_in_the_manifest_is_refused(archive: Path, tmp_path: Path) -> None:
    bad = with_member(archive, tmp_path / "bad.zip", "evil.py", b"import os")
    refused(bad, "evil.py", "not listed in the archive's manifest.json")


def test_an_archive_without_a_manifest_is_refused(archive: Path, tmp_path: Path) -> None:
    bad = craft(tmp_path / "bad.zip", [(n, d) for n, d in members_of(archive).items() if n != MANIFEST_NAME])
    with pytest.raises(ArchiveError, match="no manifest.json"):
        inspect_archive(bad)


def test_an_oversized_member_is_refused(archive: Path, tmp_path: Path) -> None:
    limits = ArchiveLimits(max_member_bytes=100_000)  # model_best.pt declares 200,000 bytes
    refused(archive, "model_best.pt", "more than the 100000 allowed per member", limits)


def test_too_large_a_total_is_refused(archive: Path) -> None:
    limits = ArchiveLimits(max_total_bytes=150_000)
    refused(archive, "model_best.pt", "bytes in all, more than the 150000 allowed", limits)


def test_too_many_members_are_refused(archive: Path) -> None:
    with pytest.raises(ArchiveError) as exc:
        inspect_archive(archive, ArchiveLimits(max_members=5))
    assert str(archive) in str(exc.value) and "more than the 5 allowed" in str(exc.value)


def test_a_zip_bomb_by_compression_ratio_is_refused(archive: Path, tmp_path: Path) -> None:
    good = members_of(archive)
    bomb = b"\0" * (8 << 20)  # 8 MiB of zeros deflate to ~8 KiB
    bad = craft(tmp_path / "bad.zip", [(n, d) for n, d in good.items() if n != "train_log.txt"]
                + [("train_log.txt", bomb)])
    refused(bad, "train_log.txt", "compression ratio")


def _patch_declared_size(path: Path, name: str, size: int) -> None:
    """Rewrite the uncompressed size a member declares, in its local header and in the central directory
    (both carry it), leaving the data as it is: a header that lies."""
    raw = bytearray(path.read_bytes())
    encoded = name.encode()
    for sig, size_at, name_len_at, name_at in ((b"PK\x03\x04", 22, 26, 30), (b"PK\x01\x02", 24, 28, 46)):
        start = 0
        while (i := raw.find(sig, start)) >= 0:
            start = i + 4
            (n,) = struct.unpack_from("<H", raw, i + name_len_at)
            if raw[i + name_at:i + name_at + n] == encoded:
                struct.pack_into("<I", raw, i + size_at, size)
    path.write_bytes(bytes(raw))


def test_a_member_that_inflates_past_its_declared_size_is_refused(archive: Path, tmp_path: Path) -> None:
    good = members_of(archive)
    big = os.urandom(4000) * 100  # 400 kB of repeated noise: ratio ~100:1 would pass a 100 kB declared size
    bad = craft(tmp_path / "bad.zip", [(n, d) for n, d in good.items() if n != "train_log.txt"]
                + [("train_log.txt", big)])
    _patch_declared_size(bad, "train_log.txt", 1000)  # the header says 1000 bytes
    assert zipfile.ZipFile(bad).getinfo("train_log.txt").file_size == 1000
    inspect_archive(bad)  # the headers alone pass every rule: only the bytes read tell
    with pytest.raises(ArchiveError) as exc:
        unpack_archive(bad, tmp_path / "out")
    assert str(bad) in str(exc.value) and "'train_log.txt'" in str(exc.value), exc.value
    assert not (tmp_path / "out").exists()


def test_a_member_shorter_than_declared_is_refused(archive: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    shutil.copyfile(archive, bad)
    size = len(members_of(archive)["train_log.txt"])
    _patch_declared_size(bad, "train_log.txt", size + 1)
    with pytest.raises(ArchiveError, match="train_log.txt"):
        unpack_archive(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _LyingZip:
    """A stand-in for ``ZipFile`` whose member stream yields more bytes than the member declares: the
    reader's own count refuses it, whatever the zip library does with the header."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def open(self, info: zipfile.ZipInfo) -> io.BytesIO:  # noqa: A003
        return io.BytesIO(self.data)


def test_the_caps_are_enforced_on_the_bytes_actually_read() -> None:
    info = zipfile.ZipInfo("train_log.txt")
    info.file_size = 10
    out: list[bytes] = []
    with pytest.raises(ArchiveError, match="inflates to more than 10 bytes") as exc:
        bundle_archive._read_member(_LyingZip(b"x" * 10_000), info, "lying.zip", 1 << 20, out.append)  # type: ignore[arg-type]
    assert "lying.zip" in str(exc.value) and "'train_log.txt'" in str(exc.value)
    assert sum(map(len, out)) <= 10  # nothing past the cap reached the sink
    info.file_size = 10_000
    with pytest.raises(ArchiveError, match="inflates to more than 500 bytes"):
        bundle_archive._read_member(_LyingZip(b"x" * 10_000), info, "lying.zip", 500, out.append)  # type: ignore[arg-type]


def test_other_compression_methods_and_encrypted_members_are_refused(archive: Path, tmp_path: Path) -> None:
    good = members_of(archive)
    bz = tmp_path / "bz.zip"
    with zipfile.ZipFile(bz, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, d in good.items():
            zf.writestr(n, d, compress_type=zipfile.ZIP_BZIP2 if n == "train_log.txt" else None)
    refused(bz, "train_log.txt", "compression method")
    enc = tmp_path / "enc.zip"
    shutil.copyfile(archive, enc)
    raw = bytearray(enc.read_bytes())
    i = raw.find(b"PK\x01\x02")  # the first central directory entry: set "encrypted" in its flags
    struct.pack_into("<H", raw, i + 8, struct.unpack_from("<H", raw, i + 8)[0] | 0x1)
    enc.write_bytes(bytes(raw))
    refused(enc, MANIFEST_NAME, "encrypted")


def test_a_symlinked_or_garbage_archive_is_refused(archive: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.zip"
    os.symlink(archive, link)
    with pytest.raises(ArchiveError, match="not a regular file"):
        inspect_archive(link)
    junk = tmp_path / "junk.zip"
    junk.write_bytes(zlib.compress(b"not a zip"))
    with pytest.raises(ArchiveError, match="not a readable zip archive"):
        inspect_archive(junk)


def test_verification_of_a_malicious_archive_fails_naming_the_member(archive: Path, tmp_path: Path) -> None:
    bad = with_member(archive, tmp_path / "bad.zip", "../escape.txt", b"x")
    report = verify_bundle(bad, "0123456789abcdef")
    assert not report.passed and report.bundle_dir == str(bad)
    assert "'../escape.txt'" in report.check("signature").detail and "path traversal" in report.check("files_present").detail
    assert [c.name for c in report.checks] == list(CHECK_NAMES)
    assert all(report.check(n).detail.startswith("skipped") for n in CHECK_NAMES[2:])
    assert not (tmp_path / "escape.txt").exists()


# -- a real bundle: packaged, verified as an archive, tampered inside the archive ---------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    return make_training_data(tmp_path_factory.mktemp("data"), signal=1.0, n_bars=GATE_BARS)


@pytest.fixture(scope="module")
def trained(data: TrainingData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    config = train_config(data, out, model="mlp_two_head", epochs=3, batch_size=64, models_dir=out / "models")
    return train(config, progress=False).bundle_dir


@pytest.fixture(scope="module")
def trained_archive(trained: Path) -> Path:
    return package_bundle(trained).path


def _cli(module: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_a_packaged_bundle_verifies_as_an_archive(trained: Path, trained_archive: Path, data: TrainingData) -> None:
    direct = verify_bundle(trained, data.hash, val_h5=data.val_h5)
    report = verify_bundle(trained_archive, data.hash, val_h5=data.val_h5)
    assert direct.passed, direct.render()
    assert report.passed, report.render()
    assert report.bundle_dir == str(trained_archive) and report.manifest_digest == direct.manifest_digest
    assert [c.name for c in report.checks] == list(CHECK_NAMES)
    assert "sentinel-bundle-" not in json.dumps(report.to_dict())  # nothing names the private copy


def test_a_tampered_member_inside_the_archive_fails_verification_naming_the_file(
        trained_archive: Path, data: TrainingData, tmp_path: Path) -> None:
    members = members_of(trained_archive)
    raw = bytearray(members["model_best.pt"])
    raw[len(raw) // 2] ^= 0x01
    members["model_best.pt"] = bytes(raw)
    bad = craft(tmp_path / ARCHIVE_NAME, list(members.items()))
    report = verify_bundle(bad, data.hash, val_h5=data.val_h5)
    assert not report.passed
    assert report.failed_checks[0] == "manifest"
    assert "model_best.pt" in report.check("manifest").detail
    assert report.check("signature").passed  # the signed manifest is intact; the file is not


def test_the_clis_package_and_verify_an_archive(trained: Path, data: TrainingData, tmp_path: Path) -> None:
    out = tmp_path / "ship" / ARCHIVE_NAME
    proc = _cli("sentinel_pipeline.package", "--bundle-dir", trained, "--out", out, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["archive"] == str(out) and summary["members"][:2] == [MANIFEST_NAME, SIGNATURE_NAME]
    proc = _cli("sentinel_pipeline.verify", "--bundle-dir", out, "--expected-hash", data.hash, "--val-h5", data.val_h5)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == f"bundle verification PASSED: {out}"
    proc = _cli("sentinel_pipeline.verify", "--bundle-dir", out, "--expected-hash", data.hash, "--write-record")
    assert proc.returncode == 2 and "archive carries no records" in proc.stderr


def test_the_package_cli_refuses_a_tampered_bundle(trained: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models" / trained.name
    shutil.copytree(trained, copy)
    (copy / "metrics.json").write_text("{}")
    proc = _cli("sentinel_pipeline.package", "--bundle-dir", copy)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert str(copy) in proc.stderr and "metrics.json" in proc.stderr
    assert not default_archive_path(copy).exists()
    proc = _cli("sentinel_pipeline.package", "--bundle-dir", tmp_path / "nope")
    assert proc.returncode == 2
