"""One table of every variant's newest bundle: its verification verdict and the key gate numbers.

Shown in ``variant_comparison``'s metadata next to the backtest comparison, so that one page answers
"which variants are verified, by how much, and how did they trade". Read from each bundle's
``records/verification.json`` (written by the ``bundle_verified`` check; information only, what replay
and the backtest trust is the check evaluation in the event log); a bundle without one says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dagster as dg

from sentinel_pipeline.bundles import list_bundles, records_dir
from sentinel_pipeline.orchestration.metadata import md_table

COLUMNS = ("variant", "bundle", "verified", "failed checks", "directional t (>= bound)", "other gates", "windows")


def _gate_text(gate: dict[str, Any]) -> str:
    value, bound = gate.get("value"), gate.get("bound")
    text = f"{float(value):.2f}" if isinstance(value, int | float) else "n/a"
    if isinstance(bound, int | float):
        text += f" (>= {bound:g})"
    return text + ("" if gate.get("passed") else " FAIL")


def verification_row(variant: str, bundle: Path | None) -> dict[str, Any]:
    """The table row of ``variant`` (``bundle`` None: no bundle yet)."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
    row["variant"] = variant
    if bundle is None:
        row.update({"bundle": "none", "verified": "no bundle"})
        return row
    row["bundle"] = bundle.name
    try:
        record = json.loads((records_dir(bundle) / "verification.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        row["verified"] = "not verified yet"
        return row
    row["verified"] = "PASS" if record.get("passed") else "FAIL"
    row["failed checks"] = ", ".join(record.get("failed_checks") or []) or "none"
    gates = [g for g in record.get("gate_results") or [] if isinstance(g, dict)]
    directional = [g for g in gates if g.get("name") == "directional_skill"]
    others = [g for g in gates if g.get("name") != "directional_skill"]
    row["directional t (>= bound)"] = _gate_text(directional[0]) if directional else "n/a"
    row["other gates"] = "; ".join(f"{g.get('name')}: {_gate_text(g)}" for g in others) or "none"
    windows = [g.get("n_windows") for g in gates if isinstance(g.get("n_windows"), int)]
    row["windows"] = min(windows) if windows else "n/a"
    return row


def verification_table(models_dir: str | Path, variants: Iterable[str]) -> dg.MetadataValue:
    """Markdown table: one row per variant, its newest bundle's verdict and gate numbers."""
    rows = []
    for variant in variants:
        bundles = list_bundles(models_dir, variant)
        rows.append(verification_row(variant, bundles[0] if bundles else None))
    return md_table(rows, COLUMNS)
