"""A trained model's outputs on every sample of one split, as one flat table.

:func:`score_split` runs the model (eval mode, inference only) over the split's eligible samples in
chronological order (the batches of the model's family, as training built them: windows per sample,
or whole days for a day family) and returns a
:class:`~pandas.DataFrame` with one row per sample:

==================  ==========================================================================
column              meaning
==================  ==========================================================================
``symbol``          the sample's symbol
``timestamp``       its bar time (``datetime64[ns, UTC]``)
``row``             its row in the split (rows are sorted by symbol, then time)
``signal``          the trading signal (the family's ``signal``; window family: P(up) - P(down)
                    for classifiers, the first head's output otherwise)
``out_<head>``      every regression head's output (prefixed: a head may share its target's name)
``p_down/p_neutral/p_up``, ``pred_class``  the classifier head's probabilities and argmax (classifiers)
``tb_class``        realised triple-barrier class (0 down, 1 neutral, 2 up)
``<target>``        every float target of the split (``fwd_ret_1`` .. ``tb_return_atr``)
==================  ==========================================================================

Everything downstream (the statistical gates, the test-period backtest) reads this table and
nothing else, so they can be tested on tables built by hand.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sentinel_pipeline.data.split_arrays import SplitArrays
from sentinel_pipeline.training.data_loader import chronological_end_rows
from sentinel_pipeline.training.families import N_CLASSES, FamilyData, get_family, get_variant

CLASS_COLUMNS: tuple[str, ...] = ("p_down", "p_neutral", "p_up")
SCORE_BATCH = 1024  # samples per batch of the window family (its ModelFamily.score_batch_size)


def head_column(head: str) -> str:
    """The column of a regression head's output in the scored table."""
    return f"out_{head}"


def score_split(
    model: nn.Module,
    arch: dict[str, Any],
    split: SplitArrays,
    *,
    batch_size: int | None = None,
    limit_samples: int | None = None,
    data: FamilyData | None = None,
) -> pd.DataFrame:
    """One row per eligible sample of ``split`` (see the module docstring), chronological order.

    ``batch_size`` is in the family's unit (default: the family's ``score_batch_size``, 1024 samples for
    the window family); ``data`` is the family's extra inputs (a
    bundle's ``LoadedBundle.family_data``; none for the window family). A day family's batches come in
    (day, symbol) order; the table is sorted by (timestamp, symbol) whatever the family."""
    spec = get_variant(arch["variant"])
    family = get_family(spec.family)
    if limit_samples is not None:
        split = dataclasses.replace(split, sample_end_rows=np.sort(chronological_end_rows(split, limit_samples)))
    if batch_size is None:
        batch_size = family.score_batch_size
    batcher = family.make_batcher(split, seq_len=int(arch["seq_len"]), batch_size=batch_size, shuffle=False,
                                  seed=0, data=data or FamilyData())
    n = batcher.n_samples
    heads = [h for h in spec.heads if h.kind == "regression"]
    classifier = next((h for h in spec.heads if h.kind == "classification"), None)
    signal = np.empty(n, dtype=np.float64)
    head_out = {head_column(h.name): np.empty(n, dtype=np.float64) for h in heads}
    probs = np.empty((n, N_CLASSES), dtype=np.float64) if classifier is not None else None
    rows = np.empty(n, dtype=np.int64)
    model.eval()
    start = 0
    with torch.inference_mode():
        for batch in batcher:
            outputs = {k: v.float() for k, v in model(batch).items()}
            size = int(batch["end_rows"].shape[0])
            sl = slice(start, start + size)
            rows[sl] = batch["end_rows"].numpy()
            signal[sl] = family.signal(spec, outputs).double().numpy()
            for h in heads:
                head_out[head_column(h.name)][sl] = outputs[h.name].reshape(-1).double().numpy()
            if probs is not None and classifier is not None:
                probs[sl] = torch.softmax(outputs[classifier.name], dim=-1).double().numpy()
            start += size
    if start != n:
        raise RuntimeError(f"scoring saw {start} samples, the batcher has {n}")
    symbols = np.asarray(split.symbols, dtype=object)
    frame: dict[str, Any] = {
        "symbol": symbols[np.asarray(split.symbol_idx)[rows]] if len(symbols) else np.asarray(split.symbol_idx)[rows],
        "timestamp": pd.to_datetime(np.asarray(split.timestamp)[rows], utc=True),
        "row": rows,
        "signal": signal,
        **head_out,
    }
    if probs is not None:
        for j, name in enumerate(CLASS_COLUMNS):
            frame[name] = probs[:, j]
        frame["pred_class"] = probs.argmax(axis=1).astype(np.int64)
    frame["tb_class"] = np.asarray(split.tb_label)[rows].astype(np.int64) + 1
    targets = np.asarray(split.targets)[rows]
    for j, name in enumerate(split.target_names):
        frame[name] = targets[:, j].astype(np.float64)
    table = pd.DataFrame(frame)
    order = np.lexsort((np.asarray(split.symbol_idx)[rows], np.asarray(split.timestamp)[rows]))
    if not np.array_equal(order, np.arange(n)):  # a batcher in another order (none of the window family's)
        table = table.iloc[order].reset_index(drop=True)
    return table


def bar_seconds(timestamps: pd.Series | np.ndarray) -> float:
    """The data's typical bar spacing in seconds: the median gap between consecutive distinct times."""
    ts = np.unique(pd.to_datetime(pd.Series(np.asarray(timestamps)), utc=True).to_numpy("datetime64[ns]"))
    if ts.size < 2:
        return float("nan")
    return float(np.median(np.diff(ts).astype(np.int64)) / 1e9)
