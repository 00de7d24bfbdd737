"""ONNX Runtime against PyTorch on real validation rows, down to the decisions.

:func:`onnx_parity` scores one split with both models through the same code
(``evaluation.predictions.score_split``: the family's batches, the family's signal) and passes when

1. **values**: every model output of the scored table (``signal``, each regression head ``out_<head>``,
   the class probabilities ``p_*``) agrees elementwise within ``|onnx - torch| <= atol + rtol * |torch|``
   (:data:`PARITY_ATOL`, :data:`PARITY_RTOL`), and so do the graph's raw outputs on the first batch,
   its own ``signal`` output included (what a deployment without this project reads);
2. **decisions**: the signal's sign is the same on every sample whose torch signal is farther than
   ``atol`` from 0 (closer, a sign is float noise, and no threshold rule trades it), and the entry
   decisions ``|signal| >= threshold`` (with their side) are identical at every threshold checked: the
   replay's (``ReplayConfig.threshold``, default 0.1) and the test-period backtest's, fitted on this
   split's torch signal as the backtest does (``backtest.threshold_from_validation``);
3. **trades**: the backtest of this split (``backtest.run_backtest``, the default entry rule, the
   threshold above, no random baselines) gives the same trade list on both tables
   (:func:`same_trades`: every column exactly equal, except the signal value read at entry, which
   is held to the tolerance above).

ONNX Runtime runs at fixed thread settings (:data:`~sentinel_pipeline.deployment.onnx_model.DEFAULT_ORT_THREADS`:
one intra-op and one inter-op thread, sequential), so the figures do not depend on the machine's load.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sentinel_pipeline.data.split_arrays import SplitArrays
from sentinel_pipeline.deployment.onnx_export import SIGNAL_OUTPUT
from sentinel_pipeline.deployment.onnx_model import OnnxModel
from sentinel_pipeline.evaluation.backtest import BacktestConfig, run_backtest, threshold_from_validation
from sentinel_pipeline.evaluation.predictions import CLASS_COLUMNS, head_column, score_split
from sentinel_pipeline.training.families import FamilyData, get_family, get_variant

PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-3
REPLAY_THRESHOLD = 0.1  # replay.config.ReplayConfig's default entry threshold


@dataclass
class ParityReport:
    """Outcome of :func:`onnx_parity`; ``problems`` lists every failed condition (empty: passed)."""

    n_samples: int
    atol: float
    rtol: float
    ort_threads: int
    outputs: list[dict[str, Any]] = field(default_factory=list)  # name, max_abs, max_rel, n_outside
    sign_checked: int = 0
    sign_mismatches: int = 0
    thresholds: list[dict[str, Any]] = field(default_factory=list)  # name, value, entries, mismatches
    trades: dict[str, Any] = field(default_factory=dict)  # rule, n_torch, n_onnx, identical
    seconds: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, **asdict(self)}

    def detail(self) -> str:
        worst = max(self.outputs, key=lambda o: o["max_abs"], default=None)
        crossing = ", ".join(f"{t['name']} {t['value']:.4g}: {t['mismatches']} of {t['entries']} entries differ"
                             for t in self.thresholds)
        trades = self.trades
        text = (f"{self.n_samples} validation samples, ORT {self.ort_threads} thread(s): max |diff| "
                + (f"{worst['max_abs']:.2e} ({worst['name']})" if worst else "n/a")
                + f" (tolerance {self.atol:g} + {self.rtol:g}*|torch|); sign differs on {self.sign_mismatches} of "
                f"{self.sign_checked}; thresholds {crossing or 'none'}; trades "
                + (f"{trades.get('n_torch')} torch / {trades.get('n_onnx')} onnx, identical {trades.get('identical')}"
                   if trades else "n/a"))
        return text if self.passed else text + "; FAILED: " + "; ".join(self.problems)


def _compare(name: str, torch_values: np.ndarray, onnx_values: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    t = np.asarray(torch_values, dtype=np.float64).reshape(-1)
    o = np.asarray(onnx_values, dtype=np.float64).reshape(-1)
    if t.shape != o.shape:
        return {"name": name, "max_abs": float("inf"), "max_rel": float("inf"), "n_outside": int(max(t.size, o.size)),
                "note": f"shapes {t.shape} vs {o.shape}"}
    both_nan = np.isnan(t) & np.isnan(o)
    with np.errstate(invalid="ignore"):
        diff = np.where(both_nan, 0.0, np.abs(o - t))
    diff = np.where(np.isnan(diff), np.inf, diff)
    rel = diff / np.maximum(np.abs(t), 1e-12)
    outside = diff > atol + rtol * np.abs(np.nan_to_num(t))
    return {"name": name, "max_abs": float(diff.max(initial=0.0)), "max_rel": float(rel.max(initial=0.0)),
            "n_outside": int(outside.sum())}


def _decisions(signal: np.ndarray, threshold: float) -> np.ndarray:
    """Entry side per sample at ``threshold`` (+1, -1, 0 for no entry), as the replay and the threshold
    backtest decide it."""
    s = np.asarray(signal, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        enter = np.isfinite(s) & (np.abs(s) >= threshold) & (s != 0)
    return np.where(enter, np.sign(s), 0.0).astype(np.int8)


def _first_batch_outputs(torch_model: nn.Module, onnx_model: OnnxModel, arch: dict[str, Any], split: SplitArrays,
                         data: FamilyData, batch_size: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, torch, onnx) of every graph output on the first scoring batch, the signal output included."""
    spec = get_variant(arch["variant"])
    family = get_family(spec.family)
    batcher = family.make_batcher(split, seq_len=int(arch["seq_len"]), batch_size=batch_size, shuffle=False,
                                  seed=0, data=data)
    if len(batcher) == 0:
        return []
    batch = batcher.batch(0)
    with torch.inference_mode():
        expected = {k: v.float() for k, v in torch_model(batch).items()}
        expected[SIGNAL_OUTPUT] = family.signal(spec, expected)
    got = onnx_model.run(batch)
    return [(name, expected[name].numpy(), got[name]) for name in onnx_model.output_names]


def onnx_parity(
    torch_model: nn.Module,
    onnx_model: OnnxModel,
    arch: dict[str, Any],
    split: SplitArrays,
    *,
    data: FamilyData | None = None,
    replay_threshold: float = REPLAY_THRESHOLD,
    backtest: BacktestConfig | None = None,
    atol: float = PARITY_ATOL,
    rtol: float = PARITY_RTOL,
) -> ParityReport:
    """Compare ``onnx_model`` with ``torch_model`` on every eligible sample of ``split`` (see the module
    docstring). Never raises for a disagreement: the report lists it."""
    data = data or FamilyData()
    backtest = backtest or BacktestConfig()
    spec = get_variant(arch["variant"])
    batch_size = get_family(spec.family).score_batch_size
    report = ParityReport(n_samples=0, atol=atol, rtol=rtol, ort_threads=onnx_model.threads)
    tic = time.perf_counter()
    torch_model.eval()
    ref = score_split(torch_model, arch, split, data=data)
    report.seconds["torch"] = round(time.perf_counter() - tic, 3)
    tic = time.perf_counter()
    got = score_split(onnx_model, arch, split, data=data)
    report.seconds["onnx"] = round(time.perf_counter() - tic, 3)
    report.n_samples = int(len(ref))
    if len(ref) == 0:
        report.problems.append("the split has no samples to compare")
        return report
    if len(got) != len(ref) or not np.array_equal(ref["row"].to_numpy(), got["row"].to_numpy()):
        report.problems.append("the two runtimes scored different samples")
        return report
    columns = ["signal", *(head_column(h.name) for h in spec.heads if h.kind == "regression")]
    columns += [c for c in CLASS_COLUMNS if c in ref]
    for name in columns:
        report.outputs.append(_compare(name, ref[name].to_numpy(), got[name].to_numpy(), atol, rtol))
    for name, t, o in _first_batch_outputs(torch_model, onnx_model, arch, split, data, batch_size):
        report.outputs.append(_compare(f"graph:{name}", t, o, atol, rtol))
    for out in report.outputs:
        if out["n_outside"]:
            report.problems.append(f"{out['name']}: {out['n_outside']} values outside the tolerance "
                                   f"(max |diff| {out['max_abs']:.3g})" + (f", {out['note']}" if "note" in out else ""))
    s_t, s_o = ref["signal"].to_numpy(np.float64), got["signal"].to_numpy(np.float64)
    decided = np.isfinite(s_t) & (np.abs(s_t) > atol)
    report.sign_checked = int(decided.sum())
    report.sign_mismatches = int((np.sign(s_t[decided]) != np.sign(s_o[decided])).sum())
    if report.sign_mismatches:
        report.problems.append(f"signal sign differs on {report.sign_mismatches} samples")
    thresholds = [("replay", float(replay_threshold))]
    try:
        thresholds.append(("backtest", threshold_from_validation(s_t, backtest.fraction)))
    except ValueError as exc:
        report.problems.append(f"no backtest threshold: {exc}")
    for name, value in thresholds:
        d_t, d_o = _decisions(s_t, value), _decisions(s_o, value)
        mismatches = int((d_t != d_o).sum())
        report.thresholds.append({"name": name, "value": value, "entries": int((d_t != 0).sum()),
                                  "mismatches": mismatches})
        if mismatches:
            report.problems.append(f"{mismatches} entry decisions differ at the {name} threshold {value:.4g}")
    report.trades = _trade_lists(ref, got, split, backtest, dict(thresholds).get("backtest"))
    if report.trades.get("identical") is False:
        report.problems.append(f"backtest trade lists differ ({report.trades['n_torch']} torch vs "
                               f"{report.trades['n_onnx']} onnx trades)")
    return report


def _trade_lists(ref: pd.DataFrame, got: pd.DataFrame, split: SplitArrays, config: BacktestConfig,
                 threshold: float | None) -> dict[str, Any]:
    """The backtest trade lists of both tables (same rule, same threshold) and whether they are identical."""
    horizon = split.label_params.get("horizon")
    if threshold is not None and config.threshold is None:
        config = dataclasses.replace(config, threshold=threshold)
    try:
        a = run_backtest(ref, config, horizon=horizon, random_baseline=False)
    except ValueError as exc:  # a property of the split (e.g. no label horizon), the same for both runtimes
        return {"identical": None, "note": f"no backtest on this split: {exc}"}
    b = run_backtest(got, config, horizon=horizon, random_baseline=False)
    return {"rule": a.info.get("entry"), "n_torch": int(len(a.trades)), "n_onnx": int(len(b.trades)),
            "identical": same_trades(a.trades, b.trades)}


def same_trades(a: pd.DataFrame, b: pd.DataFrame, value_columns: tuple[str, ...] = ("signal",)) -> bool:
    """Whether two trade lists are the same trades: every column exactly equal (symbol, times, side,
    weight, bars, prices, returns, exit reason), except ``value_columns`` (the model's signal at the
    entry, a reading rather than a decision), which must agree within the parity tolerance."""
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return False
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    exact = [c for c in a.columns if c not in value_columns]
    if not a[exact].equals(b[exact]):
        return False
    for c in value_columns:
        if c in a and not np.allclose(a[c].to_numpy(np.float64), b[c].to_numpy(np.float64),
                                      rtol=PARITY_RTOL, atol=PARITY_ATOL, equal_nan=True):
            return False
    return True
