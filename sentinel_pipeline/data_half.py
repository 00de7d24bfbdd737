"""File-level runners of the data half: raw parquet -> ... -> Arrow cache.

Each ``run_*`` function reads its upstream artefacts from ``ArtifactPaths``, calls the stage module,
writes its artefacts atomically and returns a JSON-able summary (the Dagster assets turn it into UI
metadata; the benchmark and the tests call the same functions). ``run_data_half`` runs them all in
order. No Dagster import here.

I/O between stages is most of the data half's time and memory at 10M bars (the compiled stage code
is a small share), so the bar-ordered intermediate tables (bars, bar flags, features, labels, split
assignment) are uncompressed Arrow IPC files (``data.tables``): written with one copy into the page
cache, hashed as they are written (the stage commit does not read them again), and read by mapping only
the columns a stage uses. The labels stage writes only the label columns (``labels.arrow``, with the
``symbol``/``timestamp`` keys), never a copy of the features: the labelled dataset is the features and
the labels side by side (``data.dataset.LabelledDataset``, which checks that their rows match). The
scalers gather only their fit rows and the HDF5 stage writes the three split files in row chunks, one
matrix at a time, so no wide table is whole in memory. Arrow's memory pool hands freed memory back to
the OS after each stage.

Input: the parquet/CSV files of the raw landing zone (``paths.raw_dir``, a folder or a single file);
only when it is empty or absent, the embedded synthetic default market, generated into its own folder
(``paths.synthetic_dir``, never into the landing zone) and named as such everywhere (``data_source`` in
every stage summary, the log lines, ``summary.py``).

Presets (:data:`PRESETS`, ``--preset`` on the CLI): ``default`` (the intraday configuration above) and
``panel`` (:func:`panel_config`: the daily universe configuration: daily features with month and
cross-sectional ranks, labels in trading days). The panel preset reads the raw path it is given
(``--raw FILE_OR_FOLDER``, ``raw_dir_override``); without one it reads the synthetic panel
(``data/synthetic_panel.py``), generated into ``<data_dir>/synthetic_panel/`` and named "synthetic
panel" in every ``data_source`` line; it never reads the default landing zone ``<data_dir>/raw``. The raw stage fails early, naming the files, when the data is too short
for the configuration (:func:`minimum_history`, :func:`check_history`).

Commit: :func:`build_stage` builds a stage into a temporary folder and commits its files together with
its ``.stage.json`` record only when it succeeded (``stage_cache.build_stage``); a failed stage leaves
the previous outputs as they were. :func:`stage_fingerprint` is each stage's input fingerprint, chained
from the **content digests** of the upstream files it reads (``stage_cache.upstream_state``); the
Dagster assets and :func:`run_data_half` both use these.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from sentinel_pipeline.atomic_io import write_json_atomic
from sentinel_pipeline.data import arrow_cache, hdf5_splits, labels, raw_bars, scalers, splits, tables
from sentinel_pipeline.data import features as feats
from sentinel_pipeline.data import ffd as ffd_mod
from sentinel_pipeline.data.dataset import LabelledDataset
from sentinel_pipeline.data.feature_contract import FeatureContract, read_contract
from sentinel_pipeline.data.synthetic_market import (
    SyntheticMarketConfig,
    describe_market,
    ensure_synthetic_default,
)
from sentinel_pipeline.data.synthetic_panel import (
    SyntheticPanelConfig,
    describe_panel,
    ensure_synthetic_panel,
    panel_sector_file,
)
from sentinel_pipeline.paths import SPLITS, ArtifactPaths
from sentinel_pipeline.stage_cache import (
    StageInputError,
    failed_dir,
    file_digest,
    files_fingerprint,
    fingerprint,
    last_failure,
    read_record,
    record_failure,
    upstream_state,
)
from sentinel_pipeline.stage_cache import build_stage as commit_stage


@dataclass
class DataHalfConfig:
    """Every knob of the data half, with the project's defaults."""

    ingest: raw_bars.IngestConfig = field(default_factory=raw_bars.IngestConfig)
    synthetic: SyntheticMarketConfig = field(default_factory=SyntheticMarketConfig)
    generate_default_when_empty: bool = True
    features: feats.FeatureConfig = field(default_factory=feats.FeatureConfig)
    labels: labels.LabelConfig = field(default_factory=labels.LabelConfig)
    splits: splits.SplitConfig = field(default_factory=splits.SplitConfig)
    # set (the panel preset): the raw input is the given raw path, else this synthetic panel
    synthetic_panel: SyntheticPanelConfig | None = None
    preset: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def panel_config(*, synthetic_panel: SyntheticPanelConfig | None = None, **overrides: Any) -> DataHalfConfig:
    """The daily panel preset: daily features (``bar_frequency="daily"``: no hour bucket or session bar;
    month; cross-sectional ranks of momentum, volatility and volume), labels in trading days
    (``labels.daily_label_config``: triple barrier 2 ATR over 10 days, forward returns 1/5/10/20 days,
    label window 20) and chronological 70/15/15 splits purged by the 20-day label window with a 5-day
    embargo. Bar quality keeps its defaults: holes are counted in weekdays against each symbol's own
    calendar, so weekends and holidays are no quirk, and a hole is 20 or more missed trading days (the
    label window). Raw input: the raw path given, else the synthetic panel (``synthetic_panel``)."""
    base: dict[str, Any] = {
        "features": feats.daily_feature_config(),
        "labels": labels.daily_label_config(),
        "splits": splits.SplitConfig(train_frac=0.70, val_frac=0.15, embargo_bars=5),
        "synthetic_panel": synthetic_panel if synthetic_panel is not None else SyntheticPanelConfig(),
        "preset": "panel",
    }
    return DataHalfConfig(**{**base, **overrides})


PRESETS: dict[str, Callable[..., DataHalfConfig]] = {"default": DataHalfConfig, "panel": panel_config}


def synthetic_panel_dir(paths: ArtifactPaths) -> Path:
    """Where the panel preset generates its synthetic panel (never a raw landing zone)."""
    return paths.data_dir / "synthetic_panel"


def synthetic_panel_sector_file(paths: ArtifactPaths, cfg: DataHalfConfig) -> Path | None:
    """The ``symbol, sector`` CSV of the synthetic panel when it is the raw input (the panel preset without
    a raw path; e.g. for the symbol graph's sector edges), else None. Written with the panel."""
    if cfg.synthetic_panel is None or paths.raw_dir_override is not None:
        return None
    return panel_sector_file(synthetic_panel_dir(paths), cfg.synthetic_panel)


def _release_arrow_memory() -> None:
    """Hand the memory that Arrow's pool keeps after frees back to the OS (mimalloc/jemalloc hold it), and
    what glibc's heap keeps (``malloc_trim``: about 290 MB after the raw stage at 10M bars, which every
    later stage would otherwise start from)."""
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _glibc()


def _read_frame(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The frame of an intermediate table (``tables.read_frame``: what ``pd.read_parquet`` gave before)."""
    return tables.read_frame(path, columns)


def labelled_dataset(paths: ArtifactPaths) -> LabelledDataset:
    """The features and the labels side by side (row count and keys checked, ``data.dataset``)."""
    return LabelledDataset(paths.features, paths.labels)


def _timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a stage body, timed; Python's cyclic garbage collector is paused while it runs (a stage makes
    few objects but many allocations, and each full collection walks every object the imports made:
    2-3 % of a stage's CPU time at 10M bars) and the memory the stage freed is handed back after it."""
    t0 = time.perf_counter()
    collecting = gc.isenabled()
    gc.disable()
    try:
        out = fn()
    finally:
        if collecting:
            gc.enable()
        _release_arrow_memory()
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _data_source(paths: ArtifactPaths, upstream: str) -> str | None:
    """The ``data_source`` line the upstream stage recorded (None when it has no record)."""
    record = read_record(paths.stage_dir(upstream))
    return None if record is None else record.get("metadata", {}).get("data_source")


# -- stage 1 -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RawInput:
    """What the raw stage reads: the landing zone's files, or the synthetic default when it is empty."""

    files: list[Path]
    synthetic: bool
    data_source: str  # one line for logs, metadata and the summary
    folder: Path


def resolve_raw_input(paths: ArtifactPaths, cfg: DataHalfConfig) -> RawInput:
    """The landing zone's parquet/CSV files (``paths.raw_dir`` may also be one such file); when it is
    empty or absent (and the default is on), the synthetic default market, generated into
    ``paths.synthetic_dir``. With ``cfg.synthetic_panel`` set (the panel preset) the raw path is read only
    when one was given (``raw_dir_override``), else the synthetic panel is generated into
    :func:`synthetic_panel_dir`. The landing zone is only read. A file there that the stage cannot read
    raises ``RawDataError`` naming it."""
    if cfg.synthetic_panel is not None and paths.raw_dir_override is None:
        if not cfg.generate_default_when_empty:
            raise raw_bars.RawDataError(
                f"the {cfg.preset} preset got no raw path (give a parquet/CSV file or folder: --raw, raw_dir) and the "
                f"synthetic panel is off"
            )
        path = ensure_synthetic_panel(synthetic_panel_dir(paths), cfg.synthetic_panel)
        return RawInput([path], True, describe_panel(cfg.synthetic_panel), path.parent)
    files = raw_bars.list_input_files(paths.raw_dir)
    if files:
        if paths.raw_dir.is_file():
            return RawInput(files, False, f"raw file: {paths.raw_dir}", paths.raw_dir.parent)
        return RawInput(files, False, f"raw files: {len(files)} file(s) in {paths.raw_dir}", paths.raw_dir)
    if cfg.synthetic_panel is not None:  # a raw path was given for the panel: never fall back to another market
        raise raw_bars.RawDataError(
            f"{paths.raw_dir}: no *.parquet or *.csv files at the raw path given to the {cfg.preset} preset (give a "
            f"file or a folder of bars, or no raw path for the synthetic panel)"
        )
    if not cfg.generate_default_when_empty:
        raise raw_bars.RawDataError(
            f"{paths.raw_dir}: no *.parquet or *.csv files in the raw data folder (and the synthetic default is off)"
        )
    path = ensure_synthetic_default(paths.synthetic_dir, cfg.synthetic)
    return RawInput([path], True, describe_market(cfg.synthetic), paths.synthetic_dir)


def _resolve_or_mark(paths: ArtifactPaths, cfg: DataHalfConfig) -> RawInput:
    """:func:`resolve_raw_input`; an unreadable landing zone marks the raw stage's last run as failed
    (its previous outputs stay), so no later stage reuses them as if nothing had happened."""
    try:
        return resolve_raw_input(paths, cfg)
    except raw_bars.RawDataError as exc:
        record_failure(paths.raw_bars_dir, exc)
        raise


def raw_input_files(paths: ArtifactPaths, cfg: DataHalfConfig) -> list[Path]:
    """The files the raw stage reads (see :func:`resolve_raw_input`)."""
    return resolve_raw_input(paths, cfg).files


def minimum_history(cfg: DataHalfConfig) -> dict[str, Any]:
    """The least history the configuration needs, derived from the feature, label and split configs.

    A sample at bar ``t`` of a symbol needs ``seq_len`` bars of valid features ending at ``t`` (the
    first ``warmup`` bars of a symbol have none) and ``purge`` = max(label window, purge_bars) bars
    after ``t`` in the same symbol, so a symbol with fewer than ``warmup + seq_len + purge`` bars can
    never give one sample (``min_symbol_bars``). Per split: train needs that many rows of a symbol;
    val and test each need ``embargo + purge + 1`` (their warm-up comes from earlier bars). With
    fractional cuts that is ``min_timestamps`` distinct timestamps in all.
    """
    warm = feats.warmup_bars(cfg.features)
    seq = int(cfg.features.seq_len)
    window = labels.label_window_bars(cfg.labels)
    purge = max(window, cfg.splits.purge_bars if cfg.splits.purge_bars is not None else window)
    embargo = int(cfg.splits.embargo_bars)
    per_split = {"train": warm + seq + purge, "val": embargo + purge + 1, "test": embargo + purge + 1}
    out: dict[str, Any] = {
        "feature_warmup_bars": warm, "seq_len": seq, "label_window_bars": window, "purge_bars": purge,
        "embargo_bars": embargo, "min_symbol_bars": warm + seq + purge, "min_rows_per_split": per_split,
        "min_timestamps": None,
    }
    if not cfg.splits.uses_dates:
        fracs = {"train": cfg.splits.train_frac, "val": cfg.splits.val_frac,
                 "test": 1.0 - cfg.splits.train_frac - cfg.splits.val_frac}
        out["min_timestamps"] = max(math.ceil(round(per_split[k] / fracs[k], 9)) for k in per_split)
    return out


def ingest_config(cfg: DataHalfConfig) -> raw_bars.IngestConfig:
    """The ingest config the raw stage runs with: ``min_symbol_bars`` raised to the derived minimum."""
    need = minimum_history(cfg)["min_symbol_bars"]
    return replace(cfg.ingest, min_symbol_bars=max(cfg.ingest.min_symbol_bars, need))


def _history_text(h: dict[str, Any], splits_cfg: splits.SplitConfig) -> str:
    need = h["min_rows_per_split"]
    text = (f"the configuration needs at least {h['min_symbol_bars']} bars per symbol (feature warm-up "
            f"{h['feature_warmup_bars']} + sequence window {h['seq_len']} + label window/purge {h['purge_bars']}) and per "
            f"split at least {need['train']} train, {need['val']} val and {need['test']} test rows of a symbol "
            f"(embargo {h['embargo_bars']} + purge {h['purge_bars']} + 1 for val and test)")
    if h["min_timestamps"] is not None:
        text += (f", i.e. at least {h['min_timestamps']} distinct timestamps with train_frac={splits_cfg.train_frac}, "
                 f"val_frac={splits_cfg.val_frac}")
    return text


def check_history(result: raw_bars.IngestResult, cfg: DataHalfConfig, files: list[Path]) -> dict[str, Any]:
    """Fail early (``InsufficientHistoryError`` naming the files, the symbols and the minimum) when no
    bars remain or the bars cannot give samples in each of train/val/test; returns the samples each
    split can hold at most (the split stage's own rules on idealised features and labels)."""
    h = minimum_history(cfg)
    names = ", ".join(str(f) for f in files[:5]) + (f" (+{len(files) - 5} more)" if len(files) > 5 else "")
    short = result.report.get("short_history_symbols") or {}
    short_text = ""
    if short:
        shown = ", ".join(f"{k}: {v} bars" for k, v in list(short.items())[:10])
        short_text = f"; {result.report.get('n_short_history_symbols', len(short))} symbol(s) too short and quarantined ({shown})"
    bars = result.bars
    if len(bars) == 0:
        raise raw_bars.InsufficientHistoryError(
            f"{names}: no usable bars left ({result.report['n_rows_in']} rows in, "
            f"{result.report['n_quarantined']} quarantined{short_text}); {_history_text(h, cfg.splits)}"
        )
    codes = bars["symbol"].to_numpy()
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    lengths = np.diff(np.r_[starts, len(bars)])
    pos = np.arange(len(bars)) - np.repeat(starts, lengths)
    n_sym = np.repeat(lengths, lengths)
    frame = pd.DataFrame({
        "symbol": bars["symbol"], "timestamp": bars["timestamp"],
        "feature_valid": pos >= h["feature_warmup_bars"] + h["seq_len"] - 1,  # a full window of valid features
        "label_eligible": pos + h["label_window_bars"] < n_sym,
    })
    try:
        _, summary = splits.assign_splits(frame, cfg.splits, h["label_window_bars"])
    except ValueError as exc:
        longest = ", ".join(f"{bars['symbol'].iloc[s]}: {n} bars" for s, n in
                            sorted(zip(starts, lengths, strict=True), key=lambda x: -x[1])[:5])
        raise raw_bars.InsufficientHistoryError(
            f"{names}: too little history for train/val/test ({exc}); {_history_text(h, cfg.splits)}. The data has "
            f"{bars['timestamp'].nunique()} distinct timestamps and {len(starts)} symbol(s) (longest: {longest}){short_text}"
        ) from exc
    return {s: summary["splits"][s]["samples"] for s in SPLITS}


def run_raw_bars(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    """Ingest: bars + quarantine + quality report.

    The quarantine and the report are written first (so a failure can be inspected); then the history
    check (``InsufficientHistoryError``) and the quarantine limit (``QuarantineLimitError``); the bars
    and their flags are written only when both passed.
    """

    def go() -> dict[str, Any]:
        source = resolve_raw_input(paths, cfg)
        ingest = ingest_config(cfg)
        result = raw_bars.load_bar_files(source.files, ingest, origin=source.folder)
        result.report["data_source"] = source.data_source
        result.report["synthetic"] = source.synthetic
        result.report["minimum_history"] = minimum_history(cfg)
        raw_bars.write_parquet(result.quarantine, paths.quarantine)
        write_json_atomic(paths.quality_report, result.report)
        possible = check_history(result, cfg, source.files)
        raw_bars.enforce_quarantine_limit(result, ingest)
        result.report["max_samples_per_split"] = possible
        write_json_atomic(paths.quality_report, result.report)
        tables.write_table(result.bars, paths.bars)
        if result.flags is None:
            raise ValueError(f"{paths.bar_flags}: the ingest result has no bar flags to write")
        tables.write_table(result.flags, paths.bar_flags)
        return {"report": result.report, "input_files": [str(f) for f in source.files],
                "data_source": source.data_source, "synthetic": source.synthetic}

    return _timed(go)


# -- stage 2 -------------------------------------------------------------------------------------
def ffd_selection_path(paths: ArtifactPaths) -> Path:
    """Where the FFD order's selection report lies (beside the contract that carries the order)."""
    return paths.feature_contract.parent / "ffd_selection.json"


def run_feature_contract(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    """The contract of ``cfg.features``. With the FFD group on and ``d`` not given, ``d`` is chosen here
    on the train window of the raw bars (``ffd.select_d``: timestamps and closes only, no labels) and
    the selection report is written beside the contract."""
    fcfg = cfg.features
    out: dict[str, Any] = {}
    if fcfg.ffd is not None:
        if fcfg.ffd.d is None:
            bars = _read_frame(paths.bars, ["symbol", "timestamp", "close"])
            sel = ffd_mod.select_d(bars["symbol"].to_numpy(dtype=object), labels.timestamps_ns(bars["timestamp"]),
                                   bars["close"].to_numpy(dtype=np.float64), fcfg.ffd, cfg.splits)
            fcfg = feats.resolve_ffd(fcfg, sel["d"])
        else:
            sel = {"d": fcfg.ffd.d, "adf_p": None, "passed": None, "given": True,
                   "window": int(ffd_mod.ffd_weights(fcfg.ffd.d, fcfg.ffd.tau, fcfg.ffd.max_window).size)}
        write_json_atomic(ffd_selection_path(paths), {**sel, "tau": fcfg.ffd.tau, "max_window": fcfg.ffd.max_window,
                                                      "adf_level": fcfg.ffd.adf_level})
        out["ffd"] = read_ffd_selection(paths)
    contract = feats.build_contract(fcfg)
    contract.write(paths.feature_contract.parent)  # the contract's own place, beside the features
    return {"feature_contract_hash": contract.hash, "dims": contract.dims(), "n_features": len(contract.features),
            **out}


def read_ffd_selection(paths: ArtifactPaths) -> dict[str, Any]:
    return json.loads(ffd_selection_path(paths).read_text(encoding="utf-8"))


def resolved_feature_config(paths: ArtifactPaths, cfg: DataHalfConfig) -> feats.FeatureConfig:
    """``cfg.features`` with the FFD order the feature_contract stage chose (from the written contract)."""
    fcfg = cfg.features
    if fcfg.ffd is None or fcfg.ffd.d is not None:
        return fcfg
    contract = load_contract(paths)
    spec = next((f for f in contract.features if f.name == "ffd_logclose"), None)
    if spec is None or spec.params.get("d") is None:
        raise ValueError(f"{paths.feature_contract}: the FFD group is on but the contract carries no FFD order; "
                         "rebuild the feature contract first")
    return feats.resolve_ffd(fcfg, float(spec.params["d"]))


def load_contract(paths: ArtifactPaths) -> FeatureContract:
    return read_contract(paths.feature_contract)


def run_features(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        contract = load_contract(paths)
        fcfg = resolved_feature_config(paths, cfg)
        expected = feats.build_contract(fcfg)
        if expected.hash != contract.hash:
            raise ValueError(
                f"{paths.feature_contract}: contract hash {contract.hash} does not match the feature config "
                f"({expected.hash}); rebuild the feature contract first"
            )
        bars = _read_frame(paths.bars)
        frame = feats.compute_features(bars, fcfg)
        del bars  # the frame shares its bar columns
        tables.write_table(frame, paths.features)
        valid = frame["feature_valid"].to_numpy()
        return {
            "rows": int(len(frame)),
            "symbols": int(frame["symbol"].nunique()),
            "valid_rows": int(valid.sum()),
            "valid_fraction": float(valid.mean()) if len(valid) else 0.0,
            "feature_contract_hash": contract.hash,
            "dims": contract.dims(),
            "data_source": _data_source(paths, "raw_bars"),
            **({"ffd": read_ffd_selection(paths)} if fcfg.ffd is not None else {}),
        }

    return _timed(go)


# -- stage 3 -------------------------------------------------------------------------------------
def run_labels(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    """Labels in their own table (``labels.arrow``: ``symbol``, ``timestamp``, then the label columns),
    row for row beside the features, which stay as they are: readers put the two side by side
    (``data.dataset.LabelledDataset`` checks the rows match)."""

    def go() -> dict[str, Any]:
        frame = _read_frame(paths.features, list(labels.REQUIRED_COLUMNS))
        quirks = _bar_quirks(paths, frame)
        labelled, stats = labels.label_dataset(frame, cfg.labels, quirks)
        del frame
        keys = ["symbol", "timestamp"]
        tables.write_table(labelled[[*keys, *labels.label_columns(cfg.labels)]], paths.labels)
        rows = len(labelled)
        del labelled
        return {"stats": stats, "label_params": labels.label_params(cfg.labels), "rows": int(rows),
                "data_source": _data_source(paths, "features")}

    return _timed(go)


def _bar_quirks(paths: ArtifactPaths, features: pd.DataFrame) -> Any:
    """The raw stage's per-bar quirk bits (``bar_flags.arrow``), checked to be the features' rows."""
    if not paths.bar_flags.is_file():
        raise ValueError(f"{paths.bar_flags}: bar flags of the raw stage are missing; rebuild raw_bars")
    flags = _read_frame(paths.bar_flags, ["timestamp", "quirks"])
    same = len(flags) == len(features) and bool(
        (labels.timestamps_ns(flags["timestamp"]) == labels.timestamps_ns(features["timestamp"])).all()
    )
    if not same:
        raise ValueError(
            f"{paths.bar_flags}: bar flags ({len(flags)} rows) are not the rows of {paths.features} "
            f"({len(features)} rows); rebuild raw_bars and features"
        )
    return flags["quirks"].to_numpy()


# -- stage 4 -------------------------------------------------------------------------------------
def run_splits(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        cols = ["symbol", "timestamp", "label_eligible", "feature_valid"]
        df = labelled_dataset(paths).frame(cols)
        assignment, summary = splits.assign_splits(df, cfg.splits, labels.label_window_bars(cfg.labels))
        tables.write_table(assignment, paths.split_assignment)
        write_json_atomic(paths.split_summary, summary)
        return {"summary": summary, "data_source": _data_source(paths, "labels")}

    return _timed(go)


# -- stage 5 -------------------------------------------------------------------------------------
def run_scalers(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        contract = load_contract(paths)
        assignment = _read_frame(paths.split_assignment, ["split"])
        fitted = scalers.fit_scalers_from_dataset(labelled_dataset(paths), assignment, contract)
        scalers.save_scalers(paths.scalers_dir, fitted)
        return {"info": fitted.info, "feature_contract_hash": contract.hash, "data_source": _data_source(paths, "splits")}

    return _timed(go)


# -- stage 6 -------------------------------------------------------------------------------------
def run_hdf5(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        contract = load_contract(paths)
        assignment = _read_frame(paths.split_assignment, ["split", "sample_ok"])
        fitted = scalers.load_scalers(paths.scalers_dir, contract.hash)
        written = hdf5_splits.write_splits_from_dataset(
            labelled_dataset(paths), assignment, contract, fitted, labels.label_params(cfg.labels), paths.hdf5_dir
        )
        return {
            "feature_contract_hash": contract.hash,
            "splits": {s: hdf5_splits.split_summary(written[s]) for s in SPLITS},
            "data_source": _data_source(paths, "scalers"),
        }

    return _timed(go)


# -- stage 7 -------------------------------------------------------------------------------------
def run_arrow_cache(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    """The three caches are built on two threads (the train split on one, validation and test on the
    other): each is a copy of mapped pages into the page cache plus sha256 passes, all of which release
    the GIL, so the second core takes the smaller splits while the first writes the train cache."""

    def build(s: str) -> dict[str, Any]:
        arrow_path, ok, details = arrow_cache.build_and_check_cache(paths.h5(s), paths.arrow(s))
        return {"path": str(arrow_path), "matches_hdf5": ok, **details}

    def go() -> dict[str, Any]:
        with ThreadPoolExecutor(max_workers=2) as pool:
            train = pool.submit(build, SPLITS[0])
            rest = pool.submit(lambda: {s: build(s) for s in SPLITS[1:]})
            out = {SPLITS[0]: train.result(), **rest.result()}
        return {"splits": out, "data_source": _data_source(paths, "hdf5_splits")}

    return _timed(go)


STAGES: tuple[tuple[str, Callable[[ArtifactPaths, DataHalfConfig], dict[str, Any]]], ...] = (
    ("raw_bars", run_raw_bars),
    ("feature_contract", run_feature_contract),
    ("features", run_features),
    ("labels", run_labels),
    ("splits", run_splits),
    ("scalers", run_scalers),
    ("hdf5_splits", run_hdf5),
    ("arrow_cache", run_arrow_cache),
)


# files of a failed build kept for inspection in ``<stage>/last_failed/`` (the good outputs stay)
KEEP_ON_FAILURE: dict[str, tuple[str, ...]] = {"raw_bars": ("quarantine.parquet", "quality_report.json")}


def _contract_digest(paths: ArtifactPaths) -> str:
    if not paths.feature_contract.is_file():
        raise ValueError(f"{paths.feature_contract}: the feature contract is missing; build feature_contract first")
    return file_digest(paths.feature_contract)


# the staged stages each stage reads, directly (the record names used in messages in parentheses)
UPSTREAMS: dict[str, tuple[str, ...]] = {
    "raw_bars": (),
    "features": ("raw_bars",),
    "labels": ("features", "raw_bars"),
    "splits": ("labels", "features"),
    "scalers": ("splits", "labels", "features"),
    "hdf5_splits": ("scalers", "splits", "labels", "features"),
    "arrow_cache": ("hdf5_splits",),
}


def check_ancestors(name: str, paths: ArtifactPaths) -> None:
    """``StageInputError`` when a stage further up the chain failed its last run: its descendants'
    outputs are consistent with each other but not with the current inputs."""
    seen: set[str] = set()
    todo = list(UPSTREAMS[name])
    while todo:
        stage = todo.pop()
        if stage in seen:
            continue
        seen.add(stage)
        failure = last_failure(paths.stage_dir(stage))
        if failure is not None:
            raise StageInputError(
                f"stage '{stage}' upstream of '{name}' failed its last run ({failure.get('failed_at')}): "
                f"{failure.get('error')}; the outputs built from its previous inputs are not reused. Fix the cause "
                f"and rebuild from '{stage}' (details in {failed_dir(paths.stage_dir(stage))})"
            )
        todo.extend(UPSTREAMS[stage])


def stage_fingerprint(name: str, paths: ArtifactPaths, cfg: DataHalfConfig) -> str:
    """The input fingerprint of a staged stage: its config, the code version and the content digests of
    every upstream file it reads (``upstream_state``; raises ``StageInputError`` for an upstream whose
    files differ from its record, or when any stage up the chain failed its last run)."""
    up = upstream_state
    check_ancestors(name, paths)
    if name == "raw_bars":
        source = _resolve_or_mark(paths, cfg)
        return fingerprint(stage="raw_bars", files=files_fingerprint(source.files), synthetic=source.synthetic,
                           ingest=asdict(ingest_config(cfg)), history=minimum_history(cfg), splits=asdict(cfg.splits))
    bars = up(paths.raw_bars_dir, "raw_bars", [paths.bars.name]) if name == "features" else None
    flags = up(paths.raw_bars_dir, "raw_bars", [paths.bar_flags.name]) if name == "labels" else None
    # the labelled dataset is the features and the labels side by side: both files are read
    dataset = ({"features": up(paths.features_dir, "features", [paths.features.name]),
                "labels": up(paths.labels_dir, "labelled_dataset", [paths.labels.name])}
               if name in ("splits", "scalers", "hdf5_splits") else None)
    assignment = (up(paths.splits_dir, "dataset_splits", [paths.split_assignment.name])
                  if name in ("scalers", "hdf5_splits") else None)
    if name == "features":
        return fingerprint(stage="features", raw=bars, contract=_contract_digest(paths))
    if name == "labels":
        return fingerprint(stage="labels", features=up(paths.features_dir, "features", [paths.features.name]),
                           flags=flags, labels=labels.label_params(cfg.labels))
    if name == "splits":
        return fingerprint(stage="splits", labels=dataset, splits=asdict(cfg.splits),
                           label_window=labels.label_window_bars(cfg.labels))
    if name == "scalers":
        return fingerprint(stage="scalers", splits=assignment, labels=dataset, contract=_contract_digest(paths))
    if name == "hdf5_splits":
        return fingerprint(stage="hdf5", scalers=up(paths.scalers_dir, "scalers"), splits=assignment, labels=dataset,
                           label_params=labels.label_params(cfg.labels), contract=_contract_digest(paths))
    if name == "arrow_cache":
        return fingerprint(stage="arrow", hdf5=up(paths.hdf5_dir, "hdf5_splits"))
    raise KeyError(f"{name!r} is not a staged stage")


def build_stage(name: str, paths: ArtifactPaths, cfg: DataHalfConfig, fp: str | None = None) -> dict[str, Any]:
    """Build one stage all or nothing (``stage_cache.build_stage``) and return its summary.

    Its outputs go to a temporary folder inside the stage folder and are committed with the stage
    record only when the stage succeeded; on failure the previous outputs stay as they were and the
    files of ``KEEP_ON_FAILURE`` (the raw stage's quarantine and report) are kept in
    ``<stage>/last_failed/``. ``feature_contract`` (one small file pair, no record) is written directly.
    """
    fn = dict(STAGES)[name]
    if name == "feature_contract":
        return fn(paths, cfg)
    fp = fp if fp is not None else stage_fingerprint(name, paths, cfg)
    record = commit_stage(paths.stage_dir(name), fp, lambda out: fn(paths.staged(name, out), cfg),
                          keep_on_failure=KEEP_ON_FAILURE.get(name, ()))
    return record["metadata"]


def failure_note(name: str, paths: ArtifactPaths) -> str:
    """Where a failed stage left its previous outputs and what it kept, for error messages."""
    kept = KEEP_ON_FAILURE.get(name, ())
    where = failed_dir(paths.stage_dir(name))
    extra = f"; this run's {' and '.join(kept)} are in {where}" if kept else f"; details in {where}"
    return f"the previous outputs in {paths.stage_dir(name)} are unchanged{extra}"


def run_data_half(paths: ArtifactPaths, cfg: DataHalfConfig | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build every data stage in order, each committed all or nothing; returns ``{stage: summary}``."""
    cfg = cfg or DataHalfConfig()
    results: dict[str, Any] = {}
    source = _resolve_or_mark(paths, cfg)
    if source.synthetic and cfg.synthetic_panel is not None:
        log(f"[data] SYNTHETIC DATA: the {cfg.preset} preset got no raw path, so the data half runs on the "
            f"{source.data_source}, from {source.folder}")
    elif source.synthetic:
        log(f"[data] SYNTHETIC DATA: the raw folder {paths.raw_dir} is empty or absent, so the data half runs on the "
            f"{source.data_source}, from {source.folder}")
    for name, _ in STAGES:
        try:
            results[name] = build_stage(name, paths, cfg)
        except Exception as exc:
            if name != "feature_contract":
                exc.add_note(failure_note(name, paths))
            raise
        tag = " [synthetic]" if source.synthetic else ""
        log(f"[data] {name}{tag}: done in {results[name].get('seconds', 0.0):.2f}s")
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m sentinel_pipeline.data_half --data-dir DIR``: the data half without Dagster."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--raw-dir", "--raw", dest="raw_dir", default=None,
                    help="raw input: a folder of parquet/CSV files or one such file (default: <data-dir>/raw; "
                         "the panel preset: the synthetic panel)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default",
                    help="default: the intraday configuration; panel: the daily universe configuration")
    ap.add_argument("--source-timezone", default=os.environ.get(raw_bars.SOURCE_TZ_ENV) or None,
                    help="time zone of raw timestamps that carry none (IANA name, e.g. UTC or America/New_York); "
                         f"default ${raw_bars.SOURCE_TZ_ENV}; unset: such files are refused")
    ap.add_argument("--no-synthetic-default", action="store_true",
                    help="fail on an empty raw folder instead of using the synthetic default market")
    args = ap.parse_args(argv)
    paths = ArtifactPaths(data_dir=Path(args.data_dir), raw_dir_override=Path(args.raw_dir) if args.raw_dir else None)
    try:
        cfg = PRESETS[args.preset](ingest=raw_bars.IngestConfig(source_timezone=args.source_timezone),
                                   generate_default_when_empty=not args.no_synthetic_default)
        results = run_data_half(paths, cfg)
    except (ValueError, RuntimeError, OSError, MemoryError) as exc:  # the stages' own errors: the cause first
        notes = "".join(f"\n  {n}" for n in getattr(exc, "__notes__", []))
        print(f"sentinel-data: error: {type(exc).__name__}: {exc}{notes}", file=sys.stderr)
        return 1
    print(json.dumps({k: v.get("seconds") for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
