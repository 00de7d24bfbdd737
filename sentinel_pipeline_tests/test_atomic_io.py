"""atomic_io: writer-identifying temp names, the sweep of dead writers' leftovers, fsync around the
rename, and plain-words errors for a full disk, a read-only file system and a denied permission."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sentinel_pipeline import atomic_io
from sentinel_pipeline.atomic_io import (
    WriteError,
    atomic_dir,
    atomic_path,
    probe_writable,
    sweep_stale_temps,
    temp_writer,
    write_text_atomic,
)
from sentinel_pipeline.training import checkpoints

HOST = atomic_io._host_tag()


def _dead_pid() -> int:
    """The pid of a process that has finished (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- temp names and the sweep ------------------------------------------------------------------------


def test_temp_names_name_their_writer(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "a.json") as tmp:
        assert temp_writer(tmp) == (os.getpid(), HOST)
        tmp.write_text("{}")
    with atomic_dir(tmp_path / "bundle") as tmp:
        assert temp_writer(tmp) == (os.getpid(), HOST)
        (tmp / "f").write_text("x")
    assert (tmp_path / "a.json").read_text() == "{}" and (tmp_path / "bundle" / "f").read_text() == "x"
    assert temp_writer(tmp_path / "a.json") is None


def test_sweep_removes_only_leftovers_of_writers_that_are_gone(tmp_path: Path) -> None:
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        d = tmp_path
        dead_file = d / f".bars.parquet.tmp-{dead}-{HOST}-0123abcd"
        dead_dir = d / f".seq_ctx_fusion__20260101T000000Z__abc.tmp-{dead}-{HOST}-89abcdef"
        live_file = d / f".bars.parquet.tmp-{live.pid}-{HOST}-0123abcd"
        mine = d / f".x.json.tmp-{os.getpid()}-{HOST}-0123abcd"
        other_host = d / f".bars.parquet.tmp-{dead}-elsewhere-0123abcd"
        unknown = d / ".bars.parquet.tmp-k2j3h4g5"  # not a name this module writes
        for p in (dead_file, live_file, mine, other_host, unknown):
            p.write_text("partial")
        dead_dir.mkdir()
        (dead_dir / "model_best.pt").write_bytes(b"partial")
        sub = d / "hdf5"
        sub.mkdir()
        dead_nested = sub / f".train.h5.tmp-{dead}-{HOST}-0123abcd"
        dead_nested.write_text("partial")

        removed = sweep_stale_temps(d)
        assert sorted(removed) == sorted([dead_file, dead_dir])
        assert not dead_file.exists() and not dead_dir.exists()
        for p in (live_file, mine, other_host, unknown, dead_nested):
            assert p.exists(), p
        assert sweep_stale_temps(d, recursive=True) == [dead_nested]
        assert live_file.exists() and mine.exists()
    finally:
        live.kill()
        live.wait()
    # its writer is gone now: the next sweep takes it
    assert live_file in sweep_stale_temps(tmp_path)


def test_sweep_restores_a_directory_whose_replacement_died_half_way(tmp_path: Path) -> None:
    """A writer killed between its two renames of ``atomic_dir(overwrite=True)`` left the previous
    directory as ``.<name>.old-*`` and nothing at ``<name>``: the sweep puts it back."""
    dead = _dead_pid()
    old = tmp_path / f".backtest.old-{dead}-{HOST}-0123abcd"
    old.mkdir()
    (old / "report.json").write_text("previous")
    assert sweep_stale_temps(tmp_path) == [old]
    assert (tmp_path / "backtest" / "report.json").read_text() == "previous"
    # with the new directory in place, an old copy is just removed
    old.mkdir()
    assert sweep_stale_temps(tmp_path) == [old] and not old.exists()
    assert (tmp_path / "backtest" / "report.json").read_text() == "previous"


# -- durability --------------------------------------------------------------------------------------


def _record_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic_io.os, "fsync", fsync)
    monkeypatch.setattr(atomic_io.os, "replace", replace)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to map fds to paths")
def test_file_is_fsynced_before_the_rename_and_its_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = _record_syncs(monkeypatch)
    target = tmp_path / "metrics.json"
    write_text_atomic(target, "{}")
    (_, tmp), (_, src, dst), (_, parent) = events
    assert (tmp, src, dst) == (src, src, str(target)) and Path(tmp).name.startswith(".metrics.json.tmp-")
    assert parent == str(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to map fds to paths")
def test_directory_files_are_fsynced_before_the_rename_and_the_parent_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "bundle"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
        events = _record_syncs(monkeypatch)
    rename = next(i for i, e in enumerate(events) if e[0] == "replace")
    synced_before = {e[1] for e in events[:rename]}
    assert {str(tmp / "a.txt"), str(tmp / "sub" / "b.txt"), str(tmp), str(tmp / "sub")} <= synced_before
    assert events[rename] == ("replace", str(tmp), str(target))
    assert events[rename + 1:] == [("fsync", str(tmp_path))]


# -- plain-words errors ------------------------------------------------------------------------------


def test_disk_full_while_writing_says_so_and_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "features.parquet"
    target.write_text("previous")
    with pytest.raises(WriteError, match=r"cannot write .*features\.parquet: the disk is full") as info:
        with atomic_path(target) as tmp, open(tmp, "wb") as fh, open("/dev/full", "wb") as full:
            fh.write(b"x")
            full.write(b"y" * 1_000_000)  # a real ENOSPC from the kernel
            full.flush()
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert target.read_text() == "previous"
    assert not [p for p in tmp_path.iterdir() if temp_writer(p)]


def test_read_only_file_system_at_the_rename_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def replace(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(src))

    monkeypatch.setattr(atomic_io.os, "replace", replace)
    with pytest.raises(WriteError, match=r"cannot write .*report\.json: the file system is read-only"):
        write_text_atomic(tmp_path / "report.json", "{}")
    assert not (tmp_path / "report.json").exists() and list(tmp_path.iterdir()) == []


def test_library_errors_that_lost_the_errno_are_still_recognised(tmp_path: Path) -> None:
    with pytest.raises(WriteError, match="the disk is full"):
        with atomic_path(tmp_path / "x.arrow"):
            raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
    with pytest.raises(ValueError, match="unrelated"):  # anything else passes through unchanged
        with atomic_path(tmp_path / "x.arrow"):
            raise ValueError("unrelated")


def test_a_checkpoint_on_a_full_disk_fails_in_plain_words(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save to a path reports a failed write as an opaque RuntimeError; checkpoints write through a
    file object, so the ENOSPC reaches atomic_io."""
    monkeypatch.setattr(checkpoints, "open", lambda path, mode: open("/dev/full", mode), raising=False)
    with pytest.raises(WriteError, match=r"cannot write .*model_best\.pt: the disk is full"):
        checkpoints.save_best(tmp_path / "model_best.pt", {"w": torch.zeros(50_000)},
                              {"input_dim": 3, "hidden_dim": 4}, 1, 0.5)
    assert not (tmp_path / "model_best.pt").exists()


def _deny_writes_under(directory: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> str:
    """Make ``directory`` unwritable: chmod 0o500, and where that does not stop writes (root), an
    ``os.open`` that refuses to create files there. Returns how it was done."""
    directory.chmod(0o500)
    try:
        (directory / ".can-i-write").touch()
    except PermissionError:
        if code == errno.EACCES:
            return "chmod"
    else:
        (directory / ".can-i-write").unlink()
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if Path(os.fsdecode(path)).parent == directory and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(atomic_io.os, "open", refusing_open)
    return "os.open"


@pytest.mark.parametrize("code, words", [(errno.EACCES, "permission denied"),
                                          (errno.EROFS, "the file system is read-only")])
def test_probe_refuses_an_unwritable_directory_in_plain_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    try:
        _deny_writes_under(models, monkeypatch, code)
        with pytest.raises(WriteError, match=f"cannot write {models}: {words}"):
            probe_writable(models)
    finally:
        models.chmod(0o755)
    assert list(models.iterdir()) == []  # no probe left behind


def test_probe_checks_free_space_and_leaves_nothing(tmp_path: Path) -> None:
    assert probe_writable(tmp_path / "new" / "models", needed_bytes=1024) == tmp_path / "new" / "models"
    assert list((tmp_path / "new" / "models").iterdir()) == []
    with pytest.raises(WriteError, match=r"the disk is full \(needs ~\d+ MB, [\d.]+ MB free"):
        probe_writable(tmp_path, needed_bytes=1 << 60, what="bundle")


def test_training_on_a_read_only_models_directory_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sentinel_pipeline.training.engine import train
    from sentinel_pipeline_tests.training_fixtures import make_training_data, train_config

    data = make_training_data(tmp_path / "data")
    models = tmp_path / "models"
    models.mkdir()
    epochs: list[int] = []
    try:
        _deny_writes_under(models, monkeypatch, errno.EROFS)
        t0 = time.perf_counter()
        with pytest.raises(WriteError, match=f"cannot write {models}: the file system is read-only"):
            train(train_config(data, tmp_path / "run", limit_samples=64, epochs=1, models_dir=models),
                  progress=False, on_epoch_end=lambda r: epochs.append(r["epoch"]))
        seconds = time.perf_counter() - t0
    finally:
        models.chmod(0o755)
    assert epochs == [] and not (tmp_path / "run" / "train_log.txt").exists()  # not a single epoch
    assert seconds < 5, seconds


def test_write_error_survives_pickling(tmp_path: Path) -> None:
    import pickle

    err = WriteError(tmp_path / "bundle", errno.ENOSPC, needed_bytes=5 * 1024 * 1024)
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, WriteError) and str(back) == str(err) and back.errno == errno.ENOSPC
    assert str(err).startswith(f"cannot write {tmp_path / 'bundle'}: the disk is full (needs ~5.0 MB, ")


def test_training_cli_on_a_full_models_disk_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from sentinel_pipeline import train as cli
    from sentinel_pipeline_tests.training_fixtures import make_training_data

    data = make_training_data(tmp_path / "data")
    models = tmp_path / "models"
    models.mkdir()
    try:
        _deny_writes_under(models, monkeypatch, errno.ENOSPC)
        code = cli.main(["--train-h5", str(data.train_h5), "--val-h5", str(data.val_h5), "--feature-schema",
                         str(data.schema), "--out-dir", str(tmp_path / "run"), "--seq-len", str(data.contract.seq_len),
                         "--threads", "1", "--device", "cpu", "--no-progress", "--epochs", "1",
                         "--models-dir", str(models)])
    finally:
        models.chmod(0o755)
    err = capsys.readouterr().err
    assert code != 0
    assert f"cannot write {models}: the disk is full" in err and "Traceback" not in err, err


def test_a_data_stage_build_sweeps_the_staging_folder_of_a_build_that_died(tmp_path: Path) -> None:
    from sentinel_pipeline.stage_cache import build_stage, read_record

    stage = tmp_path / "features"
    stage.mkdir()
    dead = _dead_pid()
    leftover = stage / f".stage.tmp-{dead}-{atomic_io._host_tag()}-0123abcd"
    leftover.mkdir()
    (leftover / "features.parquet").write_bytes(b"half written")

    def build(staging: Path) -> dict[str, int]:
        assert atomic_io.temp_writer(staging) == (os.getpid(), atomic_io._host_tag())  # names its writer
        (staging / "out.txt").write_text("ok")
        return {"rows": 1}

    record = build_stage(stage, "fp", build)
    assert not leftover.exists()
    assert sorted(p.name for p in stage.iterdir()) == [".stage.json", "out.txt"]
    assert record["outputs"].keys() == {"out.txt"} and read_record(stage)["fingerprint"] == "fp"
