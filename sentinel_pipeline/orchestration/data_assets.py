"""Dagster assets of the data half: raw bars -> features -> labels -> splits -> scalers -> HDF5 -> Arrow.

Each asset is a thin wrapper around a ``sentinel_pipeline.data_half`` stage: it computes the stage's
input fingerprint (``data_half.stage_fingerprint``: config, code version and the sha256 of the upstream
files as they are on disk), reuses the stage when nothing changed, otherwise builds it under the stage
lock all or nothing (``data_half.build_stage``: a failed build leaves the previous outputs untouched),
and reports the stage summary, including where its data came from (``data_source``), as UI metadata.
"""


import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg

from sentinel_pipeline import data_half
from sentinel_pipeline.data import labels as labels_mod
from sentinel_pipeline.data import raw_bars as raw_mod
from sentinel_pipeline.data.bar_quality import BarQualityConfig
from sentinel_pipeline.data.features import FeatureConfig, daily_feature_config
from sentinel_pipeline.data.ffd import FFDConfig
from sentinel_pipeline.data.splits import SplitConfig
from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig
from sentinel_pipeline.data.synthetic_panel import SyntheticPanelConfig
from sentinel_pipeline.locking import exclusive_lock
from sentinel_pipeline.orchestration.metadata import file_size_mb, md_kv_table, md_table
from sentinel_pipeline.orchestration.settings import WRITE_POOL, PipelineSettings
from sentinel_pipeline.paths import SPLITS, ArtifactPaths
from sentinel_pipeline.stage_cache import (
    StageInputError,
    clear_failure,
    failed_dir,
    fresh_record,
    last_failure,
    read_record,
    upstream_state,
)


class DataHalfSettings(dg.ConfigurableResource):
    """The data half's parameters, shared by every stage of a run (so labels, splits and HDF5 agree).

    ``preset``: ``default`` (intraday) or ``panel`` (daily universe: ``data_half.panel_config``; its raw
    input is ``PipelineSettings.raw_dir``, a file or folder, when set, else the synthetic panel). Fields
    left at None take the preset's value."""

    preset: str = "default"
    # ingest
    max_quarantine_fraction: float = 0.05  # share of input rows, 0..1
    # time zone of raw timestamps that carry none (IANA name); None: such files are refused
    source_timezone: str | None = os.environ.get(raw_mod.SOURCE_TZ_ENV) or None
    generate_default_when_empty: bool = True  # empty raw folder: the synthetic default from data/synthetic/
    # bar-quality flags (sentinel_pipeline.data.bar_quality); split_at_hole_bars: None keeps symbols whole
    jump_log_return: float = 0.35
    spike_log_excess: float = 0.25
    zero_volume_run_bars: int = 3
    flat_run_bars: int = 3
    hole_bars: int = 20
    split_at_hole_bars: int | None = None
    # embedded synthetic default market (used only when the raw directory is empty or absent)
    synthetic_seed: int = SyntheticMarketConfig.seed
    synthetic_n_symbols: int = SyntheticMarketConfig.n_symbols
    synthetic_n_days: int = SyntheticMarketConfig.n_days
    signal_strength: float | None = None  # None: the generator's documented default
    # synthetic panel (the panel preset without a raw path)
    panel_seed: int = SyntheticPanelConfig.seed
    panel_n_symbols: int = SyntheticPanelConfig.n_symbols
    panel_n_days: int = SyntheticPanelConfig.n_days
    # features
    seq_len: int = 30
    context_features: bool = True
    # optional FFD group (off by default): ffd_d None = chosen on the train window by the ADF test
    ffd: bool = False
    ffd_d: float | None = None
    ffd_tau: float = 1e-4
    ffd_max_window: int = 500
    # triple-barrier labels (None: the preset's; default 1.5 / 1.5 / 20 bars, panel 2.0 / 2.0 / 10 days)
    pt: float | None = None
    sl: float | None = None
    horizon: int | None = None
    protect_labels_from: list[str] = list(labels_mod.DEFAULT_PROTECT_FROM)
    target_clip_atr: float | None = 20.0
    # splits
    train_frac: float = 0.70
    val_frac: float = 0.15
    train_end: str | None = None
    val_end: str | None = None
    embargo_bars: int = 5

    def to_config(self) -> data_half.DataHalfConfig:
        synth_kwargs: dict[str, Any] = {
            "seed": self.synthetic_seed,
            "n_symbols": self.synthetic_n_symbols,
            "n_days": self.synthetic_n_days,
        }
        if self.signal_strength is not None:
            synth_kwargs["signal_strength"] = self.signal_strength
        if self.preset not in data_half.PRESETS:
            raise ValueError(f"DataHalfSettings.preset must be one of {sorted(data_half.PRESETS)}, got {self.preset!r}")
        panel = self.preset == "panel"
        panel_kwargs: dict[str, Any] = {"seed": self.panel_seed, "n_symbols": self.panel_n_symbols,
                                        "n_days": self.panel_n_days}
        if self.signal_strength is not None:
            panel_kwargs["signal_strength"] = self.signal_strength
        label_kwargs = {k: v for k, v in (("pt", self.pt), ("sl", self.sl), ("horizon", self.horizon)) if v is not None}
        feature_kwargs: dict[str, Any] = {"seq_len": self.seq_len, "context_features": self.context_features}
        if self.ffd:
            feature_kwargs["ffd"] = FFDConfig(d=self.ffd_d, tau=self.ffd_tau, max_window=self.ffd_max_window)
        return data_half.PRESETS[self.preset](
            ingest=raw_mod.IngestConfig(
                max_quarantine_fraction=self.max_quarantine_fraction,
                source_timezone=self.source_timezone,
                quality=BarQualityConfig(
                    jump_log_return=self.jump_log_return,
                    spike_log_excess=self.spike_log_excess,
                    zero_volume_run_bars=self.zero_volume_run_bars,
                    flat_run_bars=self.flat_run_bars,
                    hole_bars=self.hole_bars,
                    split_at_hole_bars=self.split_at_hole_bars,
                ),
            ),
            synthetic=SyntheticMarketConfig(**synth_kwargs),
            generate_default_when_empty=self.generate_default_when_empty,
            features=daily_feature_config(**feature_kwargs) if panel else FeatureConfig(**feature_kwargs),
            labels=(labels_mod.daily_label_config if panel else labels_mod.LabelConfig)(
                **label_kwargs,
                protect_from=tuple(self.protect_labels_from),
                target_clip_atr=self.target_clip_atr,
            ),
            splits=SplitConfig(
                train_frac=self.train_frac,
                val_frac=self.val_frac,
                train_end=self.train_end,
                val_end=self.val_end,
                embargo_bars=self.embargo_bars,
            ),
            **({"synthetic_panel": SyntheticPanelConfig(**panel_kwargs)} if panel else {}),
        )


def upstream_fingerprint(stage_dir: Path, name: str) -> str:
    """What a downstream asset chains from a data stage: its record's fingerprint and the sha256 of its
    files as they are on disk (``stage_cache.upstream_state``); a Failure when those files are missing,
    differ from the record, or the stage's last run, or that of a stage above it, failed."""
    stage = {"labelled_dataset": "labels", "dataset_splits": "splits"}.get(name, name)
    try:
        if stage in data_half.UPSTREAMS:  # <data_dir>/artifacts/<stage>
            data_half.check_ancestors(stage, ArtifactPaths(data_dir=Path(stage_dir).parent.parent))
        return upstream_state(stage_dir, name)
    except StageInputError as exc:
        raise dg.Failure(description=str(exc)) from exc


def run_stage(
    context: dg.AssetExecutionContext,
    name: str,
    paths: ArtifactPaths,
    cfg: data_half.DataHalfConfig,
    ui: Callable[[dict[str, Any]], dict[str, Any]],
) -> dg.MaterializeResult:
    """Reuse the stage when its fingerprint and outputs are unchanged, else build it (all or nothing)
    under the stage lock."""
    stage_dir = paths.stage_dir(name)
    try:
        fp = data_half.stage_fingerprint(name, paths, cfg)
    except (StageInputError, ValueError) as exc:  # an upstream not to be trusted, an unreadable raw file
        raise dg.Failure(description=str(exc)) from exc
    reused = True
    record = fresh_record(stage_dir, fp)
    if record is None or last_failure(stage_dir) is not None:
        with exclusive_lock(stage_dir):
            record = fresh_record(stage_dir, fp)  # another run may have built it while we waited
            if record is None:
                reused = False
                try:
                    data_half.build_stage(name, paths, cfg, fp)
                except (ValueError, RuntimeError) as exc:  # bad input data, too little of it, a stage error
                    raise dg.Failure(
                        description=f"{exc}\n({data_half.failure_note(name, paths)})",
                        metadata={"last_failed": dg.MetadataValue.path(str(failed_dir(stage_dir))),
                                  "previous_outputs": dg.MetadataValue.path(str(stage_dir))},
                    ) from exc
                record = read_record(stage_dir)
                assert record is not None, stage_dir
            else:
                clear_failure(stage_dir)  # the inputs are those of the last good build again
    if reused:
        context.log.info(f"inputs unchanged (fingerprint {fp[:12]}): reusing {stage_dir}")
    source = record["metadata"].get("data_source")
    if source and source.startswith("synthetic"):
        context.log.warning(f"{name}: SYNTHETIC DATA: built from the {source} (no raw data: {paths.raw_dir} is empty, "
                            "or the panel preset got no raw path)")
    metadata = ui(record["metadata"])
    metadata.update({"input_fingerprint": fp[:16], "reused": reused, "path": dg.MetadataValue.path(str(stage_dir)),
                     "data_source": str(source)})
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(fp[:16]))


def _paths(settings: PipelineSettings) -> ArtifactPaths:
    return settings.paths()


# -- 1. raw bars -------------------------------------------------------------------------------------
@dg.asset(group_name="ingest", kinds={"arrow"}, pool=WRITE_POOL)
def raw_bars(context: dg.AssetExecutionContext, settings: PipelineSettings, data_settings: DataHalfSettings):
    """Every raw OHLCV parquet/CSV file of the landing zone (or, when it is empty, the synthetic default
    market from its own folder, and then said so), validated; bad rows quarantined with a reason."""
    paths, cfg = _paths(settings), data_settings.to_config()

    def ui(s: dict[str, Any]) -> dict[str, Any]:
        r = s["report"]
        h = r.get("minimum_history", {})
        return {
            "synthetic": bool(s.get("synthetic")),
            "input_files": md_table([{"file": f} for f in s.get("input_files", [])]),
            "source_timezone": str(r.get("source_timezone") or "none (naive timestamps refused)"),
            "tz_naive_rows": int(r.get("n_tz_naive_rows", 0)),
            "minimum_history_bars": int(r.get("min_symbol_bars", 0)),
            "minimum_history": md_kv_table({k: v for k, v in h.items() if not isinstance(v, dict)}, "need", "bars"),
            "short_history_symbols": md_kv_table(r.get("short_history_symbols", {}), "symbol", "bars"),
            "dagster/row_count": r["n_rows_out"],
            "rows_in": r["n_rows_in"],
            "quarantined": r["n_quarantined"],
            "quarantine_fraction": float(r["quarantine_fraction"]),
            "quarantine_by_reason": md_kv_table(r.get("quarantine_by_reason", {}), "reason", "rows"),
            "symbols": r["n_symbols"],
            "time_min": str(r["time_min"]),
            "time_max": str(r["time_max"]),
            "files": md_table(r.get("files", []), ["path", "rows", "n_quarantined", "timezone"]),
            **quality_metadata(r.get("bar_quality", {})),
            "size_mb": file_size_mb(paths.bars),
            "seconds": s.get("seconds", 0.0),
        }

    return run_stage(context, "raw_bars", paths, cfg, ui)


def quality_metadata(q: dict[str, Any]) -> dict[str, Any]:
    """UI metadata of the raw stage's bar-quality report: counts, thresholds, a table of examples."""
    if not q:
        return {}
    jumps, spikes, holes = q["jumps"], q["spikes"], q["holes"]
    zero, flat, seg = q["zero_volume_runs"], q["flat_runs"], q["segments"]
    rows: list[dict[str, Any]] = []
    for e in jumps["examples"]:
        detail = f"close {e['previous_close']:.4g} -> {e['close']:.4g}" + (
            f", like a {e['split_like']} split" if e.get("split_like") else "")
        rows.append({"kind": "jump", "symbol": e["symbol"], "timestamp": e["timestamp"],
                     "value": round(e["log_return"], 3), "detail": detail})
    for e in spikes["examples"]:
        rows.append({"kind": f"spike ({e['side']})", "symbol": e["symbol"], "timestamp": e["timestamp"],
                     "value": float(f"{e['value']:.4g}"), "detail": f"neighbours {e['neighbours']:.4g}"})
    for kind, rep in (("zero-volume run", zero), ("flat run", flat)):
        for e in rep["examples"]:
            rows.append({"kind": kind, "symbol": e["symbol"], "timestamp": e["start"], "value": e["bars"],
                         "detail": f"bars until {e['end']}"})
    for e in holes["examples"]:
        rows.append({"kind": "hole", "symbol": e["symbol"], "timestamp": e["timestamp"],
                     "value": round(e["missed_bars"], 1),
                     "detail": f"missed bars since {e['previous']} ({e['calendar_days']:.1f} days)"})
    thresholds = {
        "jump abs(log return) >": jumps["threshold_log_return"],
        "spike log excess >=": spikes["threshold_log_excess"],
        "zero-volume run bars >=": zero["min_run_bars"],
        "flat run bars >=": flat["min_run_bars"],
        "hole missed bars >=": holes["hole_bars"],
        "split at hole bars >=": "off" if seg["split_at_hole_bars"] is None else seg["split_at_hole_bars"],
    }
    return {
        "quirk_bars_flagged": int(q["n_bars_flagged"]),
        "quirk_jumps": int(jumps["n"]),
        "quirk_jumps_split_like": int(jumps["n_split_like"]),
        "quirk_spikes": int(spikes["n"]),
        "quirk_zero_volume_runs": int(zero["n_runs"]),
        "quirk_zero_volume_bars": int(zero["n_bars"]),
        "quirk_flat_runs": int(flat["n_runs"]),
        "quirk_holes": int(holes["n"]),
        "quirk_longest_hole_bars": round(float(holes["longest_missed_bars"] or 0.0), 1),
        "quirk_segments_added": int(seg["n_segments_added"]),
        "quirk_thresholds": md_kv_table(thresholds, "rule", "threshold"),
        "quirk_examples": md_table(rows, ["kind", "symbol", "timestamp", "value", "detail"]),
    }


# -- 2. feature contract + features --------------------------------------------------------------------
@dg.asset(group_name="features", deps=[raw_bars], kinds={"json"}, pool=WRITE_POOL)
def feature_contract(settings: PipelineSettings, data_settings: DataHalfSettings):
    """The ordered feature list (name, group, dtype, params) + code version, and its sha256 hash."""
    paths, cfg = _paths(settings), data_settings.to_config()
    s = data_half.run_feature_contract(paths, cfg)
    contract = data_half.load_contract(paths)
    rows = [{"name": f.name, "group": f.group, "dtype": f.dtype, "params": f.params} for f in contract.features]
    return dg.MaterializeResult(
        metadata={
            "feature_contract_hash": s["feature_contract_hash"],
            "dims": md_kv_table(s["dims"], "group", "features"),
            "features": md_table(rows),
            "path": dg.MetadataValue.path(str(paths.feature_contract)),
            **_ffd_metadata(s),
        },
        data_version=dg.DataVersion(s["feature_contract_hash"]),
    )


@dg.asset(group_name="features", deps=[raw_bars, feature_contract], kinds={"arrow"}, pool=WRITE_POOL)
def features(context: dg.AssetExecutionContext, settings: PipelineSettings, data_settings: DataHalfSettings):
    """Causal per-symbol features in the seq / snap / ctx_cat / ctx_cont groups of the contract."""
    paths, cfg = _paths(settings), data_settings.to_config()

    def ui(s: dict[str, Any]) -> dict[str, Any]:
        return {
            "dagster/row_count": s["rows"],
            "symbols": s["symbols"],
            "valid_fraction": s["valid_fraction"],
            "feature_contract_hash": s["feature_contract_hash"],
            "dims": md_kv_table(s["dims"], "group", "features"),
            "size_mb": file_size_mb(paths.features),
            "seconds": s.get("seconds", 0.0),
            **_ffd_metadata(s),
        }

    return run_stage(context, "features", paths, cfg, ui)


def _ffd_metadata(s: dict[str, Any]) -> dict[str, Any]:
    """The FFD group's order d, its ADF p-value on the train window, tau and the window (when the group is on)."""
    sel = s.get("ffd")
    if not sel:
        return {}
    out: dict[str, Any] = {"ffd_d": float(sel["d"]), "ffd_tau": float(sel["tau"]), "ffd_window": int(sel["window"]),
                           "ffd_max_window": int(sel["max_window"])}
    if sel.get("adf_p") is not None:
        out["ffd_adf_p"] = float(sel["adf_p"])
        out["ffd_adf_passed"] = bool(sel["passed"])
        out["ffd_adf_level"] = float(sel["adf_level"])
        out["ffd_train_cut"] = str(sel["train_cut"])
    return out


# -- 3. labels -------------------------------------------------------------------------------------------
@dg.asset(group_name="labels", deps=[features], kinds={"arrow", "numba"}, pool=WRITE_POOL)
def labelled_dataset(context: dg.AssetExecutionContext, settings: PipelineSettings, data_settings: DataHalfSettings):
    """Triple-barrier labels, forward returns and entry-quality targets per bar."""
    paths, cfg = _paths(settings), data_settings.to_config()

    def ui(s: dict[str, Any]) -> dict[str, Any]:
        st = s["stats"]
        return {
            "dagster/row_count": s["rows"],
            "eligible_rows": st["n_eligible"],
            "eligibility_rate": float(st["eligibility_rate"]),
            "class_balance": md_kv_table(st["class_balance"], "tb_label", "fraction"),
            "both_touched": st.get("n_both_touched", 0),
            **label_quirk_metadata(st),
            "label_params": md_kv_table(s["label_params"], "param", "value"),
            "seconds": s.get("seconds", 0.0),
        }

    return run_stage(context, "labels", paths, cfg, ui)


def label_quirk_metadata(st: dict[str, Any]) -> dict[str, Any]:
    """UI metadata of the label stage's quirk protection and target clipping."""
    prot, clip = st.get("quirk_protection"), st.get("target_clip")
    if not prot or not clip:
        return {}
    rows = [{"target": k, "clipped": clip["n_clipped"][k],
             "max abs before clip": "" if v is None else round(v, 2)}
            for k, v in clip["max_abs_before_clip"].items()]
    return {
        "ineligible_by_quirk": md_kv_table(prot["n_ineligible_by_quirk"], "quirk in label window", "rows"),
        "ineligible_quirk_total": int(prot["n_ineligible_quirk_total"]),
        "target_clip_atr": "off" if clip["target_clip_atr"] is None else float(clip["target_clip_atr"]),
        "rows_clipped": int(clip["n_rows_clipped"]),
        "targets_clipped": md_table(rows, ["target", "clipped", "max abs before clip"]),
    }


# -- 4. splits -------------------------------------------------------------------------------------------
@dg.asset(group_name="splits", deps=[labelled_dataset], kinds={"arrow"}, pool=WRITE_POOL)
def dataset_splits(context: dg.AssetExecutionContext, settings: PipelineSettings, data_settings: DataHalfSettings):
    """Chronological train/val/test by global cut points, purged by the label window and embargoed."""
    paths, cfg = _paths(settings), data_settings.to_config()

    def ui(s: dict[str, Any]) -> dict[str, Any]:
        summ = s["summary"]
        per = summ.get("splits", {})
        rows = [{"split": k, **{kk: vv for kk, vv in v.items() if not isinstance(vv, dict | list)}} for k, v in per.items()]
        return {"splits": md_table(rows), "cuts": md_kv_table(summ.get("cuts", {}), "cut", "timestamp"),
                "seconds": s.get("seconds", 0.0)}

    return run_stage(context, "splits", paths, cfg, ui)


# -- 5. scalers ------------------------------------------------------------------------------------------
@dg.multi_asset(
    specs=[
        dg.AssetSpec("seq_scaler", group_name="scaling", kinds={"joblib", "sklearn"}, deps=[dataset_splits]),
        dg.AssetSpec("snap_scaler", group_name="scaling", kinds={"joblib", "sklearn"}, deps=[dataset_splits]),
    ],
    pool=WRITE_POOL,
)
def scalers(context: dg.AssetExecutionContext, settings: PipelineSettings, data_settings: DataHalfSettings):
    """Robust scalers (with clipping) for the seq and snap groups, fitted on train rows only."""
    paths, cfg = _paths(settings), data_settings.to_config()
    result = run_stage(context, "scalers", paths, cfg, _scaler_ui)
    md = dict(result.metadata or {})
    yield dg.MaterializeResult(asset_key="seq_scaler", metadata={**md, "file": dg.MetadataValue.path(str(paths.seq_scaler))},
                               data_version=result.data_version)
    yield dg.MaterializeResult(asset_key="snap_scaler", metadata={**md, "file": dg.MetadataValue.path(str(paths.snap_scaler))},
                               data_version=result.data_version)


def _scaler_ui(s: dict[str, Any]) -> dict[str, Any]:
    info = s["info"]
    flat = {k: v for k, v in info.items() if not isinstance(v, dict | list)}
    return {"feature_contract_hash": s["feature_contract_hash"], "fit_window": md_kv_table(flat, "field", "value"),
            "seconds": s.get("seconds", 0.0)}


# -- 6. HDF5 splits --------------------------------------------------------------------------------------
@dg.asset(group_name="storage", deps=["seq_scaler", "snap_scaler"], kinds={"hdf5"}, pool=WRITE_POOL)
def hdf5_splits(context: dg.AssetExecutionContext, settings: PipelineSettings, data_settings: DataHalfSettings):
    """train.h5 / val.h5 / test.h5: scaled per-bar rows, targets and sample end-rows (the training contract)."""
    paths, cfg = _paths(settings), data_settings.to_config()

    def ui(s: dict[str, Any]) -> dict[str, Any]:
        rows = [{"split": k, **{kk: vv for kk, vv in v.items() if not isinstance(vv, dict | list)}}
                for k, v in s["splits"].items()]
        return {
            "feature_contract_hash": s["feature_contract_hash"],
            "splits": md_table(rows),
            "dagster/row_count": sum(int(v["n_rows"]) for v in s["splits"].values()),
            "size_mb": file_size_mb(*(paths.h5(x) for x in SPLITS)),
            "seconds": s.get("seconds", 0.0),
        }

    return run_stage(context, "hdf5_splits", paths, cfg, ui)


# -- 7. Arrow cache --------------------------------------------------------------------------------------
@dg.asset(group_name="storage", deps=[hdf5_splits], kinds={"arrow"}, pool=WRITE_POOL)
def arrow_cache(context: dg.AssetExecutionContext, settings: PipelineSettings, data_settings: DataHalfSettings):
    """Uncompressed Arrow IPC copies of the splits that the training loader memory-maps without copying."""
    paths, cfg = _paths(settings), data_settings.to_config()

    def ui(s: dict[str, Any]) -> dict[str, Any]:
        rows = [{"split": k, **{kk: vv for kk, vv in v.items() if not isinstance(vv, dict | list)}}
                for k, v in s["splits"].items()]
        return {"splits": md_table(rows), "size_mb": file_size_mb(*(paths.arrow(x) for x in SPLITS)),
                "seconds": s.get("seconds", 0.0)}

    return run_stage(context, "arrow_cache", paths, cfg, ui)


DATA_ASSETS = [raw_bars, feature_contract, features, labelled_dataset, dataset_splits, scalers, hdf5_splits, arrow_cache]
