"""Input fingerprints per stage, so that a rebuild on unchanged inputs costs seconds, not a retrain.

Every stage directory gets a ``.stage.json`` record: the fingerprint of everything the stage read
(upstream fingerprints, file digests, its own config, the code version) and the sha256 of every file it
wrote. A stage whose fingerprint equals the recorded one, and whose outputs still have the recorded
digests, is *fresh* and is reused as is. Anything else (changed raw data, changed config, a file
deleted or edited by hand) rebuilds the stage and, through the chained fingerprints, everything
downstream of it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sentinel_pipeline import __version__
from sentinel_pipeline.atomic_io import write_json_atomic

RECORD_NAME = ".stage.json"
_CHUNK = 8 * 1024 * 1024


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(stage_dir / RECORD_NAME, record)
    return record
