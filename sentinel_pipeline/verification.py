"""Bundle verification: the gate that decides whether a trained model bundle may be trusted.

:func:`verify_bundle` runs eleven checks, in order, on a bundle directory written by
``bundles.write_bundle`` and returns a :class:`VerificationReport`. It never raises for a bad
bundle: a missing file, a JSON that does not parse or an exception while loading becomes a failed
check with the reason. A check that needs an earlier one that failed is reported as failed with
``skipped: needs <check>`` (:data:`CHECK_NEEDS`: ``manifest`` needs ``signature`` and
``files_present``, ``contract_hash`` needs ``manifest``, ``metadata_agrees`` and ``scalers_load``
need ``contract_hash``, ``model_loads`` and ``metrics_sane`` need ``metadata_agrees`` (the
checkpoint it loaded), ``metrics_reproduced`` needs ``model_loads`` and ``metrics_sane``, and
``quality_gates`` and ``onnx_parity`` need ``model_loads``). No file's contents are read before ``signature`` passed,
and nothing is ever unpickled: the scalers come from ``scalers.json``, the checkpoint from
``torch.load(weights_only=True)``.

======================  ==============================================================================
check                   passes when
======================  ==============================================================================
``signature``           ``manifest.sig`` is a valid ed25519 signature of ``manifest.json``'s bytes by a
                        key in the trusted-keys directory (``signing.trusted_keys_dir``, outside the
                        bundle). Unsigned bundles (written before signing) fail with how to re-sign
                        or retrain.
``files_present``       ``bundles.entry_problems``: exactly ``bundles.REQUIRED_FILES``, each a regular
                        file (``lstat``: no symlinks, FIFOs, directories), plus optionally ``records/``
                        holding only known records; names and types only, nothing is read
``manifest``            ``bundles.check_manifest`` finds every file with its recorded sha256 and size
                        (files opened with ``O_NOFOLLOW``), and the records match their own manifest,
                        which belongs to this bundle manifest
``contract_hash``       ``feature_contract_hash.txt`` == the hash recomputed from ``feature_contract.json``
                        == ``expected_hash``, and ``feature_schema.txt`` lists the contract's names in order
``metadata_agrees``     ``bundle_metadata.json`` agrees with the contract (``supports_context_features``
                        == context on and the variant reads a non-empty ctx group, as ``write_bundle``
                        defines it; ``ctx_cat_dim``, ``ctx_cont_dim``, cardinalities, contract hash,
                        ``input_dim``, heads), ``model_variant`` is a known variant, ``seq_len`` equals the
                        checkpoint's and is at most the contract's (training may use shorter windows),
                        the checkpoint (``torch.load(weights_only=True)``) has exactly the expected keys and
                        its architecture is the one ``models.resolve_arch`` derives from the contract, and
                        ``train_config.json`` names the same variant, architecture and contract
``model_loads``         the checkpoint's architecture is built and its state dict loads with
                        ``strict=True``; a forward pass on the first (up to) :data:`FORWARD_SAMPLES`
                        validation samples (``val_h5``, read with the training loader) gives finite outputs
                        of every head's shape ((B,) regression, (B, 3) classification). Without ``val_h5``
                        the ``val_h5`` recorded in the bundle's ``train_config.json`` is used when that file
                        still exists; otherwise the check fails and says so.
``scalers_load``        both scalers are rebuilt from ``scalers.json`` (plain JSON; the joblib copies
                        are never unpickled) for the bundle's contract, scaling a row of zeros is finite,
                        the bundle's scaler files are the data half's recorded at bundle time
                        (``bundle_metadata.json`` ``data_half_scalers``) and, with ``scalers_dir`` (the
                        pipeline's), their parameters equal the data half's of today, which scaled the
                        splits verification reads
``metrics_sane``        ``metrics.json`` has no NaN/Inf anywhere (recursively), describes this model
                        (variant, contract hash, best epoch and best val loss equal the checkpoint's), the
                        best validation loss of the history is lower than the untrained model's
                        (``initial_val_loss``, evaluated before epoch 1; bundles without it: lower than
                        the first epoch's), and the train and val sample eligibility is consistent with
                        its counts (``0 < samples <= rows``, rate = samples / rows). No upper bound below
                        1: years of clean bars legitimately give rates above 0.99 (the old ceiling of 0.99
                        failed every long crypto series for that reason alone).
``metrics_reproduced``  a forward pass over the whole validation split (what ``final_val`` describes;
                        ``limit_samples`` of the run applied) reproduces ``metrics.json``: the sample
                        count exactly; the best checkpoint's validation loss and, per head, ``mse``,
                        ``ic``, ``rank_ic`` (regression) or ``accuracy``, ``macro_f1`` (classification)
                        within relative :data:`METRICS_RTOL` (1e-4; :data:`METRICS_RTOL_AMP` for bf16
                        runs). Edited metrics or rewritten weights fail here.
``quality_gates``       the statistical skill gates of :mod:`~sentinel_pipeline.evaluation.skill_gates`,
                        scored by a forward pass over the **gate split** (``gate_h5``; default: the
                        ``test.h5`` beside the validation split), which neither training nor checkpoint
                        selection ever read. Needs only ``model_loads``, so the evidence is recorded even for
                        a bundle that fails an earlier bookkeeping check.
``onnx_parity``         the bundle's ``model.onnx`` (``bundle_metadata.json["onnx"]``: a format-3 bundle
                        records its export; an export that failed fails here with its reason) loads in
                        ONNX Runtime (bytes checked against the manifest, no external data, standard
                        operators only) and agrees with the torch model on the validation split (at
                        most :data:`PARITY_MAX_SAMPLES`, earliest first) at fixed ORT threads: values
                        within tolerance, the same signal signs, entry decisions at the replay and
                        backtest thresholds, and the same backtest trade list
                        (:func:`sentinel_pipeline.deployment.onnx_parity.onnx_parity`). Bundles of
                        formats 1-2 predate the export: the check passes and says they run on torch only.
======================  ==============================================================================

Quality gates (defaults :data:`DEFAULT_GATES`; override per variant with a ``gates`` mapping or a
JSON/YAML file ``{variant: {field: value}}``, see :func:`load_gates`; a field set to ``null`` switches
that gate off). Every gate reports the number it tested, its bound, the sample size and the number
of independent label windows it rests on (``VerificationReport.gate_results``); too little data is
a failure that says so, never a pass.

- every variant: **directional skill**, the HAC (Newey-West, lag >= the label horizon) t-statistic
  of the mean per-timestamp cross-sectional rank IC between the trading signal
  (``models.signal_from_outputs``) and the forward return over the label horizon (time-series IC
  pooled per symbol where timestamps have fewer than ``min_symbols`` symbols), at least
  :data:`DEFAULT_MIN_DIRECTIONAL_T`. The threshold is calibrated, not nominal: on null markets
  (``signal_strength 0``) the nominal one-sided 1.645 was exceeded by 16 % of no-skill feature
  signals, because a 20-bar horizon leaves only ~25 independent windows in the test split and
  momentum-like signals make the IC series heavy-tailed (``bench/calibrate_gate.py``, README).
- regression variants: **MSE below the train-mean predictor's** with confidence (paired HAC t of the
  squared-error difference >= :data:`DEFAULT_MIN_MSE_T`, one-sided 95 %) on targets winsorised at the
  gate split's 1 % / 99 % quantiles.
- classifiers: **accuracy and macro-F1 above the 95 % quantile of a shift null** (the predictions
  shifted in time by a common offset of at least the label horizon, up to 200 offsets). The
  majority-class baseline of ``metrics.json`` stays as information only.

Verification records: :func:`write_verification_record` writes ``records/verification.json`` into the
bundle (``bundles.write_record``: the records' own manifest, never the signed one). Records are
information: anyone who can write ``models/`` can rewrite them. :func:`require_verified` (replay, the
backtest) always checks the signature, the files and the manifest; with ``verified_manifest_sha256``
(the Dagster path passes the digest its event log recorded for the passing ``bundle_verified``
evaluation) the current manifest must have exactly that digest; without it (plain Python), the record
must have passed on the current manifest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from sentinel_pipeline.bundle_archive import ArchiveError, is_archive, unpacked_bundle
from sentinel_pipeline.bundles import (
    DATA_HALF_SCALERS_KEY,
    HASH_NAME,
    MANIFEST_NAME,
    METADATA_NAME,
    RECORD_FILES,
    RECORDS_DIR,
    BundleError,
    bundle_format,
    check_manifest,
    check_records,
    check_signature,
    entry_problems,
    manifest_sha256,
    read_record,
    sha256_file,
    trusted_bundle_problems,
    write_record,
)
from sentinel_pipeline.bundles import SCALER_FILES as BUNDLE_SCALER_FILES
from sentinel_pipeline.data.feature_contract import (
    FEATURE_GROUPS,
    FeatureContract,
    read_contract,
    read_feature_schema,
)
from sentinel_pipeline.data.scalers import (
    INFO_FILE,
    SCALED_GROUPS,
    load_scalers,
    read_scaler_info,
    scaler_parameter_differences,
)
from sentinel_pipeline.data.split_arrays import SplitArrays
from sentinel_pipeline.signing import SignatureError, load_signing_key, sign_bytes, verify_signed_bytes
from sentinel_pipeline.training.checkpoints import BEST_NAME, load_best
from sentinel_pipeline.training.data_loader import chronological_end_rows, load_split_for_training
from sentinel_pipeline.training.families import VARIANTS, FamilyData, ModelFamily, VariantSpec, get_family

RECORD_NAME = "verification.json"
RECORD_SIGNATURE_NAME = "verification.sig"
log = logging.getLogger(__name__)
assert RECORD_NAME in RECORD_FILES
CHECK_NAMES: tuple[str, ...] = (
    "signature",
    "files_present",
    "manifest",
    "contract_hash",
    "metadata_agrees",
    "model_loads",
    "scalers_load",
    "metrics_sane",
    "metrics_reproduced",
    "quality_gates",
    "onnx_parity",
)
# the checks each check needs to have passed first; nothing reads a bundle file's contents before
# ``signature`` has passed (``files_present`` only lists names and types)
CHECK_NEEDS: dict[str, tuple[str, ...]] = {
    "signature": (),
    "files_present": (),
    "manifest": ("signature", "files_present"),
    "contract_hash": ("manifest",),
    "metadata_agrees": ("contract_hash",),
    "model_loads": ("metadata_agrees",),
    "scalers_load": ("contract_hash",),
    "metrics_sane": ("metadata_agrees",),
    "metrics_reproduced": ("model_loads", "metrics_sane"),
    "quality_gates": ("model_loads",),
    "onnx_parity": ("model_loads",),
}
# ONNX parity is checked on at most this many validation samples (the earliest, in time order)
PARITY_MAX_SAMPLES = 20_000
FORWARD_SAMPLES = 256
GATE_SPLIT_FILE = "test.h5"
CONFIG_NAME = "train_config.json"
METRICS_NAME = "metrics.json"
# metrics.json's final validation metrics must be reproduced by verification's own forward pass:
# relative tolerance (plus a small absolute one for values near 0). A float32 CPU forward pass in
# other batch sizes differs by ~1e-6 relative; runs trained with bf16 autocast get the looser one.
METRICS_RTOL = 1e-4
METRICS_ATOL = 1e-6
METRICS_RTOL_AMP = 2e-2
REPRODUCED_REGRESSION_METRICS: tuple[str, ...] = ("mse", "ic", "rank_ic")
REPRODUCED_CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "macro_f1")


class BundleNotVerifiedError(BundleError):
    """A bundle has no passing verification record, or changed after it was verified."""


class CheckFailed(Exception):
    """Raised inside a check to fail it with a reason (never leaves this module)."""


# -- reports ----------------------------------------------------------------------------------


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class VerificationReport:
    passed: bool
    checks: list[CheckOutcome]
    bundle_dir: str
    expected_hash: str
    verified_at: str  # ISO-8601 UTC
    manifest_digest: str | None  # sha256 of manifest.json's bytes; None when it could not be read
    gate_results: list[dict[str, Any]] = field(default_factory=list)  # skill_gates.GateResult dicts
    onnx_parity: dict[str, Any] = field(default_factory=dict)  # deployment.onnx_parity.ParityReport dict

    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def check(self, name: str) -> CheckOutcome:
        for outcome in self.checks:
            if outcome.name == name:
                return outcome
        raise KeyError(f"no check named {name!r} in the report (checks: {[c.name for c in self.checks]})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "bundle_dir": self.bundle_dir,
            "expected_hash": self.expected_hash,
            "verified_at": self.verified_at,
            "manifest_digest": self.manifest_digest,
            "failed_checks": self.failed_checks,
            "checks": [c.to_dict() for c in self.checks],
            "gate_results": self.gate_results,
            "onnx_parity": self.onnx_parity,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VerificationReport:
        return cls(
            passed=bool(d["passed"]),
            checks=[CheckOutcome(str(c["name"]), bool(c["passed"]), str(c["detail"])) for c in d["checks"]],
            bundle_dir=str(d["bundle_dir"]),
            expected_hash=str(d["expected_hash"]),
            verified_at=str(d["verified_at"]),
            manifest_digest=d.get("manifest_digest"),
            gate_results=list(d.get("gate_results") or []),
            onnx_parity=dict(d.get("onnx_parity") or {}),
        )

    def render(self) -> str:
        """Readable text: a header, then one line per check with PASS/FAIL and why."""
        width = max(len(n) for n in CHECK_NAMES)
        lines = [
            f"bundle verification {'PASSED' if self.passed else 'FAILED'}: {self.bundle_dir}",
            f"  expected contract hash {self.expected_hash}; manifest sha256 {self.manifest_digest}; at {self.verified_at}",
        ]
        for c in self.checks:
            lines.append(f"  {'PASS' if c.passed else 'FAIL'}  {c.name:<{width}}  {c.detail}")
        if not self.passed:
            lines.append(f"  failed checks: {', '.join(self.failed_checks)}")
        return "\n".join(lines)


# -- quality gates ----------------------------------------------------------------------------


# Directional-skill threshold: the HAC t that no-skill signals exceed in at most 5 % of draws on the
# null market (measured by bench/calibrate_gate.py; see the README's calibration table).
DEFAULT_MIN_DIRECTIONAL_T = 3.0
DEFAULT_MIN_MSE_T = 1.645


@dataclass(frozen=True)
class QualityGates:
    """The statistical gates of one variant, scored on the gate split (``None`` switches a gate off).

    - ``min_directional_t``: HAC t of the signal's rank IC vs the label-horizon forward return
      (``skill_gates.directional_skill``), every variant.
    - ``min_mse_t``: paired HAC t of squared-error(train mean) - squared-error(model) on the
      winsorised target of ``head`` (``None``: the signal head), regression variants.
    - ``null_quantile``: accuracy and macro-F1 must exceed this quantile of the shift null
      (``n_shifts`` offsets), classifier variants.
    - ``hac_lag``: Newey-West lag in timestamps (``None`` or less than the label horizon: the horizon);
      ``min_windows``: the fewest independent label windows a verdict may rest on ("not enough data"
      below); ``min_symbols``: the fewest symbols per timestamp for a cross-sectional IC (else the
      pooled time-series IC); ``winsor_quantile``: targets are clipped at this quantile and its mirror.
    - ``horizon``: the forward-return horizon (bars) the gates score against (``None``: the split's label
      horizon); a ranking family gates its 5-day head on ``fwd_ret_5`` whatever the triple barrier's horizon.

    A family's ``gate_defaults`` are laid over these defaults for its variants.
    """

    head: str | None = None
    horizon: int | None = None
    min_directional_t: float | None = DEFAULT_MIN_DIRECTIONAL_T
    min_mse_t: float | None = None
    null_quantile: float | None = None
    n_shifts: int = 200
    hac_lag: int | None = None
    min_windows: int = 10
    min_symbols: int = 5
    winsor_quantile: float = 0.01

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REGRESSION_GATES = QualityGates(min_mse_t=DEFAULT_MIN_MSE_T)
CLASSIFIER_GATES = QualityGates(null_quantile=0.95)
DEFAULT_GATES: dict[str, QualityGates] = {
    name: dataclasses.replace(CLASSIFIER_GATES if spec.classifier else REGRESSION_GATES,
                              **dict(get_family(spec.family).gate_defaults))
    for name, spec in VARIANTS.items()
}
GATE_FIELDS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(QualityGates))

GateOverrides = Mapping[str, QualityGates | Mapping[str, Any]] | str | os.PathLike[str] | None


def _gates_from(base: QualityGates, value: QualityGates | Mapping[str, Any], where: str) -> QualityGates:
    if isinstance(value, QualityGates):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping of gate fields, got {type(value).__name__}")
    unknown = sorted(str(k) for k in set(value) - GATE_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown gate fields {unknown}; known fields are {sorted(GATE_FIELDS)}")
    for key, v in value.items():
        if key == "head":
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{where}: 'head' must be a head name or null, got {v!r}")
        elif v is not None and (
            isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
        ):
            raise ValueError(f"{where}: gate {key!r} must be a finite number or null, got {v!r}")
    gates = dataclasses.replace(base, **dict(value))
    _validate_gates(gates, where)
    return gates


def _validate_gates(g: QualityGates, where: str) -> None:
    problems = []
    if g.null_quantile is not None and not 0.5 <= g.null_quantile < 1:
        problems.append(f"null_quantile must be in [0.5, 1), got {g.null_quantile!r}")
    if not 0 <= g.winsor_quantile < 0.5:
        problems.append(f"winsor_quantile must be in [0, 0.5), got {g.winsor_quantile!r}")
    for name in ("n_shifts", "min_windows", "min_symbols"):
        v = getattr(g, name)
        if v is None or int(v) != v or v < 1:
            problems.append(f"{name} must be an integer >= 1, got {v!r}")
    if g.horizon is not None and (int(g.horizon) != g.horizon or g.horizon < 1):
        problems.append(f"horizon must be an integer >= 1 or null, got {g.horizon!r}")
    if g.hac_lag is not None and (int(g.hac_lag) != g.hac_lag or g.hac_lag < 0):
        problems.append(f"hac_lag must be an integer >= 0 or null, got {g.hac_lag!r}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


def resolve_gates(overrides: GateOverrides = None) -> dict[str, QualityGates]:
    """:data:`DEFAULT_GATES` with ``overrides`` laid over them, per variant.

    ``overrides``: ``None``; a ``{variant: QualityGates | {field: value}}`` mapping (fields given in a
    mapping replace only those fields of the default); or the path of a JSON/YAML file holding such a
    mapping (:func:`load_gates`). Invalid overrides raise ``ValueError``.
    """
    gates = dict(DEFAULT_GATES)
    if overrides is None:
        return gates
    if isinstance(overrides, str | os.PathLike):
        return load_gates(overrides)
    if not isinstance(overrides, Mapping):
        raise ValueError(f"gates must be a mapping of variant -> gates, got {type(overrides).__name__}")
    unknown = sorted(str(k) for k in set(overrides) - set(VARIANTS))
    if unknown:
        raise ValueError(f"quality gates given for unknown variants {unknown}; known: {sorted(VARIANTS)}")
    for name, value in overrides.items():
        gates[name] = _gates_from(gates[name], value, f"quality gates of {name!r}")
    return gates


def load_gates(path: str | os.PathLike[str]) -> dict[str, QualityGates]:
    """Read ``{variant: {field: value}}`` from a JSON (``.json``) or YAML file over the defaults."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read quality gates: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{path}: quality gates must be a mapping of variant -> gates, got {type(data).__name__}"
        )
    try:
        return resolve_gates(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def gated_head(spec: VariantSpec, gates: QualityGates) -> str:
    """The head a variant's gates apply to (see :class:`QualityGates`)."""
    if gates.head is not None:
        return gates.head
    if spec.classifier:
        return next(h.name for h in spec.heads if h.kind == "classification")
    return spec.heads[0].name


# -- the checks -------------------------------------------------------------------------------




def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckFailed(f"{path.name}: cannot read JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckFailed(f"{path.name}: expected a JSON object, got {type(obj).__name__}")
    return obj


def manifest_problems(bundle_dir: str | Path, trusted_keys: str | os.PathLike[str] | None = None) -> list[str]:
    """``bundles.trusted_bundle_problems``: signature first, then the entry rule, the manifest and
    the records' own manifest."""
    return trusted_bundle_problems(bundle_dir, trusted_keys)


def _nonfinite_paths(obj: Any, path: str = "") -> list[str]:
    """JSON paths of every NaN/Inf number inside ``obj`` (dicts and lists, recursively)."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [path or "<root>"]
    if isinstance(obj, Mapping):
        return [p for k, v in obj.items() for p in _nonfinite_paths(v, f"{path}.{k}" if path else str(k))]
    if isinstance(obj, list | tuple):
        return [p for i, v in enumerate(obj) for p in _nonfinite_paths(v, f"{path}[{i}]")]
    return []


def _mismatches(pairs: list[tuple[str, Any, Any]]) -> list[str]:
    return [
        f"{what} is {actual!r}, expected {expected!r}"
        for what, actual, expected in pairs
        if actual != expected
    ]


@dataclass
class _Context:
    bundle_dir: Path
    expected_hash: str
    val_h5: Path | None
    gates: dict[str, QualityGates]
    contract: FeatureContract | None = None
    checkpoint: dict[str, Any] = field(default_factory=dict)
    spec: VariantSpec | None = None
    family: ModelFamily | None = None  # the bundle's model family (bundles.bundle_format)
    family_data: FamilyData | None = None  # its extra inputs, read from the bundle
    metrics: dict[str, Any] = field(default_factory=dict)
    gate_h5: Path | None = None
    model: torch.nn.Module | None = None
    gate_results: list[dict[str, Any]] = field(default_factory=list)
    trusted_keys: Path | None = None
    scalers_dir: Path | None = None
    signer: str | None = None
    onnx_parity: dict[str, Any] = field(default_factory=dict)
    val_split: tuple[Path, SplitArrays, str] | None = None  # _validation_split

    def file(self, name: str) -> Path:
        return self.bundle_dir / name


def _check_signature(ctx: _Context) -> str:
    try:
        ctx.signer = check_signature(ctx.bundle_dir, ctx.trusted_keys)
    except (OSError, SignatureError) as exc:
        raise CheckFailed(str(exc)) from exc
    return f"{MANIFEST_NAME} is signed by trusted key {ctx.signer}"


def _check_files_present(ctx: _Context) -> str:
    problems = entry_problems(ctx.bundle_dir)
    if problems:
        raise CheckFailed("; ".join(problems))
    records = sorted(p.name for p in (ctx.bundle_dir / RECORDS_DIR).glob("*")) if (
        ctx.bundle_dir / RECORDS_DIR).is_dir() else []
    n_files = sum(1 for p in ctx.bundle_dir.iterdir() if p.name != RECORDS_DIR)
    return f"all {n_files} bundle files present, regular files, nothing else" + (
        f" (+ {RECORDS_DIR}/ {records})" if records else ""
    )


def _check_manifest(ctx: _Context) -> str:
    problems = check_manifest(ctx.bundle_dir) + check_records(ctx.bundle_dir)
    if problems:
        raise CheckFailed("; ".join(problems))
    listed = len(_read_json_object(ctx.file(MANIFEST_NAME)).get("files") or {})
    return f"sha256 and size of all {listed} files match the signed {MANIFEST_NAME}"


def _check_contract_hash(ctx: _Context) -> str:
    try:
        stated = ctx.file(HASH_NAME).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckFailed(f"{HASH_NAME}: cannot read: {exc}") from exc
    # raises ContractError when the file's own stated hash disagrees with its content
    contract = read_contract(ctx.file("feature_contract.json"))
    problems = []
    if stated != contract.hash:
        problems.append(f"{HASH_NAME} states {stated}, feature_contract.json hashes to {contract.hash}")
    if contract.hash != ctx.expected_hash:
        problems.append(f"feature_contract.json hashes to {contract.hash}, expected {ctx.expected_hash}")
    schema = read_feature_schema(ctx.file("feature_schema.txt"))
    for group in FEATURE_GROUPS:
        if schema[group] != contract.names(group):
            problems.append(
                f"feature_schema.txt {group} features {schema[group]} != contract {contract.names(group)}"
            )
    if problems:
        raise CheckFailed("; ".join(problems))
    ctx.contract = contract
    return f"contract hash {contract.hash} (file, contract and expected agree); schema lists its {len(contract.features)} features in order"


def _check_metadata_agrees(ctx: _Context) -> str:
    contract = ctx.contract
    assert contract is not None
    meta = _read_json_object(ctx.file(METADATA_NAME))
    try:  # format version, registered family, the variant one of the family's
        version, family = bundle_format(meta, ctx.bundle_dir)
    except BundleError as exc:
        raise CheckFailed(str(exc)) from exc
    variant = meta.get("model_variant")
    spec = family.variant(variant)
    dims = contract.dims()
    supports_ctx = contract.context_features and any(g.startswith("ctx") and dims[g] > 0 for g in spec.inputs)
    ckpt = load_best(ctx.file(BEST_NAME))  # weights_only=True, exact keys
    arch = ckpt["arch"]
    seq_len = meta.get("seq_len")
    problems = _mismatches(
        [
            (f"{METADATA_NAME} feature_contract_hash", meta.get("feature_contract_hash"), contract.hash),
            (
                f"{METADATA_NAME} supports_context_features",
                meta.get("supports_context_features"),
                supports_ctx,
            ),
            (f"{METADATA_NAME} ctx_cat_dim", meta.get("ctx_cat_dim"), dims["ctx_cat"]),
            (f"{METADATA_NAME} ctx_cont_dim", meta.get("ctx_cont_dim"), dims["ctx_cont"]),
            (
                f"{METADATA_NAME} ctx_cat_cardinalities",
                meta.get("ctx_cat_cardinalities"),
                contract.ctx_cat_cardinalities,
            ),
            (f"{METADATA_NAME} input_dim", meta.get("input_dim"), dims[spec.primary_group]),
            (f"{METADATA_NAME} heads", meta.get("heads"), [h.to_dict() for h in spec.heads]),
            (f"{BEST_NAME} arch variant", arch.get("variant"), variant),
            (f"{BEST_NAME} input_dim", ckpt["input_dim"], dims[spec.primary_group]),
            (f"{BEST_NAME} arch seq_len", arch.get("seq_len"), seq_len),
        ]
    )
    if not (type(seq_len) is int and 1 <= seq_len <= contract.seq_len):
        problems.append(
            f"{METADATA_NAME} seq_len {seq_len!r} is not within 1..{contract.seq_len} (the contract's)"
        )
    if not problems:
        hyper = {k: arch[k] for k in spec.default_arch if k in arch}
        expected_arch = family.resolve_arch(spec, dims, contract.ctx_cat_cardinalities, seq_len, hyper)
        problems += [
            f"{BEST_NAME} arch {key} is {arch.get(key)!r}, the contract gives {expected_arch.get(key)!r}"
            for key in sorted(set(arch) | set(expected_arch))
            if arch.get(key) != expected_arch.get(key)
        ]
        problems += _mismatches([(f"{BEST_NAME} hidden_dim", ckpt["hidden_dim"], arch.get("hidden_dim"))])
    config = _read_json_object(ctx.file(CONFIG_NAME))
    problems += _mismatches(
        [
            (f"{CONFIG_NAME} model", config.get("model"), variant),
            (f"{CONFIG_NAME} feature_contract_hash", config.get("feature_contract_hash"), contract.hash),
            (f"{CONFIG_NAME} arch", config.get("arch"), arch),
        ]
    )
    if problems:
        raise CheckFailed("; ".join(problems))
    ctx.checkpoint, ctx.spec, ctx.family = ckpt, spec, family
    return (
        f"{variant} (family {family.name}, bundle format {version}): context support {supports_ctx}, ctx dims {dims['ctx_cat']}+{dims['ctx_cont']}, seq_len {seq_len}, "
        f"input_dim {ckpt['input_dim']}; checkpoint architecture matches the contract"
    )


def _validation_path(ctx: _Context) -> Path:
    if ctx.val_h5 is not None:
        if not ctx.val_h5.is_file():
            raise CheckFailed(f"validation split {ctx.val_h5} does not exist")
        return ctx.val_h5
    recorded = _read_json_object(ctx.file(CONFIG_NAME)).get("val_h5")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    raise CheckFailed(
        f"no validation data for the forward pass: val_h5 not given and the val_h5 recorded in {CONFIG_NAME} "
        f"({recorded!r}) does not exist"
    )


def _validation_split(ctx: _Context) -> tuple[Path, SplitArrays, str]:
    """(path, split, source) of the validation split, opened once per verification for every check that
    reads it (model_loads, metrics_reproduced, onnx_parity)."""
    assert ctx.contract is not None
    if ctx.val_split is None:
        path = _validation_path(ctx)
        ctx.val_split = (path, *load_split_for_training(path, ctx.contract.hash))
    return ctx.val_split


def _check_model_loads(ctx: _Context) -> str:
    assert ctx.contract is not None and ctx.spec is not None and ctx.family is not None
    family = ctx.family
    arch = ctx.checkpoint["arch"]
    model = family.build_model(arch)
    try:
        model.load_state_dict(ctx.checkpoint["model_state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckFailed(
            f"{BEST_NAME}: weights do not fit the declared {arch['variant']} architecture: {exc}"
        ) from exc
    model.eval()
    ctx.model = model
    path, split, source = _validation_split(ctx)
    for group in FEATURE_GROUPS:
        if list(split.feature_names.get(group, [])) != ctx.contract.names(group):
            raise CheckFailed(f"{path}: {group} feature names differ from the bundle's contract")
    try:
        ctx.family_data = family.load_bundle_data(ctx.bundle_dir)
    except (ValueError, OSError) as exc:
        raise CheckFailed(f"files of model family {family.name!r}: {exc}") from exc
    # the family's batcher over the earliest FORWARD_SAMPLES samples, as training batched them
    first = dataclasses.replace(split, sample_end_rows=np.sort(chronological_end_rows(split, FORWARD_SAMPLES)))
    batcher = family.make_batcher(first, seq_len=int(arch["seq_len"]), batch_size=FORWARD_SAMPLES, shuffle=False,
                                  seed=0, data=ctx.family_data)
    if batcher.n_samples == 0 or len(batcher) == 0:
        raise CheckFailed(f"{path}: the validation split has no samples for the forward pass")
    batch = batcher.batch(0)
    n = family.samples_in(batch)
    with torch.inference_mode():
        outputs = model(batch)
    problems = []
    for head in arch["heads"]:
        out = outputs.get(head["name"])
        shape = (n,) if head["kind"] == "regression" else (n, int(head["n_out"]))
        if out is None:
            problems.append(f"head {head['name']!r} gives no output")
        elif tuple(out.shape) != shape:
            problems.append(f"head {head['name']!r} output shape {tuple(out.shape)} != {shape}")
        elif not bool(torch.isfinite(out).all()):
            problems.append(
                f"head {head['name']!r} gives {int((~torch.isfinite(out)).sum())} non-finite outputs"
            )
    if problems:
        raise CheckFailed(f"forward pass on {n} samples of {path}: " + "; ".join(problems))
    n_params = sum(p.numel() for p in model.parameters())
    heads = ", ".join(f"{h['name']}{tuple(outputs[h['name']].shape)}" for h in arch["heads"])
    return f"{arch['variant']} ({n_params} parameters) loads strictly; forward on {n} samples of {path.name} ({source}) finite: {heads}"


def _check_scalers_load(ctx: _Context) -> str:
    """Scalers rebuilt from ``scalers.json`` (no pickle) fit the contract; the bundle's scaler files are
    the data half's recorded at bundle time; with ``scalers_dir``, the data half of today has the
    same scaler parameters (the ones that scaled the splits this verification reads)."""
    contract = ctx.contract
    assert contract is not None
    fitted = load_scalers(ctx.bundle_dir, contract.hash, contract)
    parts = []
    for group in SCALED_GROUPS:
        scaler = fitted.scaler(group)
        width = len(contract.names(group))
        out = scaler.transform(np.zeros((1, width), dtype=np.float32))
        if out.shape != (1, width) or not np.isfinite(out).all():
            raise CheckFailed(f"{INFO_FILE}: scaling a row of zeros with the {group} scaler gives {out!r}")
        parts.append(f"{group} {width} features")
    detail = f"both scalers rebuilt from {INFO_FILE} for contract {contract.hash}: " + ", ".join(parts)
    meta = _read_json_object(ctx.file(METADATA_NAME))
    recorded = (meta.get(DATA_HALF_SCALERS_KEY) or {}).get("sha256")
    if isinstance(recorded, dict):
        if sorted(recorded) != sorted(BUNDLE_SCALER_FILES):
            raise CheckFailed(f"{METADATA_NAME} {DATA_HALF_SCALERS_KEY} lists {sorted(recorded)}, "
                              f"not the scaler files {list(BUNDLE_SCALER_FILES)}")
        mismatched = [n for n, d in recorded.items() if sha256_file(ctx.file(n)) != d]
        if mismatched:
            raise CheckFailed(f"{METADATA_NAME} {DATA_HALF_SCALERS_KEY}: the bundle's {mismatched} "
                              "differ from the data half's scaler files recorded when the bundle was written")
        detail += f"; equal to the data half's recorded at bundle time ({INFO_FILE} {recorded[INFO_FILE][:12]})"
    else:
        detail += f"; no data-half scaler digests recorded ({METADATA_NAME} predates them)"
    if ctx.scalers_dir is not None:
        current = ctx.scalers_dir / INFO_FILE
        differences = scaler_parameter_differences(fitted.info, read_scaler_info(current))
        if differences:
            raise CheckFailed(f"the bundle's scalers are not the data half's {current} (which scaled the splits): "
                              + "; ".join(differences))
        same_file = isinstance(recorded, dict) and sha256_file(current) == recorded.get(INFO_FILE)
        detail += f"; same parameters as {current}" + ("" if same_file else " (file rewritten since)")
    return detail


def _check_metrics_sane(ctx: _Context) -> str:
    assert ctx.contract is not None
    metrics = _read_json_object(ctx.file(METRICS_NAME))
    bad = _nonfinite_paths(metrics)
    if bad:
        raise CheckFailed(
            f"{METRICS_NAME}: non-finite values at {bad[:10]}"
            + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
        )
    ckpt = ctx.checkpoint
    problems = _mismatches(
        [
            (f"{METRICS_NAME} status", metrics.get("status"), "complete"),
            (f"{METRICS_NAME} variant", metrics.get("variant"), ckpt["arch"]["variant"]),
            (
                f"{METRICS_NAME} feature_contract_hash",
                metrics.get("feature_contract_hash"),
                ctx.contract.hash,
            ),
            (f"{METRICS_NAME} best_epoch", metrics.get("best_epoch"), ckpt["epoch"]),
        ]
    )
    best_val = metrics.get("best_val_loss")
    if not isinstance(best_val, int | float) or not math.isclose(
        best_val, ckpt["val_loss"], rel_tol=1e-6, abs_tol=1e-12
    ):
        problems.append(f"{METRICS_NAME} best_val_loss {best_val!r} != the checkpoint's {ckpt['val_loss']!r}")
    history = metrics.get("history")
    losses = (
        [h.get("val_loss") for h in history]
        if isinstance(history, list) and all(isinstance(h, dict) for h in history)
        else None
    )
    initial = metrics.get("initial_val_loss")
    if initial is not None and not isinstance(initial, int | float):
        problems.append(f"{METRICS_NAME} initial_val_loss {initial!r} is not a number")
        initial = None
    reference = "untrained model" if initial is not None else "first epoch"
    start = float("nan")
    if not losses or not all(isinstance(v, int | float) for v in losses):
        problems.append(f"{METRICS_NAME} history has no per-epoch val_loss")
    else:
        start = initial if initial is not None else losses[0]
        if not min(losses) < start:
            problems.append(
                f"validation loss never improved on the {reference}'s {start:.6g} ({len(losses)} epochs)"
            )
    rates = {}
    dataset = metrics.get("dataset") or {}
    for split in ("train", "val"):
        # a rate is implausible only when it contradicts the counts it is made of: samples are a subset
        # of the rows (0 < samples <= rows) and the rate is their ratio. Long clean series legitimately
        # reach rates near 1, so there is no upper bound below 1.
        info = dataset.get(split) or {}
        rate, rows, samples = info.get("eligibility_rate"), info.get("rows"), info.get("samples")
        if not all(isinstance(v, int | float) for v in (rate, rows, samples)):
            problems.append(f"{split} eligibility: rate {rate!r}, rows {rows!r}, samples {samples!r} are not all numbers")
        elif not (0 < samples <= rows and 0 < rate <= 1 and math.isclose(rate, samples / rows, rel_tol=1e-6)):
            problems.append(
                f"{split} eligibility rate {rate!r} is implausible for {samples!r} samples of {rows!r} rows "
                "(needs 0 < samples <= rows and rate = samples / rows)"
            )
        rates[split] = rate
    heads = (metrics.get("final_val") or {}).get("heads")
    missing = [
        h["name"] for h in ckpt["arch"]["heads"] if not isinstance(heads, dict) or h["name"] not in heads
    ]
    if missing:
        problems.append(f"{METRICS_NAME} final_val has no metrics for heads {missing}")
    if problems:
        raise CheckFailed("; ".join(problems))
    ctx.metrics = metrics
    return (
        f"all values finite; best val loss {min(losses):.6g} < {reference} {start:.6g} "
        f"(first epoch {losses[0]:.6g}, {len(losses)} epochs); "
        f"eligibility train {rates['train']:.3f}, val {rates['val']:.3f}"
    )


def _close(a: Any, b: Any, rtol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return False
    return math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=METRICS_ATOL)


def _check_metrics_reproduced(ctx: _Context) -> str:
    """A forward pass over the validation split (what ``final_val`` describes) reproduces
    ``metrics.json``: the sample count exactly, the best checkpoint's validation loss and, per head,
    mse / IC / rank IC (regression) or accuracy / macro-F1 (classification) within the tolerance."""
    spec, contract, model, family = ctx.spec, ctx.contract, ctx.model, ctx.family
    assert spec is not None and contract is not None and model is not None and family is not None
    metrics = ctx.metrics or _read_json_object(ctx.file(METRICS_NAME))
    config = _read_json_object(ctx.file(CONFIG_NAME))
    amp = bool((metrics.get("settings") or {}).get("bf16_autocast"))
    rtol = METRICS_RTOL_AMP if amp else METRICS_RTOL
    path, split, _ = _validation_split(ctx)
    limit = config.get("limit_samples")
    if limit is not None:
        split = dataclasses.replace(split, sample_end_rows=np.sort(chronological_end_rows(split, int(limit))))
    arch = ctx.checkpoint["arch"]
    # the training run's validation batch size: a class-weighted loss averages per batch (by the sum of
    # the batch's weights), so the mean validation loss depends on how the split was batched
    eval_batch = (metrics.get("settings") or {}).get("eval_batch_size")
    batch_size = int(eval_batch) if isinstance(eval_batch, int) and eval_batch > 0 else 1024
    # the family's batcher, chronological, with the run's validation batch size: what training did
    batcher = family.make_batcher(split, seq_len=int(arch["seq_len"]), batch_size=batch_size, shuffle=False,
                                  seed=0, data=ctx.family_data or FamilyData())
    baselines = metrics.get("baselines") or {}
    try:
        state = family.loss_state(spec, baselines, torch.device("cpu"))
    except ValueError as exc:
        raise CheckFailed(f"{METRICS_NAME}: {exc}") from exc
    heads = [h.name for h in spec.heads]
    outs: dict[str, list[np.ndarray]] = {h: [] for h in heads}
    kept: dict[str, list[np.ndarray]] = {k: [] for k in family.eval_keys}
    loss_sum, n = 0.0, 0
    with torch.inference_mode():
        for b in range(len(batcher)):
            batch = batcher.batch(b)
            outputs = {k: v.float() for k, v in model(batch).items()}
            total, _ = family.losses(spec, outputs, batch, state)
            size = family.samples_in(batch)
            loss_sum += float(total) * size
            n += size
            for h in heads:
                outs[h].append(outputs[h].numpy())
            for k in kept:
                kept[k].append(batch[k].numpy())
    final = metrics.get("final_val") or {}
    if n == 0 or n != final.get("n_samples"):
        raise CheckFailed(f"{path.name}: {n} validation samples, {METRICS_NAME} final_val describes "
                          f"{final.get('n_samples')!r} (not this split)")
    recomputed = family.evaluate(spec, {h: np.concatenate(v) for h, v in outs.items()},
                                 {k: np.concatenate(v) for k, v in kept.items()}, baselines)
    problems = []
    val_loss = loss_sum / n
    if not _close(val_loss, ctx.checkpoint["val_loss"], rtol):
        problems.append(f"validation loss {val_loss:.6g} != best_val_loss {ctx.checkpoint['val_loss']!r}")
    compared = 0
    for head in spec.heads:
        names = REPRODUCED_REGRESSION_METRICS if head.kind == "regression" else REPRODUCED_CLASSIFICATION_METRICS
        stated = (final.get("heads") or {}).get(head.name) or {}
        for name in names:
            mine = recomputed["heads"][head.name].get(name)
            if not _close(mine, stated.get(name), rtol):
                problems.append(f"{head.name} {name}: recomputed {mine!r}, {METRICS_NAME} says {stated.get(name)!r}")
            compared += 1
    if "macro_f1" in recomputed and not _close(recomputed["macro_f1"], final.get("macro_f1"), rtol):
        problems.append(f"macro_f1: recomputed {recomputed['macro_f1']!r}, {METRICS_NAME} says {final.get('macro_f1')!r}")
    if problems:
        raise CheckFailed(f"{METRICS_NAME} is not what the bundle's model gives on {path.name} "
                          f"(rel. tolerance {rtol:g}): " + "; ".join(problems))
    return (f"forward pass over {n} samples of {path.name} reproduces {METRICS_NAME}: val loss {val_loss:.6g} and "
            f"{compared} final_val metrics within rel. {rtol:g}")


def _gate_split_path(ctx: _Context) -> Path:
    """The gate split: ``gate_h5`` when given, else ``test.h5`` beside the validation split."""
    if ctx.gate_h5 is not None:
        if not ctx.gate_h5.is_file():
            raise CheckFailed(f"gate split {ctx.gate_h5} does not exist")
        return ctx.gate_h5
    val = _validation_path(ctx)
    candidate = val.with_name(GATE_SPLIT_FILE)
    if candidate.is_file():
        return candidate
    raise CheckFailed(
        f"no gate split: gate_h5 not given and {candidate} does not exist (the gate is scored on data that "
        "checkpoint selection never saw; pass the test split)"
    )


def _check_quality_gates(ctx: _Context) -> str:
    from sentinel_pipeline.evaluation import skill_gates
    from sentinel_pipeline.evaluation.predictions import score_split

    spec, contract, model = ctx.spec, ctx.contract, ctx.model
    assert spec is not None and contract is not None and model is not None
    gates = ctx.gates[spec.name]
    path = _gate_split_path(ctx)
    split, source = load_split_for_training(path, contract.hash)
    horizon = int(gates.horizon or split.label_params.get("horizon") or 0)
    if horizon < 1:
        raise CheckFailed(f"{path}: no label horizon in its label_params {split.label_params!r}")
    pred = score_split(model, ctx.checkpoint["arch"], split, data=ctx.family_data)
    lag = max(horizon, int(gates.hac_lag or 0))
    common = {"min_windows": int(gates.min_windows)}
    results: list[skill_gates.GateResult] = []
    if gates.min_directional_t is not None:
        results.append(skill_gates.directional_skill(
            pred, horizon, min_t=float(gates.min_directional_t), lag=lag, min_symbols=int(gates.min_symbols),
            **common))
    if gates.min_mse_t is not None:
        head_name = gated_head(spec, gates)
        head = next((h for h in spec.heads if h.name == head_name), None)
        if head is None or head.kind != "regression":
            raise CheckFailed(f"gate min_mse_t needs a regression head; {head_name!r} is not one of {spec.name}")
        metrics = ctx.metrics or _read_json_object(ctx.file(METRICS_NAME))
        baseline = (metrics.get("baselines") or {}).get("target_means", {}).get(head.target)
        if not isinstance(baseline, int | float):
            raise CheckFailed(f"{METRICS_NAME}: no train mean of target {head.target!r} (baselines.target_means)")
        results.append(skill_gates.mse_skill(
            pred, head.name, head.target, float(baseline), horizon, min_t=float(gates.min_mse_t), lag=lag,
            winsor_quantile=float(gates.winsor_quantile), **common))
    if gates.null_quantile is not None:
        if "pred_class" not in pred:
            raise CheckFailed(f"gate null_quantile needs a classification head; {spec.name} has none")
        results.append(skill_gates.shift_null_skill(
            pred, horizon, quantile=float(gates.null_quantile), n_shifts=int(gates.n_shifts), **common))
    ctx.gate_results = [r.to_dict() for r in results]
    if not results:
        return f"no gates configured for {spec.name}"
    detail = (f"{spec.name} on {path.name} ({source}, horizon {horizon} bars): "
              + "; ".join(f"{'PASS' if r.passed else 'FAIL'} {r.name}: {r.detail}" for r in results))
    if not all(r.passed for r in results):
        raise CheckFailed(detail)
    return detail


def _check_onnx_parity(ctx: _Context) -> str:
    """``model.onnx`` runs in ONNX Runtime and decides like the torch model on the validation split."""
    from sentinel_pipeline.bundles import ONNX_FORMAT_VERSION, onnx_record, open_onnx_model
    from sentinel_pipeline.deployment.onnx_export import EXPORTED, ONNX_NAME
    from sentinel_pipeline.deployment.onnx_parity import onnx_parity

    assert ctx.contract is not None and ctx.model is not None and ctx.family is not None
    meta = _read_json_object(ctx.file(METADATA_NAME))
    version, _ = bundle_format(meta, ctx.bundle_dir)
    record = onnx_record(meta)
    if record is None:
        if version < ONNX_FORMAT_VERSION:
            ctx.onnx_parity = {"passed": True, "note": f"bundle format {version} predates the ONNX export"}
            return (f"bundle format {version} predates the ONNX export (formats from {ONNX_FORMAT_VERSION} carry "
                    f"{ONNX_NAME}): it runs on torch only")
        raise CheckFailed(f"{METADATA_NAME}: a format-{version} bundle must record its ONNX export ('onnx')")
    if record.get("status") != EXPORTED:
        raise CheckFailed(f"the ONNX export failed when the bundle was written, so the model cannot be deployed "
                          f"as ONNX: {record.get('reason')}")
    try:
        onnx_model = open_onnx_model(ctx.bundle_dir, record)
    except BundleError as exc:
        raise CheckFailed(str(exc)) from exc
    path, split, _ = _validation_split(ctx)
    split = dataclasses.replace(split, sample_end_rows=np.sort(chronological_end_rows(split, PARITY_MAX_SAMPLES)))
    report = onnx_parity(ctx.model, onnx_model, ctx.checkpoint["arch"], split, data=ctx.family_data)
    ctx.onnx_parity = report.to_dict()
    detail = f"opset {record.get('opset')}, {path.name}: {report.detail()}"
    if not report.passed:
        raise CheckFailed(detail)
    return detail


_CHECKS: dict[str, Callable[[_Context], str]] = {
    "signature": _check_signature,
    "files_present": _check_files_present,
    "manifest": _check_manifest,
    "contract_hash": _check_contract_hash,
    "metadata_agrees": _check_metadata_agrees,
    "model_loads": _check_model_loads,
    "scalers_load": _check_scalers_load,
    "metrics_sane": _check_metrics_sane,
    "metrics_reproduced": _check_metrics_reproduced,
    "quality_gates": _check_quality_gates,
    "onnx_parity": _check_onnx_parity,
}


def _run_check(name: str, ctx: _Context) -> CheckOutcome:
    try:
        return CheckOutcome(name, True, _CHECKS[name](ctx))
    except CheckFailed as exc:
        return CheckOutcome(name, False, str(exc))
    except Exception as exc:  # any error while reading or loading a bad bundle is a failed check
        return CheckOutcome(name, False, f"{type(exc).__name__}: {exc}")


def verify_bundle(
    bundle_dir: str | os.PathLike[str],
    expected_hash: str,
    *,
    val_h5: str | os.PathLike[str] | None = None,
    gate_h5: str | os.PathLike[str] | None = None,
    gates: GateOverrides | QualityGates = None,
    trusted_keys: str | os.PathLike[str] | None = None,
    scalers_dir: str | os.PathLike[str] | None = None,
) -> VerificationReport:
    """Run every check of the module docstring on ``bundle_dir``; never raises for a bad bundle.

    ``bundle_dir`` may be a bundle archive (``model_final.zip``, :mod:`sentinel_pipeline.package`): it is
    unpacked under ``bundle_archive``'s rules into a private temporary directory and verified there;
    the report names the archive.

    ``trusted_keys``: the directory of trusted public keys (default ``signing.trusted_keys_dir()``).
    ``scalers_dir``: the data half's scaler directory; when given, the bundle's scaler parameters must
    equal its ``scalers.json`` (the scalers that scaled the splits verification reads).

    ``gates``: per-variant overrides of :data:`DEFAULT_GATES` (see :func:`resolve_gates`), or one
    :class:`QualityGates` used whatever the bundle's variant. Invalid gate overrides raise
    ``ValueError`` (a caller error, not a bundle problem).
    """
    bundle_dir = Path(bundle_dir)
    if is_archive(bundle_dir):
        return _verify_archive(bundle_dir, expected_hash, val_h5=val_h5, gate_h5=gate_h5, gates=gates,
                               trusted_keys=trusted_keys, scalers_dir=scalers_dir)
    if isinstance(gates, QualityGates):
        resolved = {name: gates for name in VARIANTS}
    else:
        resolved = resolve_gates(gates)
    ctx = _Context(bundle_dir, str(expected_hash), Path(val_h5) if val_h5 is not None else None, resolved,
                   gate_h5=Path(gate_h5) if gate_h5 is not None else None,
                   trusted_keys=Path(trusted_keys) if trusted_keys is not None else None,
                   scalers_dir=Path(scalers_dir) if scalers_dir is not None else None)
    manifest_digest = manifest_sha256(bundle_dir)
    outcomes: dict[str, CheckOutcome] = {}
    for name in CHECK_NAMES:
        failed_needs = [n for n in CHECK_NEEDS[name] if not outcomes[n].passed]
        if failed_needs:
            outcomes[name] = CheckOutcome(name, False, f"skipped: needs {', '.join(failed_needs)}")
        else:
            outcomes[name] = _run_check(name, ctx)
    checks = [outcomes[n] for n in CHECK_NAMES]
    return VerificationReport(
        passed=all(c.passed for c in checks),
        checks=checks,
        bundle_dir=str(bundle_dir),
        expected_hash=str(expected_hash),
        verified_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        manifest_digest=manifest_digest,
        gate_results=ctx.gate_results,
        onnx_parity=ctx.onnx_parity,
    )


def _verify_archive(archive: Path, expected_hash: str, **kwargs: Any) -> VerificationReport:
    """:func:`verify_bundle` of a ``model_final.zip``: unpacked safely into a private temporary directory
    (``bundle_archive.unpacked_bundle``), verified there as a directory, reported under the archive's
    name. An archive the unpacking rules refuse fails ``signature`` and ``files_present`` with the
    reason (the rest: skipped)."""
    try:
        with unpacked_bundle(archive) as unpacked:
            report = verify_bundle(unpacked, expected_hash, **kwargs)
            inner = str(unpacked)
    except ArchiveError as exc:
        outcomes = {"signature": CheckOutcome("signature", False, str(exc)),
                    "files_present": CheckOutcome("files_present", False, str(exc))}
        for name in CHECK_NAMES:
            if name not in outcomes:
                failed = [n for n in CHECK_NEEDS[name] if not outcomes[n].passed]
                outcomes[name] = CheckOutcome(name, False, f"skipped: needs {', '.join(failed)}")
        return VerificationReport(
            passed=False, checks=[outcomes[n] for n in CHECK_NAMES], bundle_dir=str(archive),
            expected_hash=str(expected_hash),
            verified_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            manifest_digest=None, gate_results=[])
    # the details name the archive, not the temporary directory that no longer exists
    checks = [dataclasses.replace(c, detail=c.detail.replace(inner, str(archive))) for c in report.checks]
    return dataclasses.replace(report, checks=checks, bundle_dir=str(archive))


# -- verification records ---------------------------------------------------------------------


def write_verification_record(
    bundle_dir: str | os.PathLike[str],
    report: VerificationReport,
    *,
    signing_key: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``report`` as the bundle's ``records/verification.json`` (``bundles.write_record``: its own
    manifest, never the signed one); returns its path. Earlier records are kept, summarised, under
    ``"previous"``. Where the signing key (``signing.load_signing_key``; never created here) is at hand,
    ``records/verification.sig`` signs the record's bytes."""
    bundle_dir = Path(bundle_dir)
    if bundle_dir.resolve() != Path(report.bundle_dir).resolve():
        raise ValueError(f"report is for {report.bundle_dir}, not for {bundle_dir}")
    previous: list[dict[str, Any]] = []
    try:
        old = json.loads(read_record(bundle_dir, RECORD_NAME))
        previous = list(old.get("previous", [])) + [
            {k: old.get(k) for k in ("verified_at", "passed", "failed_checks", "manifest_digest", "expected_hash")}
        ]
    except (OSError, ValueError, AttributeError, TypeError):  # absent, refused or malformed: start afresh
        previous = []
    data = json.dumps({**report.to_dict(), "previous": previous}, indent=2, allow_nan=False).encode("utf-8")
    # signed by the key that signs bundles when it is at hand, so that plain Python (without the Dagster
    # event log) can tell a record this side wrote from one forged by whoever can write models/
    try:
        key = load_signing_key(signing_key, create=False)
    except (SignatureError, OSError) as exc:
        key = None
        log.warning("verification record of %s is not signed (%s): require_verified without a "
                    "verified manifest digest will refuse this bundle", bundle_dir, exc)
    path = write_record(bundle_dir, RECORD_NAME, data)
    if key is not None:
        write_record(bundle_dir, RECORD_SIGNATURE_NAME, sign_bytes(data, key))
    return path


def require_verified(
    bundle_dir: str | os.PathLike[str],
    expected_hash: str | None = None,
    *,
    verified_manifest_sha256: str | None = None,
    trusted_keys: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Refuse (:class:`BundleNotVerifiedError`) a bundle that cannot be trusted now; returns what
    vouches for it.

    Always, in this order: the signature of ``manifest.json`` by a trusted key (checked before
    anything else is read), the entry rule (no symlinks, nothing unexpected), every file's sha256
    against the manifest, the records' own manifest.

    Then, with ``verified_manifest_sha256`` (the digest the Dagster event log holds for the passing
    ``bundle_verified`` evaluation): the current manifest's sha256 must equal it; the bundle's own
    ``verification.json`` is not consulted. Returns ``{"manifest_digest", "source"}``.

    Without it (plain Python, no Dagster): the bundle's ``records/verification.json`` must be signed
    (``records/verification.sig``) by a trusted key and have passed every check, for ``expected_hash``
    (when given), on the current manifest. Returns that record. Someone who can write ``models/`` but
    not the key cannot forge it.
    """
    bundle_dir = Path(bundle_dir)
    problems = trusted_bundle_problems(bundle_dir, trusted_keys, records=False)
    if problems:
        raise BundleNotVerifiedError(f"{bundle_dir}: bundle refused: " + "; ".join(problems))
    digest = manifest_sha256(bundle_dir)
    if verified_manifest_sha256 is not None and digest != verified_manifest_sha256:
        raise BundleNotVerifiedError(
            f"{bundle_dir}: {MANIFEST_NAME} (sha256 {digest}) is not the manifest that passed verification "
            f"(sha256 {verified_manifest_sha256}, from the Dagster event log): the bundle changed since"
        )
    problems = check_records(bundle_dir)  # the same unexpected-file rule for the records area
    if problems:
        raise BundleNotVerifiedError(f"{bundle_dir}: bundle refused: " + "; ".join(problems))
    if verified_manifest_sha256 is not None:
        return {"manifest_digest": digest, "source": "verified manifest digest"}
    try:
        data = read_record(bundle_dir, RECORD_NAME)
        signature = read_record(bundle_dir, RECORD_SIGNATURE_NAME) if os.path.lexists(
            bundle_dir / RECORDS_DIR / RECORD_SIGNATURE_NAME) else None
        if signature is not None:
            verify_signed_bytes(data, signature, f"{bundle_dir}/{RECORDS_DIR}/{RECORD_NAME}", trusted_keys)
        record = json.loads(data)
        report = VerificationReport.from_dict(record)
    except SignatureError as exc:
        raise BundleNotVerifiedError(f"verification record refused: {exc}") from exc
    except FileNotFoundError as exc:
        raise BundleNotVerifiedError(f"{bundle_dir}: bundle has not been verified (no {RECORDS_DIR}/{RECORD_NAME})") from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleNotVerifiedError(f"{bundle_dir}: unreadable verification record {RECORD_NAME}: {exc}") from exc
    if signature is None:
        raise BundleNotVerifiedError(
            f"{bundle_dir}: its verification record is not signed ({RECORDS_DIR}/{RECORD_SIGNATURE_NAME} is "
            "missing): re-run verification where the signing key is at hand"
        )
    failed = report.failed_checks
    if not report.passed or failed or [c.name for c in report.checks] != list(CHECK_NAMES):
        reasons = (
            "; ".join(f"{c.name}: {c.detail}" for c in report.checks if not c.passed) or "incomplete record"
        )
        raise BundleNotVerifiedError(
            f"{bundle_dir}: bundle failed verification at {report.verified_at} (failed checks {failed}): {reasons}"
        )
    if expected_hash is not None and report.expected_hash != expected_hash:
        raise BundleNotVerifiedError(
            f"{bundle_dir}: verified for feature contract {report.expected_hash}, expected {expected_hash}"
        )
    if digest is None or digest != report.manifest_digest:
        raise BundleNotVerifiedError(
            f"{bundle_dir}: {MANIFEST_NAME} changed since verification at {report.verified_at} "
            f"(sha256 {digest} != verified {report.manifest_digest})"
        )
    return record
