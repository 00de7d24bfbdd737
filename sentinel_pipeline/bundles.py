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
``bundle_metadata.json``    format version, variant, model family and batch kind, context support
                            and dims, seq_len, data windows, label parameters, library and code
                            versions, created_at
``metrics.json``            the run's metrics (per-epoch history, final validation evaluation)
``loss_curve.png``          train vs val loss per head
``train_log.txt``           the run's log
``manifest.json``           sha256 and size of every other file
``manifest.sig``            ed25519 signature of ``manifest.json`` by the training side's key
                            (:mod:`sentinel_pipeline.signing`)
``model.onnx``              the model exported to ONNX (``deployment.onnx_export``: pinned opset,
                            dynamic batch axis, heads + ``signal`` as outputs), present when
                            ``bundle_metadata.json["onnx"]["status"]`` is ``"exported"``; a family
                            that cannot export records ``"failed"`` and the reason instead
``records/``                (optional, added after release) verification and replay records, with
                            their own ``records/manifest.json``; see :func:`write_record`
=========================== ===============================================================

A model family may add files it needs at inference (``ModelFamily.bundle_files``, names from
``ModelFamily.bundle_file_names``, e.g. a symbol graph); they are covered by the manifest like the
others, and the entry rule allows exactly the names of the bundle's family.

Format versions (``bundle_metadata.json["bundle_format_version"]``, :data:`BUNDLE_FORMAT_VERSION`):
``1`` (no field: bundles written before model families) is a bundle of the window family, still loaded
and verified; ``2`` records ``model_family`` and ``batch_kind``; ``3`` records the ONNX export
(``onnx``: exported, or failed and why). Bundles of formats 1 and 2 load and verify as before and run
on torch only (``load_bundle(runtime="onnx")`` refuses them, saying so). A newer version, or a family that is
not registered here, is refused with a message naming the bundle and what to do
(:func:`bundle_format`).

Writing is atomic: the bundle is assembled in a hidden temp directory next to its final place and
renamed into place at the end (``atomic_io.atomic_dir``), so a crash never leaves anything that looks
like a bundle. Reading (:func:`load_bundle`, and verification) goes in this order: the signature of
``manifest.json`` against the trusted public keys (nothing else is read before it holds); the entry
rule (:func:`entry_problems`: exactly the bundle files, regular files only, no symlinks, nothing
unexpected, and a ``records/`` directory holding only known records); every file's sha256 against
the manifest (:func:`check_manifest`); then the contents. Nothing is unpickled on the way: the
scalers are rebuilt from ``scalers.json`` and the checkpoint is read with
``torch.load(weights_only=True)``; the joblib copies of the scalers are for users only.

Records (``verification.json``, ``replay_report.json``, ``replay_equity.png``) change after the
bundle is released, so they cannot be in the signed manifest. They live in ``records/`` with their
own manifest, which names the sha256 of the bundle manifest they belong to; an unlisted, changed or
symlinked record, or a record set of another bundle, is refused. Records are information, not trust:
replay and the backtest in Dagster trust the manifest digest in Dagster's event log.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sentinel_pipeline import __version__
from sentinel_pipeline.atomic_io import atomic_dir, atomic_path, write_json_atomic, write_text_atomic
from sentinel_pipeline.data.feature_contract import (
    FEATURE_GROUPS,
    ContractError,
    FeatureContract,
    read_contract,
    read_feature_schema,
)
from sentinel_pipeline.data.scalers import FittedScalers, load_scalers
from sentinel_pipeline.deployment.onnx_export import EXPORTED, ONNX_METADATA_KEY, ONNX_NAME, export_onnx
from sentinel_pipeline.safe_read import UnsafeFileError, read_regular, sha256_regular
from sentinel_pipeline.signing import (
    MAX_SMALL_FILE,
    SIGNATURE_NAME,
    SignatureError,
    load_signing_key,
    sign_manifest,
    verify_manifest_signature,
)
from sentinel_pipeline.training.checkpoints import BEST_NAME, CheckpointError, load_best
from sentinel_pipeline.training.families import FAMILIES, FamilyData, ModelFamily, get_family, get_variant

MANIFEST_NAME = "manifest.json"
METADATA_NAME = "bundle_metadata.json"
HASH_NAME = "feature_contract_hash.txt"
# records written after release (verification, replay): in RECORDS_DIR with their own manifest, never
# in the signed manifest and never loaded as part of the model
RECORDS_DIR = "records"
RECORD_FILES: tuple[str, ...] = ("verification.json", "verification.sig", "replay_report.json", "replay_equity.png")
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
REQUIRED_FILES: tuple[str, ...] = (*BUNDLE_FILES, MANIFEST_NAME, SIGNATURE_NAME)
# 1: before model families (no version field; window family); 2: model_family and batch_kind recorded;
# 3: the ONNX export recorded (bundle_metadata.json "onnx"; model.onnx when exported)
BUNDLE_FORMAT_VERSION = 3
ONNX_FORMAT_VERSION = 3  # the first format that carries the ONNX export
RUNTIMES: tuple[str, ...] = ("torch", "onnx")
LEGACY_FAMILY = "window_models"  # the family of a format-1 bundle
DATA_HALF_SCALERS_KEY = "data_half_scalers"  # bundle_metadata.json: sha256 of the data half's scaler files
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
    family: str = LEGACY_FAMILY  # the model family (ModelFamily.name)
    batch_kind: str = "windows"
    format_version: int = BUNDLE_FORMAT_VERSION
    family_data: FamilyData | None = None  # the family's extra inputs read from the bundle
    runtime: str = "torch"  # what ``model`` runs on: "torch" (nn.Module) or "onnx" (deployment.OnnxModel)


# -- helpers ----------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    """sha256 of a regular file; a symlink or a non-regular file raises ``UnsafeFileError``."""
    return sha256_regular(path, _CHUNK)[0]


def manifest_sha256(bundle_dir: str | Path) -> str | None:
    """sha256 of the bundle's ``manifest.json`` bytes (the bundle's identity); None when unreadable."""
    try:
        return hashlib.sha256(read_regular(Path(bundle_dir) / MANIFEST_NAME, MAX_SMALL_FILE)).hexdigest()
    except (OSError, UnsafeFileError):
        return None


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
        obj = json.loads(read_regular(path, MAX_SMALL_FILE))
    except (OSError, UnsafeFileError, UnicodeDecodeError, json.JSONDecodeError) as exc:
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
    signing_key: str | os.PathLike[str] | None = None,
    family_files: Mapping[str, str | os.PathLike[str]] | None = None,
    family_input_digests: Mapping[str, str] | None = None,
) -> Path:
    """Assemble a bundle from a finished run directory (or a ``TrainResult``); returns its path.

    The manifest is signed with the private key at ``signing_key`` (default: ``signing.signing_key_path``,
    generated on first use). ``bundle_metadata.json`` records the sha256 of the data half's scaler
    files it was built from (``data_half_scalers``), so verification can compare them with the data
    half of the day.

    Refuses (``BundleError``) a run whose files are missing, whose metrics name another contract than
    ``contract_path``, a schema that differs from the contract, or scalers fitted for another contract.
    ``data_windows`` is ``{split: {"start": iso, "end": iso, ...}}``. ``family_files`` (``{name: source
    path}``, names among the family's ``bundle_file_names``) are copied in and covered by the manifest;
    ``family_input_digests`` (the content identity of the family's inputs) go into the metadata.
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
    try:
        key = load_signing_key(signing_key)
    except (OSError, SignatureError) as exc:
        raise BundleError(f"cannot sign a bundle from run {run_dir}: {exc}") from exc
    scaler_digests = {name: sha256_file(scalers_dir / name) for name in SCALER_FILES}
    metrics = _read_json(run_dir / "metrics.json")
    run_hash = metrics.get("feature_contract_hash")
    if run_hash != contract.hash:
        raise BundleError(
            f"{run_dir / 'metrics.json'}: run was trained on feature contract {run_hash}, "
            f"{contract_path} has {contract.hash}"
        )
    arch = ckpt["arch"]
    try:
        spec = get_variant(arch["variant"])
    except ValueError as exc:
        raise BundleError(f"cannot write a bundle from run {run_dir}: {exc}") from exc
    extras = {str(k): Path(v) for k, v in (family_files or {}).items()}
    allowed = get_family(spec.family).bundle_file_names
    bad = sorted(n for n in extras if n not in allowed or n in REQUIRED_FILES or n != Path(n).name)
    if bad:
        raise BundleError(f"cannot write a bundle from run {run_dir}: family files {bad} are not among the "
                          f"bundle files family {spec.family!r} declares ({list(allowed)})")
    missing_extras = [str(p) for p in extras.values() if not p.is_file()]
    if missing_extras:
        raise BundleError(f"cannot write a bundle from run {run_dir}: family files {missing_extras} do not exist")
    dims = contract.dims()
    created = datetime.now(UTC).replace(microsecond=0)
    metadata: dict[str, Any] = {
        "bundle_format_version": BUNDLE_FORMAT_VERSION,
        "model_variant": spec.name,
        "model_family": spec.family,
        "batch_kind": spec.batch_kind,
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
        DATA_HALF_SCALERS_KEY: {"dir": str(scalers_dir.resolve()), "sha256": scaler_digests},
        **({"family_inputs": dict(family_input_digests)} if family_input_digests else {}),
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
        for name, src in sorted(extras.items()):
            _copy(src, tmp / name)
        metadata[ONNX_METADATA_KEY] = _export_onnx(ckpt, dims, tmp / ONNX_NAME)
        write_text_atomic(tmp / HASH_NAME, contract.hash + "\n")
        write_json_atomic(tmp / METADATA_NAME, metadata)
        for name in SCALER_FILES:  # the copies must be what was recorded (no change in between)
            if sha256_file(tmp / name) != scaler_digests[name]:
                raise BundleError(f"{scalers_dir / name} changed while the bundle was being written")
        write_json_atomic(tmp / MANIFEST_NAME, build_manifest(tmp))
        sign_manifest(tmp, key)
    return target


def _export_onnx(ckpt: Mapping[str, Any], dims: Mapping[str, int], path: Path) -> dict[str, Any]:
    """Export the checkpoint's model to ``path``; the metadata record of the export (failed: why)."""
    arch = ckpt["arch"]
    model = get_family(get_variant(arch["variant"]).family).build_model(arch)
    model.load_state_dict(ckpt["model_state_dict"], strict=True)
    return export_onnx(model, arch, dims, path).to_metadata()


def onnx_record(metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """``bundle_metadata.json["onnx"]`` (None for bundles before format 3 or a malformed entry)."""
    record = metadata.get(ONNX_METADATA_KEY)
    return dict(record) if isinstance(record, Mapping) else None


def _unverified_metadata(bundle_dir: str | Path) -> dict[str, Any] | None:
    """``bundle_metadata.json`` read for the entry rule, before anything is trusted (None: unreadable or
    not an object; the checks that read it report why)."""
    try:
        metadata = json.loads(read_regular(Path(bundle_dir) / METADATA_NAME, MAX_SMALL_FILE))
    except (OSError, UnsafeFileError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return metadata if isinstance(metadata, dict) else None


def _onnx_exported(bundle_dir: str | Path) -> bool:
    """Whether the bundle's (unverified) metadata records an ONNX export, i.e. ``model.onnx`` belongs to it."""
    record = onnx_record(_unverified_metadata(bundle_dir) or {})
    return bool(record) and record.get("status") == EXPORTED


def build_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """``{"algorithm": "sha256", "files": {name: {"sha256", "size"}}}`` over every bundle file (not the
    manifest, its signature or the records)."""
    bundle_dir = Path(bundle_dir)
    files = {}
    for p in sorted(bundle_dir.iterdir()):
        if p.name in (MANIFEST_NAME, SIGNATURE_NAME, RECORDS_DIR):
            continue
        digest, size = sha256_regular(p, _CHUNK)
        files[p.name] = {"sha256": digest, "size": size}
    return {"algorithm": "sha256", "files": files}


# -- checking and loading ---------------------------------------------------------------------


def bundle_format(metadata: Mapping[str, Any], bundle_dir: str | Path) -> tuple[int, ModelFamily]:
    """``(format version, model family)`` of a bundle from its ``bundle_metadata.json``.

    No ``bundle_format_version``: format 1, a window-family bundle written before model families.
    Raises ``BundleError`` naming the bundle and what to do for a version newer than
    :data:`BUNDLE_FORMAT_VERSION` (or not a positive integer), a family that is not registered, a variant
    that is not the family's, or a batch kind that differs from the family's."""
    where = f"{bundle_dir}: {METADATA_NAME}"
    version = metadata.get("bundle_format_version", 1)
    if type(version) is not int or version < 1:
        raise BundleError(f"{where}: bundle_format_version {version!r} is not a format version (a positive "
                          "integer); the bundle is damaged: retrain it")
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{where}: bundle format version {version} is newer than this sentinel-pipeline reads "
                          f"(formats 1..{BUNDLE_FORMAT_VERSION}); load it with the sentinel-pipeline version that "
                          "wrote it (or a newer one), or retrain the model with this one")
    family_name = LEGACY_FAMILY if version == 1 else metadata.get("model_family")
    family = FAMILIES.get(family_name) if isinstance(family_name, str) else None
    if family is None:
        raise BundleError(f"{where}: model family {family_name!r} is not registered in this sentinel-pipeline "
                          f"(registered: {sorted(FAMILIES)}); use a version that has the family (its module "
                          "listed in training/families FAMILY_MODULES), or retrain the model")
    variant = metadata.get("model_variant")
    if variant not in {spec.name for spec in family.variants}:
        raise BundleError(f"{where}: model_variant {variant!r} is not a variant of family {family.name!r} "
                          f"({[spec.name for spec in family.variants]})"
                          + (" (a format-1 bundle is a window-family bundle)" if version == 1 else ""))
    if version >= 2 and metadata.get("batch_kind") != family.batch_kind:
        raise BundleError(f"{where}: batch_kind {metadata.get('batch_kind')!r} is not family {family.name!r}'s "
                          f"({family.batch_kind!r})")
    return version, family


def family_file_names(bundle_dir: str | Path) -> tuple[str, ...]:
    """The file names the bundle may hold besides :data:`BUNDLE_FILES`: ``model.onnx`` and the extra files
    its family may add (``ModelFamily.bundle_file_names``; none when the metadata is unreadable or names
    no registered family: the checks that read it report why)."""
    # model.onnx is a bundle file name whatever the metadata says; whether the bundle must hold it
    # (the metadata records an export) is checked by entry_problems / check_manifest
    onnx = (ONNX_NAME,)
    metadata = _unverified_metadata(bundle_dir)
    if metadata is None:
        return onnx
    try:
        return (*bundle_format(metadata, bundle_dir)[1].bundle_file_names, *onnx)
    except BundleError:
        return onnx


def entry_problems(bundle_dir: str | Path, *, require_signature: bool = True) -> list[str]:
    """The unexpected-file rule, shared by verification and :func:`load_bundle` (an empty list: ok).

    The bundle directory is a real directory (not a symlink) holding exactly :data:`REQUIRED_FILES`,
    each a regular file (``lstat``: symlinks, directories, FIFOs, devices are refused), plus optionally
    ``records/``: a real directory holding only :data:`RECORD_FILES` and its ``manifest.json``, all
    regular files. The files the bundle's model family declares (``ModelFamily.bundle_file_names``) are
    allowed too; apart from ``bundle_metadata.json`` (which names the family), only names and types are
    looked at.
    """
    bundle_dir = Path(bundle_dir)
    try:
        st = os.lstat(bundle_dir)
    except OSError as exc:
        return [f"{bundle_dir}: {exc.strerror or exc}"]
    if stat.S_ISLNK(st.st_mode):
        return [f"{bundle_dir}: the bundle directory is a symlink"]
    if not stat.S_ISDIR(st.st_mode):
        return [f"{bundle_dir}: not a directory"]
    required = REQUIRED_FILES if require_signature else tuple(n for n in REQUIRED_FILES if n != SIGNATURE_NAME)
    extras = family_file_names(bundle_dir)
    problems: list[str] = []
    present: dict[str, os.stat_result] = {p.name: os.lstat(p) for p in bundle_dir.iterdir()}
    missing = [n for n in required if n not in present]
    if ONNX_NAME not in present and _onnx_exported(bundle_dir):
        missing.append(ONNX_NAME)  # the metadata records an export: the file is part of the bundle
    if missing:
        problems.append(f"missing {missing}")
    for name, entry in sorted(present.items()):
        if name in REQUIRED_FILES or name in extras:
            if not stat.S_ISREG(entry.st_mode):
                problems.append(f"{name}: {_kind(entry)}, not a regular file")
        elif name == RECORDS_DIR:
            problems += _records_entry_problems(bundle_dir / RECORDS_DIR, entry)
        else:
            problems.append(f"{name}: unexpected {_kind(entry)} in the bundle (not a bundle file)")
    return problems


def _kind(st: os.stat_result) -> str:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a file"
    return "a special file"


def _records_entry_problems(records: Path, st: os.stat_result) -> list[str]:
    if not stat.S_ISDIR(st.st_mode):
        return [f"{RECORDS_DIR}: {_kind(st)}, not a directory"]
    problems = []
    for p in sorted(records.iterdir()):
        entry = os.lstat(p)
        where = f"{RECORDS_DIR}/{p.name}"
        if p.name not in (*RECORD_FILES, MANIFEST_NAME):
            problems.append(f"{where}: unexpected {_kind(entry)} among the records")
        elif not stat.S_ISREG(entry.st_mode):
            problems.append(f"{where}: {_kind(entry)}, not a regular file")
    return problems


def check_manifest(bundle_dir: str | Path) -> list[str]:
    """Every problem with a bundle's files against its manifest; an empty list means intact.

    Checks: the manifest is readable; it lists every required file; every listed file is a regular
    file (no symlink) with the recorded size and sha256; the directory holds nothing that is not
    listed (apart from ``manifest.sig`` and the ``records/`` area, which has its own manifest:
    :func:`check_records`). This is integrity only: trust comes from :func:`check_signature`.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir() or bundle_dir.is_symlink():
        return [f"{bundle_dir}: not a directory"]
    manifest_path = bundle_dir / MANIFEST_NAME
    try:
        manifest = json.loads(read_regular(manifest_path, MAX_SMALL_FILE))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, UnsafeFileError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        return [f"{manifest_path}: unreadable manifest: {exc}"]
    if manifest.get("algorithm", "sha256") != "sha256":
        return [f"{manifest_path}: unsupported hash algorithm {manifest.get('algorithm')!r}"]
    problems: list[str] = []
    problems += [f"{name}: required file not listed in the manifest" for name in BUNDLE_FILES if name not in files]
    allowed = (*BUNDLE_FILES, *family_file_names(bundle_dir))
    if ONNX_NAME not in files and _onnx_exported(bundle_dir):
        problems.append(f"{ONNX_NAME}: {METADATA_NAME} records an ONNX export but the manifest does not list it")
    for name, entry in sorted(files.items()):
        if name not in allowed:
            problems.append(f"{name!r}: not a bundle file name; the manifest may list only {list(allowed)}")
            continue
        path = bundle_dir / name
        if not os.path.lexists(path):
            problems.append(f"{name}: listed in the manifest but missing")
            continue
        try:
            size, digest = int(entry["size"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name}: malformed manifest entry {entry!r}")
            continue
        try:
            actual, actual_size = sha256_regular(path, _CHUNK)
        except (OSError, UnsafeFileError) as exc:
            problems.append(f"{name}: {exc}")
            continue
        if actual_size != size:
            problems.append(f"{name}: size {actual_size} != manifest {size}")
        elif actual != digest:
            problems.append(f"{name}: sha256 {actual} != manifest {digest}")
    for p in sorted(bundle_dir.iterdir()):
        if p.name not in (MANIFEST_NAME, SIGNATURE_NAME, RECORDS_DIR) and p.name not in files:
            problems.append(f"{p.name}: present in the bundle but not listed in the manifest")
    return problems


def check_signature(bundle_dir: str | Path, trusted_keys: str | os.PathLike[str] | None = None) -> str:
    """The signer's key id when ``manifest.sig`` is a valid signature of ``manifest.json`` by a trusted
    key (``signing.trusted_keys_dir``); raises ``SignatureError`` (a ``BundleError``-compatible
    ``ValueError``) otherwise. Reads only the manifest and the signature."""
    return verify_manifest_signature(bundle_dir, trusted_keys)[1]


def trusted_bundle_problems(
    bundle_dir: str | Path, trusted_keys: str | os.PathLike[str] | None = None, *, records: bool = True
) -> list[str]:
    """Signature (first, before anything else is read), entry rule, manifest and (with ``records``)
    the records area: every problem found, in that order; stops after a signature failure. An empty
    list: the bundle is intact and signed by a trusted key."""
    try:
        check_signature(bundle_dir, trusted_keys)
    except (OSError, SignatureError) as exc:
        return [str(exc)]
    problems = entry_problems(bundle_dir)
    if problems:
        return problems
    return check_manifest(bundle_dir) + (check_records(bundle_dir) if records else [])


def load_bundle(
    bundle_dir: str | Path,
    expected_hash: str | None = None,
    device: str | torch.device = "cpu",
    *,
    trusted_keys: str | os.PathLike[str] | None = None,
    runtime: str = "torch",
    onnx_threads: int = 1,
) -> LoadedBundle:
    """Verify and load a bundle: signature, entry rule, manifest, then contract, checkpoint, model and
    scalers (rebuilt from ``scalers.json``; nothing is unpickled).

    Raises ``BundleError`` for an unsigned bundle or one signed by an untrusted key, for any file the
    entry rule refuses (extra files, symlinks, non-regular files), listing every manifest problem,
    for a contract hash that differs from ``expected_hash`` or between the bundle's own files, and for
    a format version or model family this code does not read (:func:`bundle_format`). The model is
    built by the bundle's family, which also reads its extra files (``LoadedBundle.family_data``).

    ``runtime="onnx"``: ``LoadedBundle.model`` is the bundle's ``model.onnx`` on ONNX Runtime
    (``deployment.onnx_model.OnnxModel``, ``onnx_threads`` intra-op threads), called like the torch
    model; its bytes are checked against the signed manifest as they are loaded. Refused (naming the
    bundle) when the bundle has no ONNX export: a format before 3, or an export that failed (its reason).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    bundle_dir = Path(bundle_dir)
    problems = trusted_bundle_problems(bundle_dir, trusted_keys)
    if problems:
        raise BundleError(f"{bundle_dir}: bundle refused: " + "; ".join(problems))
    try:
        contract = read_contract(bundle_dir / "feature_contract.json", expected_hash)
        schema = _check_schema_matches(bundle_dir / "feature_schema.txt", contract)
        stated = (bundle_dir / HASH_NAME).read_text(encoding="utf-8").strip()
        if stated != contract.hash:
            raise ContractError(f"{HASH_NAME} states {stated}, feature_contract.json hashes to {contract.hash}")
        metadata = _read_json(bundle_dir / METADATA_NAME)
        version, family = bundle_format(metadata, bundle_dir)
        if metadata.get("feature_contract_hash") != contract.hash:
            raise ContractError(f"{METADATA_NAME} names contract {metadata.get('feature_contract_hash')}")
        ckpt = load_best(bundle_dir / BEST_NAME)
        arch = ckpt["arch"]
        if metadata.get("model_variant") != arch["variant"]:
            raise ContractError(
                f"{METADATA_NAME} names variant {metadata.get('model_variant')!r}, checkpoint {arch['variant']!r}"
            )
        model = family.build_model(arch)
        model.load_state_dict(ckpt["model_state_dict"], strict=True)
        scalers = load_scalers(bundle_dir, contract.hash, contract)
        family_data = family.load_bundle_data(bundle_dir)
    except BundleError:
        raise
    except (ValueError, RuntimeError, OSError) as exc:  # ContractError / CheckpointError are ValueErrors
        raise BundleError(f"{bundle_dir}: {exc}") from exc
    dev = torch.device(device)
    model.to(dev)
    model.eval()
    if runtime == "onnx":
        model, dev = _onnx_model(bundle_dir, metadata, version, onnx_threads), torch.device("cpu")
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
        family=family.name,
        batch_kind=family.batch_kind,
        format_version=version,
        family_data=family_data,
        runtime=runtime,
    )


def _onnx_model(bundle_dir: Path, metadata: Mapping[str, Any], version: int, threads: int) -> Any:
    """The bundle's ``model.onnx`` on ONNX Runtime, its bytes checked against the signed manifest."""
    record = onnx_record(metadata)
    if record is None:
        raise BundleError(f"{bundle_dir}: bundle format {version} has no ONNX export (formats from "
                          f"{ONNX_FORMAT_VERSION} carry model.onnx); run it with runtime 'torch', or retrain")
    if record.get("status") != EXPORTED:
        raise BundleError(f"{bundle_dir}: the ONNX export of this bundle failed at training time: "
                          f"{record.get('reason')}; run it with runtime 'torch'")
    return open_onnx_model(bundle_dir, record, threads)


def open_onnx_model(bundle_dir: str | Path, record: Mapping[str, Any], threads: int = 1) -> Any:
    """``model.onnx`` of a bundle whose metadata ``record`` says it was exported, on ONNX Runtime
    (``deployment.onnx_model.OnnxModel``), its bytes checked against the manifest's sha256 as they are
    read. ``BundleError`` naming the file and the problem otherwise. The caller has checked the
    manifest's signature (``load_bundle``, verification)."""
    from sentinel_pipeline.deployment.onnx_model import OnnxModel, OnnxModelError

    bundle_dir = Path(bundle_dir)
    try:
        manifest = json.loads(read_regular(bundle_dir / MANIFEST_NAME, MAX_SMALL_FILE))
        expected = ((manifest.get("files") or {}).get(ONNX_NAME) or {}).get("sha256")
        return OnnxModel.from_file(bundle_dir / ONNX_NAME, record, expected_sha256=expected, threads=threads)
    except (OSError, UnsafeFileError, OnnxModelError, json.JSONDecodeError) as exc:
        raise BundleError(f"{bundle_dir}: {exc}") from exc


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


# -- post-release records ---------------------------------------------------------------------


def records_dir(bundle_dir: str | Path) -> Path:
    """Where a bundle's verification and replay records live (``<bundle>/records``)."""
    return Path(bundle_dir) / RECORDS_DIR


def _records_manifest(bundle_dir: Path) -> dict[str, Any]:
    path = records_dir(bundle_dir) / MANIFEST_NAME
    obj = json.loads(read_regular(path, MAX_SMALL_FILE))
    if not isinstance(obj, dict) or not isinstance(obj.get("files"), dict):
        raise BundleError(f"{path}: not a records manifest")
    return obj


def check_records(bundle_dir: str | Path) -> list[str]:
    """Problems of the ``records/`` area (an empty list: absent, or every record listed in its own
    manifest with its sha256 and size, and that manifest belongs to this bundle's manifest)."""
    bundle_dir = Path(bundle_dir)
    area = records_dir(bundle_dir)
    if not os.path.lexists(area):
        return []
    try:
        st = os.lstat(area)
    except OSError as exc:
        return [f"{RECORDS_DIR}: {exc}"]
    problems = _records_entry_problems(area, st)
    if problems:
        return problems
    names = sorted(p.name for p in area.iterdir() if p.name != MANIFEST_NAME)
    if not names and not (area / MANIFEST_NAME).exists():
        return []
    try:
        manifest = _records_manifest(bundle_dir)
    except (OSError, UnsafeFileError, UnicodeDecodeError, json.JSONDecodeError, BundleError) as exc:
        return [f"{RECORDS_DIR}/{MANIFEST_NAME}: unreadable records manifest: {exc}"]
    if manifest.get("bundle_manifest_sha256") != manifest_sha256(bundle_dir):
        problems.append(f"{RECORDS_DIR}/{MANIFEST_NAME} belongs to bundle manifest "
                        f"{manifest.get('bundle_manifest_sha256')}, not to this bundle's {manifest_sha256(bundle_dir)}")
    files = manifest["files"]
    for name in names:
        entry = files.get(name)
        if not isinstance(entry, dict):
            problems.append(f"{RECORDS_DIR}/{name}: not listed in the records manifest")
            continue
        try:
            digest, size = sha256_regular(area / name, _CHUNK)
        except (OSError, UnsafeFileError) as exc:
            problems.append(f"{RECORDS_DIR}/{name}: {exc}")
            continue
        if (digest, size) != (entry.get("sha256"), entry.get("size")):
            problems.append(f"{RECORDS_DIR}/{name}: sha256/size differ from the records manifest")
    problems += [f"{RECORDS_DIR}/{name}: listed in the records manifest but missing"
                 for name in sorted(set(files) - set(names))]
    return problems


def write_record(bundle_dir: str | Path, name: str, data: bytes) -> Path:
    """Write the record ``name`` (one of :data:`RECORD_FILES`) into ``records/`` and update the records
    manifest (each file atomically). Records listed for another bundle manifest are not carried over:
    left on disk unlisted, they make :func:`check_records` refuse the area (a bundle whose manifest
    changed is a tampered one)."""
    if name not in RECORD_FILES:
        raise BundleError(f"{name!r} is not a record name ({list(RECORD_FILES)})")
    bundle_dir = Path(bundle_dir)
    digest = manifest_sha256(bundle_dir)
    if digest is None:
        raise BundleError(f"{bundle_dir}: no readable {MANIFEST_NAME}: not a bundle")
    area = records_dir(bundle_dir)
    if os.path.lexists(area) and not stat.S_ISDIR(os.lstat(area).st_mode):
        raise BundleError(f"{area}: not a directory")
    area.mkdir(exist_ok=True)
    files: dict[str, Any] | None = None
    try:
        old = _records_manifest(bundle_dir)
        if old.get("bundle_manifest_sha256") == digest:
            files = dict(old["files"])
    except (OSError, UnsafeFileError, UnicodeDecodeError, json.JSONDecodeError, BundleError):
        files = None
    if files is None:  # records of another (or no) bundle manifest are not carried over (left unlisted)
        files = {}
    with atomic_path(area / name) as tmp:
        Path(tmp).write_bytes(data)
    files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    files = {k: v for k, v in files.items() if k in RECORD_FILES and os.path.lexists(area / k)}
    write_json_atomic(area / MANIFEST_NAME, {"bundle_manifest_sha256": digest, "files": files})
    return area / name


def read_record(bundle_dir: str | Path, name: str) -> bytes:
    """The bytes of record ``name`` after :func:`check_records` found the area intact; ``BundleError``
    naming the problem otherwise (``FileNotFoundError`` when the record does not exist)."""
    path = records_dir(bundle_dir) / name
    if not os.path.lexists(path):
        raise FileNotFoundError(path)
    problems = check_records(bundle_dir)
    if problems:
        raise BundleError(f"{bundle_dir}: records refused: " + "; ".join(problems))
    return read_regular(path, MAX_SMALL_FILE * 4)
