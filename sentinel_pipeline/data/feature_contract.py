"""The feature contract: the ordered list of features a model is trained on, and its hash.

The contract is the ordered list of ``(name, group, dtype, params)`` plus the feature code version,
the sequence length and whether context features are on. It is serialised canonically (sorted keys,
no whitespace) and its **feature contract hash** is the first 16 hex characters of the sha256 of that
serialisation. The hash travels in every downstream artefact (HDF5 attrs, Arrow metadata, bundles) and
every reader refuses an artefact whose hash differs from the one it expects.

Files written for a contract:

- ``feature_contract.json``: the contract body plus ``feature_contract_hash``
- ``feature_schema.txt``: one feature name a line, in order; ``# group: <g>`` comment lines open each
  group so that ``input_dim = len(schema[group])`` can be read without any data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sentinel_pipeline.atomic_io import write_json_atomic, write_text_atomic

FEATURE_GROUPS: tuple[str, ...] = ("seq", "snap", "ctx_cat", "ctx_cont")
GROUP_DTYPES: dict[str, str] = {"seq": "float32", "snap": "float32", "ctx_cat": "int32", "ctx_cont": "float32"}
HASH_LENGTH = 16


class ContractError(ValueError):
    """An artefact does not match the feature contract it is used with."""


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    group: str
    dtype: str
    params: dict[str, Any] = field(default_factory=dict)
    # number of categories for ctx_cat features (values are 0..cardinality-1); None otherwise
    cardinality: int | None = None

    def __post_init__(self) -> None:
        if self.group not in FEATURE_GROUPS:
            raise ContractError(f"feature {self.name!r}: unknown group {self.group!r}")
        if self.group == "ctx_cat" and (self.cardinality is None or self.cardinality < 2):
            raise ContractError(f"ctx_cat feature {self.name!r} needs a cardinality >= 2")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "group": self.group, "dtype": self.dtype, "params": self.params}
        if self.cardinality is not None:
            d["cardinality"] = self.cardinality
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(d["name"], d["group"], d["dtype"], dict(d.get("params", {})), d.get("cardinality"))


@dataclass(frozen=True)
class FeatureContract:
    features: tuple[FeatureSpec, ...]
    seq_len: int
    context_features: bool
    code_version: str

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ContractError(f"duplicate feature names in contract: {dupes}")
        if self.seq_len < 1:
            raise ContractError("seq_len must be >= 1")
        if not self.context_features and any(f.group.startswith("ctx") for f in self.features):
            raise ContractError("context features are switched off but the contract lists ctx_* features")

    # -- views -------------------------------------------------------------------------------
    def names(self, group: str) -> list[str]:
        if group not in FEATURE_GROUPS:
            raise ContractError(f"unknown feature group {group!r}")
        return [f.name for f in self.features if f.group == group]

    def dims(self) -> dict[str, int]:
        return {g: len(self.names(g)) for g in FEATURE_GROUPS}

    @property
    def ctx_cat_cardinalities(self) -> list[int]:
        return [int(f.cardinality) for f in self.features if f.group == "ctx_cat"]  # type: ignore[arg-type]

    @property
    def all_names(self) -> list[str]:
        return [f.name for f in self.features]

    # -- serialisation -----------------------------------------------------------------------
    def body(self) -> dict[str, Any]:
        return {
            "code_version": self.code_version,
            "context_features": self.context_features,
            "features": [f.to_dict() for f in self.features],
            "seq_len": self.seq_len,
        }

    def canonical_json(self) -> str:
        return json.dumps(self.body(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()[:HASH_LENGTH]

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "feature_contract_hash": self.hash}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureContract:
        contract = cls(
            features=tuple(FeatureSpec.from_dict(f) for f in d["features"]),
            seq_len=int(d["seq_len"]),
            context_features=bool(d["context_features"]),
            code_version=str(d["code_version"]),
        )
        stated = d.get("feature_contract_hash")
        if stated is not None and stated != contract.hash:
            raise ContractError(
                f"feature contract states hash {stated} but its content hashes to {contract.hash}"
            )
        return contract

    def write(self, directory: str | Path) -> dict[str, Path]:
        """Write ``feature_contract.json`` and ``feature_schema.txt`` atomically into ``directory``."""
        directory = Path(directory)
        paths = {
            "contract": write_json_atomic(directory / "feature_contract.json", self.to_dict()),
            "schema": write_feature_schema(directory / "feature_schema.txt", self),
        }
        return paths


def read_contract(path: str | Path, expected_hash: str | None = None) -> FeatureContract:
    """Read ``feature_contract.json``; refuse it if its stated hash or ``expected_hash`` disagree."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ContractError(f"{path}: cannot read feature contract: {exc}") from exc
    try:
        contract = FeatureContract.from_dict(d)
    except (KeyError, TypeError) as exc:
        raise ContractError(f"{path}: malformed feature contract: missing {exc}") from exc
    except ContractError as exc:
        raise ContractError(f"{path}: {exc}") from exc
    if expected_hash is not None and contract.hash != expected_hash:
        raise ContractError(f"{path}: feature contract hash {contract.hash} != expected {expected_hash}")
    return contract


def write_feature_schema(path: str | Path, contract: FeatureContract) -> Path:
    lines = [f"# feature schema of contract {contract.hash} (seq_len={contract.seq_len})"]
    for group in FEATURE_GROUPS:
        names = contract.names(group)
        if names:
            lines.append(f"# group: {group}")
            lines.extend(names)
    return write_text_atomic(path, "\n".join(lines) + "\n")


def read_feature_schema(path: str | Path) -> dict[str, list[str]]:
    """Parse ``feature_schema.txt`` into ``{group: [names in order]}`` (every group present, maybe empty)."""
    path = Path(path)
    schema: dict[str, list[str]] = {g: [] for g in FEATURE_GROUPS}
    group: str | None = None
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
                if group not in FEATURE_GROUPS:
                    raise ContractError(f"{path}:{lineno}: unknown feature group {group!r}")
            continue
        if group is None:
            raise ContractError(f"{path}:{lineno}: feature {line!r} appears before any '# group:' line")
        schema[group].append(line)
    if not any(schema.values()):
        raise ContractError(f"{path}: feature schema lists no features")
    return schema
