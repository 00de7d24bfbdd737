"""Calibration of the verification gate: does it pass bundles that learned something and fail those
that learned nothing?

:func:`calibrate_market` builds one synthetic market (``seed``, ``signal_strength``) through the real
data half, trains each variant with the pipeline's training budget (:data:`PIPELINE_TRAINING`), runs
the full :func:`~sentinel_pipeline.verification.verify_bundle` on it (the gate is scored on the test
split, which training and checkpoint selection never read) and returns one record per variant with
the verdict and every gate statistic. ``signal_strength = 0`` is the null: a pure random walk, where
every bundle that passes is a false pass.

:func:`feature_null_statistics` is a cheap complement that trains nothing: on a null market, any
function of the features has no skill, so random linear combinations of the snap features are
no-skill signals with realistic autocorrelation; the distribution of their directional HAC t gives the
threshold's false-pass rate with thousands of draws instead of a handful of trained bundles.

``bench/calibrate_gate.py`` runs both over many seeds and prints the pass-rate table of the README.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig
from sentinel_pipeline.evaluation.skill_gates import directional_skill
from sentinel_pipeline.paths import ArtifactPaths
from sentinel_pipeline.training.config import pipeline_train_config

DEFAULT_VARIANTS: tuple[str, ...] = ("mlp_two_head", "seq_ctx_fusion", "transformer_tbm")


def build_market(
    work_dir: Path, market: SyntheticMarketConfig, log: Callable[[str], None] = print, *, label_horizon: int | None = None
) -> ArtifactPaths:
    """The data half on one synthetic market under ``work_dir`` (a fresh directory)."""
    from sentinel_pipeline.data.labels import LabelConfig
    from sentinel_pipeline.data_half import DataHalfConfig, run_data_half

    if work_dir.exists():
        shutil.rmtree(work_dir)
    paths = ArtifactPaths(data_dir=work_dir / "data", models_dir=work_dir / "models")
    labels = LabelConfig(horizon=label_horizon) if label_horizon else LabelConfig()
    run_data_half(paths, DataHalfConfig(synthetic=market, labels=labels), log=lambda _m: None)
    log(f"[calibration] market seed {market.seed} strength {market.signal_strength}: data half done")
    return paths


def calibrate_market(
    work_dir: str | Path,
    seed: int,
    signal_strength: float,
    *,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    market_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    variant_overrides: dict[str, dict[str, Any]] | None = None,
    label_horizon: int | None = None,
    gates: Any = None,
    keep: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Build a market, train ``variants`` with the pipeline budget, verify each; one record per variant."""
    from sentinel_pipeline.data.feature_contract import read_contract

    work_dir = Path(work_dir)
    market = SyntheticMarketConfig(seed=int(seed), signal_strength=float(signal_strength),
                                   **(market_overrides or {}))
    paths = build_market(work_dir, market, log, label_horizon=label_horizon)
    expected = read_contract(paths.feature_contract).hash
    records = []
    for variant in variants:
        overrides = {**(train_overrides or {}), **(variant_overrides or {}).get(variant, {})}
        cfg = pipeline_train_config(paths, variant, work_dir / "runs" / variant, **overrides)
        record, _ = train_and_verify(cfg, paths, expected, gates, seed, signal_strength, log, "")
        records.append(record)
    if not keep:
        shutil.rmtree(work_dir, ignore_errors=True)
    return records


def train_and_verify(cfg: Any, paths: ArtifactPaths, expected: str, gates: Any, seed: int, signal_strength: float,
                     log: Callable[[str], None], label: str) -> tuple[dict[str, Any], Any]:
    """Train ``cfg`` and verify its bundle with the gates scored on the test split; the calibration record
    (verdict, every gate statistic, training time and epochs) and the ``TrainResult``."""
    from sentinel_pipeline.training.engine import train
    from sentinel_pipeline.verification import verify_bundle

    t0 = time.perf_counter()
    result = train(cfg, progress=False)
    seconds = time.perf_counter() - t0
    report = verify_bundle(result.bundle_dir, expected, val_h5=paths.h5("val"), gate_h5=paths.h5("test"), gates=gates)
    gate_check = report.check("quality_gates")
    record = {
        "variant": cfg.model,
        "seed": int(seed),
        "signal_strength": float(signal_strength),
        "passed": report.passed,
        "gates_passed": bool(report.gate_results) and all(g["passed"] for g in report.gate_results),
        "failed_checks": report.failed_checks,
        "gates": report.gate_results,
        "quality_gates_detail": gate_check.detail,
        "train_seconds": round(seconds, 1),
        "epochs": result.metrics.get("epochs_completed"),
    }
    log(f"[calibration] {label}seed {seed} strength {signal_strength} {cfg.model}: "
        f"{'PASS' if report.passed else 'FAIL'} ({seconds:.0f}s) {gate_check.detail[:300]}")
    return record, result


def feature_null_statistics(
    paths: ArtifactPaths,
    *,
    n_draws: int = 1000,
    split: str = "test",
    seed: int = 0,
    horizon: int | None = None,
    **gate_kwargs: Any,
) -> np.ndarray:
    """Directional HAC t of ``n_draws`` random linear combinations of the snap features on ``split``.

    Meaningful as a null only on a market without signal (``signal_strength = 0``).
    """
    from sentinel_pipeline.data.feature_contract import read_contract
    from sentinel_pipeline.training.data_loader import load_split_for_training

    contract = read_contract(paths.feature_contract)
    data, _ = load_split_for_training(paths.h5(split), contract.hash)
    horizon = int(horizon or data.label_params.get("horizon", 20))
    ends = np.asarray(data.sample_end_rows)
    snap = np.asarray(data.snap)[ends].astype(np.float64)
    snap = np.nan_to_num(snap)
    symbols = np.asarray(data.symbols, dtype=object)[np.asarray(data.symbol_idx)[ends]]
    base = pd.DataFrame({
        "symbol": symbols,
        "timestamp": pd.to_datetime(np.asarray(data.timestamp)[ends], utc=True),
    })
    for j, name in enumerate(data.target_names):
        base[name] = np.asarray(data.targets)[ends, j].astype(np.float64)
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((snap.shape[1], n_draws))
    signals = snap @ weights
    out = np.empty(n_draws)
    for i in range(n_draws):
        frame = base.assign(signal=signals[:, i])
        out[i] = directional_skill(frame, horizon, min_t=0.0, **gate_kwargs).value
    return out


def pass_rate_table(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, null/signal): bundles, passes, pass rate."""
    frame = pd.DataFrame([{**{k: r[k] for k in ("variant", "signal_strength", "passed")}} for r in records])
    if frame.empty:
        return []
    rows = []
    for (variant, strength), g in frame.groupby(["variant", "signal_strength"], sort=True):
        rows.append({
            "variant": variant,
            "market": "null (strength 0)" if strength == 0 else f"signal {strength:g}",
            "bundles": int(len(g)),
            "passed": int(g["passed"].sum()),
            "pass_rate": round(float(g["passed"].mean()), 3),
        })
    return rows


def asdict_market(market: SyntheticMarketConfig) -> dict[str, Any]:
    return dataclasses.asdict(market)


# -- the panel configuration: the graph family on synthetic daily panels ---------------------------


def build_panel(work_dir: Path, panel: Any, log: Callable[[str], None] = print) -> ArtifactPaths:
    """The data half (panel preset) and the symbol graph (with the panel's own sector map) on one
    synthetic daily panel under ``work_dir`` (a fresh directory)."""
    import dataclasses as _dc

    from sentinel_pipeline.data.symbol_graph import GraphConfig, run_symbol_graph
    from sentinel_pipeline.data_half import panel_config, run_data_half, synthetic_panel_sector_file

    if work_dir.exists():
        shutil.rmtree(work_dir)
    paths = ArtifactPaths(data_dir=work_dir / "data", models_dir=work_dir / "models")
    cfg = panel_config(synthetic_panel=panel)
    run_data_half(paths, cfg, log=lambda _m: None)
    sectors = synthetic_panel_sector_file(paths, cfg)
    graph = GraphConfig() if sectors is None else _dc.replace(GraphConfig(), sector_file=str(sectors))
    run_symbol_graph(paths, graph)
    log(f"[calibration] panel seed {panel.seed} strength {panel.signal_strength}: data half and graph done")
    return paths


def calibrate_panel(
    work_dir: str | Path,
    seed: int,
    signal_strength: float,
    *,
    variant: str = "gat_multi_horizon",
    panel_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    gates: Any = None,
    keep: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build a synthetic panel (``seed``, ``signal_strength``; 0 = null), train the graph family with the
    pipeline budget (as the panel job does), verify it with the full gate; one record."""
    from sentinel_pipeline.data.feature_contract import read_contract
    from sentinel_pipeline.data.symbol_graph import graph_dir
    from sentinel_pipeline.data.synthetic_panel import SyntheticPanelConfig

    work_dir = Path(work_dir)
    panel = SyntheticPanelConfig(seed=int(seed), signal_strength=float(signal_strength), **(panel_overrides or {}))
    paths = build_panel(work_dir, panel, log)
    expected = read_contract(paths.feature_contract).hash
    cfg = pipeline_train_config(paths, variant, work_dir / "runs" / variant,
                                family_inputs={"symbol_graph": graph_dir(paths)}, **(train_overrides or {}))
    record, result = train_and_verify(cfg, paths, expected, gates, seed, signal_strength, log, "panel ")
    record["best_epoch"] = result.metrics.get("best_epoch")
    if not keep:
        shutil.rmtree(work_dir, ignore_errors=True)
    return record
