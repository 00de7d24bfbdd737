"""The gate separates skill from noise end to end: real data half, real training, real verification.

A small null market (``signal_strength 0``) and a small strong-signal market go through the data half,
the MLP and ``seq_ctx_fusion`` are trained with the pipeline's budget (fewer epochs), and the full
verification runs on the test split. The bundles of the null market must fail the statistical gates
(the directional-skill gate in particular); those of the signal market must pass every check. The
pass *rates* over many seeds are measured by ``bench/calibrate_gate.py`` (README).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sentinel_pipeline.evaluation.calibration import calibrate_market

pytestmark = pytest.mark.slow

MARKET = {"n_symbols": 24, "n_days": 200}
TRAIN = {"epochs": 3, "threads": 1, "log_every": 100_000}
VARIANTS = ("mlp_two_head", "seq_ctx_fusion")


def _run(tmp_path: Path, seed: int, strength: float) -> dict[str, dict]:
    records = calibrate_market(tmp_path / f"m{seed}", seed, strength, variants=VARIANTS, market_overrides=MARKET,
                               train_overrides=TRAIN, label_horizon=10, log=lambda _m: None)
    return {r["variant"]: r for r in records}


def test_noise_bundles_fail_the_gate(tmp_path: Path) -> None:
    for seed in (11, 12):
        records = _run(tmp_path, seed, 0.0)
        for variant, r in records.items():
            assert not r["passed"], (variant, seed, r["quality_gates_detail"])
            directional = next(g for g in r["gates"] if g["name"] == "directional_skill")
            assert not directional["passed"], (variant, seed, directional["detail"])
            assert directional["n_windows"] >= 10  # a verdict on data, not "not enough data"


def test_strong_signal_bundles_pass_the_gate(tmp_path: Path) -> None:
    records = _run(tmp_path, 21, 0.3)
    for variant, r in records.items():
        assert r["passed"], (variant, r["failed_checks"], r["quality_gates_detail"])
        assert all(g["passed"] for g in r["gates"])
