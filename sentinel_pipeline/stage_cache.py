"""Input fingerprints per stage, so that a rebuild on unchanged inputs costs seconds, not a retrain.

Every stage directory gets a ``.stage.json`` record: the fingerprint of everything the stage read
(upstream fingerprints, file digests, its own config, the code version) and the sha256 of every file it
wrote. A stage whose fingerprint equals the recorded one, and whose outputs still have the recorded
digests, is *fresh* and is reused as is. Anything else (changed raw data, changed config, a file
deleted or edited by hand) rebuilds the stage and, through the chained fingerprints, everything
downstream of it.

A stage commits all or nothing (:func:`build_stage`): it is built into a temporary folder inside its
own folder; only when the build returned are its files renamed over the previous ones and the record
written (the old record is removed first, so a crash half-way through the renames leaves no record
and the stage is rebuilt). A build that raises leaves the previous outputs and record untouched; what
it chose to keep for inspection (the raw stage's quarantine) and a ``failure.json`` go to
``<stage>/last_failed/``, beside the good outputs, never over them.

A downstream stage fingerprints its upstream with :func:`upstream_state`: the upstream record's
fingerprint **and the sha256 of the upstream files as they are on disk now**, checked against the
record. An upstream whose files differ from its record (edited, half-written), or whose last run
failed (``last_failed/failure.json``), is refused with a message saying which stage to rebuild, so a
downstream stage is never reused or built on outputs that no successful run of its upstream produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sentinel_pipeline import __version__
from sentinel_pipeline.atomic_io import sweep_stale_temps, temp_sibling, write_json_atomic

RECORD_NAME = ".stage.json"
FAILED_DIR = "last_failed"
FAILURE_NAME = "failure.json"
_CHUNK = 8 * 1024 * 1024
# (path, inode, size, mtime_ns, ctime_ns) -> sha256: a file replaced by os.replace gets a new inode, so a hit is
# the same bytes; saves hashing the same large output twice in one process (own check + downstream's)
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


class StageInputError(RuntimeError):
    """An upstream stage's outputs cannot be trusted as input (missing, changed, or its last run failed)."""


def _digest_key(path: str | Path) -> tuple[str, int, int, int, int]:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def remember_digest(path: str | Path, digest: str) -> None:
    """Record ``digest`` as the sha256 of ``path`` as it is now (same key as :func:`file_digest`): for a
    writer that hashed the bytes while writing them, and for a file renamed after it was hashed (a
    rename keeps the inode and the bytes but changes the path and ctime)."""
    _DIGESTS[_digest_key(path)] = digest


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (streamed; remembered per inode, size and mtime within the process)."""
    key = _digest_key(path)
    if key in _DIGESTS:
        return _DIGESTS[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    digest = _DIGESTS[key] = h.hexdigest()
    return digest


def _canonical(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    return obj


def fingerprint(**parts: Any) -> str:
    """Stable sha256 of JSON-able parts (dicts are key-sorted); includes the package version."""
    body = json.dumps(_canonical({"code": __version__, **parts}), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def files_fingerprint(files: Iterable[str | Path]) -> dict[str, str]:
    """{file name: sha256} for a set of input files (names relative to nothing: just the file names)."""
    return {Path(f).name: file_digest(f) for f in sorted(map(Path, files))}


def read_record(stage_dir: str | Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / RECORD_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def fresh_record(stage_dir: str | Path, fp: str) -> dict[str, Any] | None:
    """The stage's record if it was built from exactly ``fp`` and its outputs are intact; else None."""
    record = read_record(stage_dir)
    if record is None or record.get("fingerprint") != fp:
        return None
    for rel, digest in record.get("outputs", {}).items():
        out = Path(stage_dir) / rel
        if not out.exists() or file_digest(out) != digest:
            return None
    return record


def write_record(
    stage_dir: str | Path, fp: str, outputs: Iterable[str | Path], metadata: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Record that ``stage_dir`` was built from ``fp``; ``outputs`` are files inside ``stage_dir``."""
    stage_dir = Path(stage_dir)
    record = {
        "fingerprint": fp,
        "outputs": {str(Path(o).relative_to(stage_dir)): file_digest(o) for o in outputs},
        "metadata": _canonical(dict(metadata or {})),
        "finished_at": _now(),
    }
    write_json_atomic(stage_dir / RECORD_NAME, record)
    return record


def failed_dir(stage_dir: str | Path) -> Path:
    """Where a failed build of the stage leaves what it kept for inspection, beside the good outputs."""
    return Path(stage_dir) / FAILED_DIR


def last_failure(stage_dir: str | Path) -> dict[str, Any] | None:
    """The stage's ``last_failed/failure.json`` (its last build failed and nothing succeeded since), or None."""
    path = failed_dir(stage_dir) / FAILURE_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"error": f"unreadable {path}", "failed_at": None}


def clear_failure(stage_dir: str | Path) -> None:
    """Forget a failed build (the stage's outputs are current again: rebuilt, or its inputs are back)."""
    shutil.rmtree(failed_dir(stage_dir), ignore_errors=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def build_stage(
    stage_dir: str | Path,
    fp: str,
    build: Callable[[Path], Mapping[str, Any]],
    *,
    keep_on_failure: Iterable[str] = (),
) -> dict[str, Any]:
    """Build a stage all or nothing and return its new record.

    ``build(staging)`` writes every output of the stage into the empty folder ``staging`` and returns
    the stage summary (the record's metadata). When it returns, the outputs are renamed into
    ``stage_dir`` and the record written; when it raises, ``stage_dir``'s outputs and record are left
    exactly as they were, the files of ``keep_on_failure`` (names inside ``staging``) are moved to
    ``last_failed/`` with a ``failure.json`` (the error, the time, the fingerprint), and the error
    propagates. The caller holds the stage lock.
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(stage_dir)  # a build that died (SIGKILL, power loss) left its staging folder
    staging = temp_sibling(stage_dir / "stage")
    staging.mkdir()
    try:
        try:
            summary = build(staging)
        except BaseException as exc:
            _keep_failure(stage_dir, staging, fp, exc, keep_on_failure)
            raise
        outputs = sorted(p for p in staging.rglob("*") if p.is_file())
        digests = {str(p.relative_to(staging)): file_digest(p) for p in outputs}
        (stage_dir / RECORD_NAME).unlink(missing_ok=True)  # no record while the outputs are swapped
        for p in outputs:
            target = stage_dir / p.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, target)
            remember_digest(target, digests[str(p.relative_to(staging))])  # same inode, same bytes
        clear_failure(stage_dir)
        record = {"fingerprint": fp, "outputs": digests, "metadata": _canonical(dict(summary or {})),
                  "finished_at": _now()}
        write_json_atomic(stage_dir / RECORD_NAME, record)
        return record
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def record_failure(stage_dir: str | Path, exc: BaseException, fp: str | None = None) -> None:
    """Mark the stage's last run as failed (``last_failed/failure.json``) without touching its outputs:
    for a failure before the build started (e.g. an unreadable input file)."""
    target = failed_dir(stage_dir)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    _write_failure(target, exc, fp, [])


def _write_failure(target: Path, exc: BaseException, fp: str | None, kept: list[str]) -> None:
    message = str(getattr(exc, "description", None) or exc) or type(exc).__name__
    write_json_atomic(target / FAILURE_NAME, {"error": message, "error_type": type(exc).__name__,
                                              "fingerprint": fp, "failed_at": _now(), "kept": kept})


def _keep_failure(stage_dir: Path, staging: Path, fp: str, exc: BaseException, keep: Iterable[str]) -> None:
    target = failed_dir(stage_dir)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    kept = []
    for name in keep:
        src = staging / name
        if src.is_file():
            os.replace(src, target / name)
            kept.append(name)
    _write_failure(target, exc, fp, kept)


def upstream_state(stage_dir: str | Path, name: str, reads: Iterable[str] | None = None) -> str:
    """The fingerprint a downstream stage chains: the upstream record's fingerprint and the sha256 of the
    upstream files it ``reads`` (default: every output), after checking that every recorded output on
    disk is exactly the recorded one. (Reports that name the instance folder are checked, not chained,
    so the same data gives the same fingerprint in any folder.)

    Raises :class:`StageInputError` when the upstream has no record, its last build failed, or one of
    its outputs is missing or differs from the record.
    """
    stage_dir = Path(stage_dir)
    record = read_record(stage_dir)
    if record is None:
        raise StageInputError(
            f"upstream stage '{name}' has not been built ({stage_dir} has no record); materialise '{name}' first"
        )
    failure = last_failure(stage_dir)
    if failure is not None:
        raise StageInputError(
            f"upstream stage '{name}' failed its last run ({failure.get('failed_at')}): {failure.get('error')}; "
            f"its outputs in {stage_dir} are from the previous successful run ({record.get('finished_at')}), not "
            f"from the current inputs. Fix the cause and rebuild '{name}' (details in {failed_dir(stage_dir)})"
        )
    outputs = record.get("outputs", {})
    chained = dict(outputs) if reads is None else {}
    for rel in reads or ():
        if rel not in outputs:
            raise StageInputError(f"{stage_dir / rel}: not an output recorded by upstream stage '{name}'; rebuild '{name}'")
        chained[rel] = outputs[rel]
    for rel, digest in outputs.items():
        path = stage_dir / rel
        if not path.is_file():
            raise StageInputError(f"{path}: output of upstream stage '{name}' is missing; rebuild '{name}'")
        actual = file_digest(path)
        if actual != digest:
            raise StageInputError(
                f"{path}: output of upstream stage '{name}' differs from its record (sha256 {actual[:12]}, "
                f"recorded {digest[:12]}): it was changed after '{name}' was built; rebuild '{name}'"
            )
    return fingerprint(upstream=record["fingerprint"], outputs=chained)
