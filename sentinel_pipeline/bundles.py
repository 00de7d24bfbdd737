"""Model bundles: one self-describing, sha256-manifested directory per trained model.

A bundle lives under ``models_dir`` and is named ``<variant>__<YYYYmmddTHHMMSSZ>__<contract hash>``
(UTC creation time; ``__2``, ``__3``... is appended in the rare case of a name clash within one
second). It holds :data:`BUNDLE_FILES`:

=========================== ===============================================================
``model_best.pt``           the best checkpoint (exact keys, ``torch.load(weights_only=True)``)
``seq_scaler.joblib``       the train-fitted seq scaler
``snap_scaler.joblib``      the train-fitted snap scaler
``scalers.json``            the scalers' fit window and parameters (``data.scalers``)
``feature_contract.json``   the feature contract the model was trained on
``feature_contract_hash.txt`` its hash, one line
``feature_schema.txt``      the ordered feature names per group
``train_config.json``       the resolved training configuration
``bundle_metadata.json``    variant, context support and dims, seq_len, data windows, label
                            parameters, library and code versions, created_at
``metrics.json``            the run's metrics (per-epoch history, final validation evaluation)
``loss_curve.png``          train vs val loss per head
``train_log.txt``           the run's log
``manifest.json``           sha256 and size of every other file
=========================== ===============================================================

Writing is atomic: the bundle is assembled in a hidden temp directory next to its final place and
renamed into place at the end (``atomic_io.atomic_dir``), so a crash never leaves anything that looks
like a bundle. Loading (:func:`load_bundle`) first checks the manifest (:func:`check_manifest`) and
only then unpickles anything: a bundle with one changed byte is refused before joblib runs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sentinel_pipeline import __version__
from sentinel_pipeline.atomic_io import atomic_dir, write_json_atomic, write_text_atomic
from sentinel_pipeline.data.feature_contract import (
    FEATURE_GROUPS,
    ContractError,
    FeatureContract,
    read_contract,
    read_feature_schema,
)
from sentinel_pipeline.data.scalers import FittedScalers, load_scalers
from sentinel_pipeline.training.checkpoints import BEST_NAME, CheckpointError, load_best
from sentinel_pipeline.training.models import build_model, get_variant

MANIFEST_NAME = "manifest.json"
METADATA_NAME = "bundle_metadata.json"
HASH_NAME = "feature_contract_hash.txt"
# records written next to a released bundle afterwards (verification, replay); never in the manifest,
# never loaded as part of the model, and allowed to appear without invalidating the bundle
POST_RELEASE_FILES: tuple[str, ...] = (
    "verification.json",
    "replay_report.json",
    "replay_equity.png",
    "replay_trades.parquet",
    "replay_comparison.json",
)
RUN_FILES: tuple[str, ...] = (BEST_NAME, "metrics.json", "loss_curve.png", "train_log.txt", "train_config.json")
SCALER_FILES: tuple[str, ...] = ("seq_scaler.joblib", "snap_scaler.joblib", "scalers.json")
BUNDLE_FILES: tuple[str, ...] = (
    *RUN_FILES,
    *SCALER_FILES,
    "feature_contract.json",
    HASH_NAME,
    "feature_schema.txt",
    METADATA_NAME,
)
LIBRARIES: tuple[str, ...] = ("torch", "numpy", "pandas", "scikit-learn", "dagster", "h5py", "pyarrow", "joblib")
NAME_RE = re.compile(r"^(?P<variant>[A-Za-z0-9_]+?)__(?P<ts>\d{8}T\d{6}Z)__(?P<hash>[0-9a-f]+)(?:__(?P<n>\d+))?$")
_CHUNK = 1 << 20


class BundleError(ValueError):
    """A bundle cannot be written or loaded (message names the bundle and every problem found)."""


@dataclass
class LoadedBundle:
    path: Path
    model: nn.Module  # built from the checkpoint's arch, weights loaded, in eval mode, on ``device``
    arch: dict[str, Any]
    variant: str
    contract: FeatureContract
    feature_contract_hash: str
    schema: dict[str, list[str]]
    scalers: FittedScalers
    metadata: dict[str, Any]
    train_config: dict[str, Any]
    metrics: dict[str, Any]
    checkpoint_epoch: int
    checkpoint_val_loss: float
    device: torch.device


# -- helpers ----------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a bundle depends on (importlib.metadata: nothing is imported)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_version() -> dict[str, str | None]:
    """The package version and, when the code runs from a git checkout, its commit."""
    commit: str | None = None
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if proc.returncode == 0:
            commit = proc.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"package_version": __version__, "git_commit": commit}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return obj


def _copy(src: Path, dst: Path) -> None:
    """Copy one file into the bundle being assembled."""
    shutil.copyfile(src, dst)


def _bundle_name(models_dir: Path, variant: str, created: datetime, contract_hash: str) -> str:
    base = f"{variant}__{created.strftime('%Y%m%dT%H%M%SZ')}__{contract_hash}"
    name, n = base, 1
    while (models_dir / name).exists():
        n += 1
        name = f"{base}__{n}"
    return name


def _check_schema_matches(schema_path: Path, contract: FeatureContract) -> dict[str, list[str]]:
    schema = read_feature_schema(schema_path)
    for group in FEATURE_GROUPS:
        if schema[group] != contract.names(group):
            raise BundleError(
                f"{schema_path}: {group} features {schema[group]} differ from contract {contract.hash}: "
                f"{contract.names(group)}"
            )
    return schema


# -- writing ----------------------------------------------------------------------------------


def write_bundle(
    train_result_or_run_dir: Any,
    *,
    models_dir: str | Path,
    scalers_dir: str | Path,
    contract_path: str | Path,
    schema_path: str | Path,
    label_params: Mapping[str, Any],
    data_windows: Mapping[str, Any],
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Assemble a bundle from a finished run directory (or a ``TrainResult``); returns its path.

    Refuses (``BundleError``) a run whose files are missing, whose metrics name another contract than
    ``contract_path``, a schema that differs from the contract, or scalers fitted for another contract.
    ``data_windows`` is ``{split: {"start": iso, "end": iso, ...}}``.
    """
    run_dir = Path(getattr(train_result_or_run_dir, "out_dir", train_result_or_run_dir))
    models_dir, scalers_dir = Path(models_dir), Path(scalers_dir)
    contract_path, schema_path = Path(contract_path), Path(schema_path)

    missing = [str(run_dir / f) for f in RUN_FILES if not (run_dir / f).is_file()]
    missing += [str(scalers_dir / f) for f in SCALER_FILES if not (scalers_dir / f).is_file()]
    if missing:
        raise BundleError(f"cannot write a bundle from run {run_dir}: missing files {missing}")
    try:
        contract = read_contract(contract_path)
        _check_schema_matches(schema_path, contract)
        load_scalers(scalers_dir, contract.hash, contract)
        ckpt = load_best(run_dir / BEST_NAME)
    except (ContractError, CheckpointError) as exc:
        raise BundleError(f"cannot write a bundle from run {run_dir}: {exc}") from exc
    metrics = _read_json(run_dir / "metrics.json")
    run_hash = metrics.get("feature_contract_hash")
    if run_hash != contract.hash:
        raise BundleError(
            f"{run_dir / 'metrics.json'}: run was trained on feature contract {run_hash}, "
            f"{contract_path} has {contract.hash}"
        )
    arch = ckpt["arch"]
    spec = get_variant(arch["variant"])
    dims = contract.dims()
    created = datetime.now(UTC).replace(microsecond=0)
    metadata: dict[str, Any] = {
        "model_variant": spec.name,
        "feature_contract_hash": contract.hash,
        "supports_context_features": bool(
            contract.context_features and any(g.startswith("ctx") and dims[g] > 0 for g in spec.inputs)
        ),
        "ctx_cat_dim": dims["ctx_cat"],
        "ctx_cont_dim": dims["ctx_cont"],
        "ctx_cat_cardinalities": contract.ctx_cat_cardinalities,
        "input_dim": int(ckpt["input_dim"]),
        "seq_len": int(arch["seq_len"]),
        "heads": arch["heads"],
        "best_epoch": int(ckpt["epoch"]),
        "best_val_loss": float(ckpt["val_loss"]),
        "data_windows": dict(data_windows),
        "label_params": dict(label_params),
        "library_versions": library_versions(),
        "code_version": code_version(),
        "created_at": created.isoformat().replace("+00:00", "Z"),
        **dict(extra_metadata or {}),
    }
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / _bundle_name(models_dir, spec.name, created, contract.hash)
    with atomic_dir(target) as tmp:
        for name in RUN_FILES:
            _copy(run_dir / name, tmp / name)
        for name in SCALER_FILES:
            _copy(scalers_dir / name, tmp / name)
        _copy(contract_path, tmp / "feature_contract.json")
        _copy(schema_path, tmp / "feature_schema.txt")
        write_text_atomic(tmp / HASH_NAME, contract.hash + "\n")
        write_json_atomic(tmp / METADATA_NAME, metadata)
        write_json_atomic(tmp / MANIFEST_NAME, build_manifest(tmp))
    return target


def build_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """``{"algorithm": "sha256", "files": {name: {"sha256", "size"}}}`` over every file but the manifest."""
    bundle_dir = Path(bundle_dir)
    files = {}
    for p in sorted(bundle_dir.iterdir()):
        if p.name == MANIFEST_NAME or not p.is_file():
            continue
        files[p.name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return {"algorithm": "sha256", "files": files}


# -- checking and loading ---------------------------------------------------------------------


def check_manifest(bundle_dir: str | Path) -> list[str]:
    """Every problem with a bundle's files against its manifest; an empty list means intact.

    Checks: the manifest is readable; it lists every required file; every listed file exists with
    the recorded size and sha256; the directory holds nothing that is not listed (apart from the
    post-release records of :data:`POST_RELEASE_FILES`).
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        return [f"{bundle_dir}: not a directory"]
    manifest_path = bundle_dir / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        return [f"{manifest_path}: unreadable manifest: {exc}"]
    if manifest.get("algorithm", "sha256") != "sha256":
        return [f"{manifest_path}: unsupported hash algorithm {manifest.get('algorithm')!r}"]
    problems: list[str] = []
    problems += [f"{name}: required file not listed in the manifest" for name in BUNDLE_FILES if name not in files]
    for name, entry in sorted(files.items()):
        if "/" in name or "\\" in name or name in ("", ".", "..") or name == MANIFEST_NAME:
            problems.append(f"{name!r}: invalid file name in the manifest")
            continue
        path = bundle_dir / name
        if not path.is_file():
            problems.append(f"{name}: listed in the manifest but missing")
            continue
        try:
            size, digest = int(entry["size"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name}: malformed manifest entry {entry!r}")
            continue
        actual_size = path.stat().st_size
        if actual_size != size:
            problems.append(f"{name}: size {actual_size} != manifest {size}")
            continue
        actual = sha256_file(path)
        if actual != digest:
            problems.append(f"{name}: sha256 {actual} != manifest {digest}")
    for p in sorted(bundle_dir.iterdir()):
        if p.name != MANIFEST_NAME and p.name not in files and p.name not in POST_RELEASE_FILES:
            problems.append(f"{p.name}: present in the bundle but not listed in the manifest")
    return problems


def load_bundle(bundle_dir: str | Path, expected_hash: str | None = None, device: str | torch.device = "cpu") -> LoadedBundle:
    """Verify and load a bundle: manifest first, then contract, checkpoint, model and scalers.

    Raises ``BundleError`` listing every manifest problem before any pickle (joblib) is opened, and
    for a contract hash that differs from ``expected_hash`` or between the bundle's own files.
    """
    bundle_dir = Path(bundle_dir)
    problems = check_manifest(bundle_dir)
    if problems:
        raise BundleError(f"{bundle_dir}: bundle failed its manifest check: " + "; ".join(problems))
    try:
        contract = read_contract(bundle_dir / "feature_contract.json", expected_hash)
        schema = _check_schema_matches(bundle_dir / "feature_schema.txt", contract)
        stated = (bundle_dir / HASH_NAME).read_text(encoding="utf-8").strip()
        if stated != contract.hash:
            raise ContractError(f"{HASH_NAME} states {stated}, feature_contract.json hashes to {contract.hash}")
        metadata = _read_json(bundle_dir / METADATA_NAME)
        if metadata.get("feature_contract_hash") != contract.hash:
            raise ContractError(f"{METADATA_NAME} names contract {metadata.get('feature_contract_hash')}")
        ckpt = load_best(bundle_dir / BEST_NAME)
        arch = ckpt["arch"]
        if metadata.get("model_variant") != arch["variant"]:
            raise ContractError(
                f"{METADATA_NAME} names variant {metadata.get('model_variant')!r}, checkpoint {arch['variant']!r}"
            )
        model = build_model(arch)
        model.load_state_dict(ckpt["model_state_dict"], strict=True)
        scalers = load_scalers(bundle_dir, contract.hash, contract)
    except BundleError:
        raise
    except (ValueError, RuntimeError, OSError) as exc:  # ContractError / CheckpointError are ValueErrors
        raise BundleError(f"{bundle_dir}: {exc}") from exc
    dev = torch.device(device)
    model.to(dev)
    model.eval()
    return LoadedBundle(
        path=bundle_dir,
        model=model,
        arch=arch,
        variant=str(arch["variant"]),
        contract=contract,
        feature_contract_hash=contract.hash,
        schema=schema,
        scalers=scalers,
        metadata=metadata,
        train_config=_read_json(bundle_dir / "train_config.json"),
        metrics=_read_json(bundle_dir / "metrics.json"),
        checkpoint_epoch=int(ckpt["epoch"]),
        checkpoint_val_loss=float(ckpt["val_loss"]),
        device=dev,
    )


def list_bundles(models_dir: str | Path, variant: str | None = None) -> list[Path]:
    """Bundle directories under ``models_dir`` (optionally of one variant), newest first.

    Only directories named like a bundle and holding a manifest count; hidden temp directories of a
    write in progress (or of a crashed one) are ignored.
    """
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    found: list[tuple[str, int, str, Path]] = []
    for p in models_dir.iterdir():
        m = NAME_RE.match(p.name)
        if m is None or not p.is_dir() or not (p / MANIFEST_NAME).is_file():
            continue
        if variant is not None and m["variant"] != variant:
            continue
        found.append((m["ts"], int(m["n"] or 1), p.name, p))
    found.sort(reverse=True)
    return [p for *_, p in found]
