"""One training asset per model variant: trains out of process (Dagster Pipes) and writes a bundle.

A run whose inputs and config are unchanged (same fingerprint directory), complete, with its bundle
on disk is reported as it is, without starting the training process."""

import json
import sys
from pathlib import Path
from typing import Any

import dagster as dg

from sentinel_pipeline.bundles import manifest_sha256
from sentinel_pipeline.data.symbol_graph import graph_dir
from sentinel_pipeline.orchestration.data_assets import arrow_cache, upstream_fingerprint
from sentinel_pipeline.orchestration.metadata import image, md_table, sparkline
from sentinel_pipeline.orchestration.pipes_training import summarise
from sentinel_pipeline.orchestration.settings import WRITE_POOL, PipelineSettings
from sentinel_pipeline.stage_cache import fingerprint
from sentinel_pipeline.training.config import (
    PIPELINE_BATCH_SIZES,
    PIPELINE_TRAINING,
    PIPELINE_VARIANT_TRAINING,
    TrainConfig,
    pipeline_train_config,
)
from sentinel_pipeline.training.engine import completed_run_if_idle
from sentinel_pipeline.training.families import VARIANTS, get_family

PIPES_ENTRY = [sys.executable, "-m", "sentinel_pipeline.orchestration.pipes_training"]


class TrainingRunConfig(dg.Config):
    """The training knobs of ``TrainConfig`` (paths are filled in by the asset). Same engine as the CLI.

    Differences from the CLI's laptop-safe defaults:

    - at most 10 epochs with patience 3: the default job must finish in minutes on 2 CPU cores; the
      variants' monitors peaked by epoch 2-5 on the default market;
    - ``shuffle=True``: train samples are visited in a permutation reseeded from ``(seed, epoch)``
      (the train split only; validation and test stay untouched and chronological). In the safe
      profile's temporal order every epoch ends on the latest train bars, and the classifiers' class
      bias follows that period's class mix: ``transformer_tbm`` then predicted one class for nearly
      every validation sample (val macro-F1 0.142-0.219 vs 0.36-0.43 shuffled, default market);
    - batch 256 for the MLP (``PIPELINE_BATCH_SIZES``): an epoch is several times faster than at
      the CLI's 16; windows are built lazily, so memory stays O(batch x seq_len x features).
    """

    epochs: int = PIPELINE_TRAINING["epochs"]
    # None: PIPELINE_BATCH_SIZES for the variant, else the variant's own default
    batch_size: int | None = None
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = PIPELINE_TRAINING["patience"]
    seed: int = 1337
    device: str = "auto"
    num_workers: int | None = None
    limit_samples: int | None = None
    # None: the model family's preference (window variants: AdamW, no scheduler; gat_multi_horizon:
    # AdaBelief with cosine warm restarts T_0=3, T_mult=2, eta_min=5e-5)
    optimizer: str | None = None
    scheduler: str | None = None
    profile: str = "safe"
    threads: int | None = None
    log_every: int = 200
    shuffle: bool = PIPELINE_TRAINING["shuffle"]




def _history(bundle: Path) -> list[dict[str, Any]]:
    """The per-epoch records of the bundle's training run (``metrics.json``); [] when unreadable."""
    try:
        history = json.loads((bundle / "metrics.json").read_text(encoding="utf-8")).get("history") or []
    except (OSError, ValueError):
        return []
    return [h for h in history if isinstance(h, dict)]


def _onnx_export(bundle: Path) -> str:
    """The bundle's ONNX export as one readable line (exported: opset and inputs; failed: why)."""
    try:
        record = json.loads((bundle / "bundle_metadata.json").read_text(encoding="utf-8")).get("onnx")
    except (OSError, ValueError):
        return "unreadable bundle_metadata.json"
    if not isinstance(record, dict):
        return "none (bundle format before 3)"
    if record.get("status") != "exported":
        return f"FAILED: {record.get('reason')}"
    inputs = ", ".join(f"{i['name']}{tuple(i['shape'])}" for i in record.get("inputs", []))
    return f"model.onnx, opset {record.get('opset')}, inputs {inputs}, {record.get('export_seconds')} s"


def bundle_asset_key(variant: str) -> dg.AssetKey:
    return dg.AssetKey(f"bundle_{variant}")


# where the pipeline keeps each extra input a model family may ask for (``ModelFamily.required_inputs``),
# and the asset that makes it
FAMILY_INPUTS: dict[str, tuple[Any, str]] = {"symbol_graph": (graph_dir, "symbol_graph")}


def family_inputs_for(paths: Any, variant: str) -> dict[str, Path]:
    """``TrainConfig.family_inputs`` of a variant in this pipeline instance (its family's required inputs)."""
    family = get_family(VARIANTS[variant].family)
    unknown = [n for n in family.required_inputs if n not in FAMILY_INPUTS]
    if unknown:
        raise ValueError(f"variant {variant!r} needs family inputs {unknown} that the pipeline does not make")
    return {n: Path(FAMILY_INPUTS[n][0](paths)) for n in family.required_inputs}


def train_config_for(paths: Any, variant: str, cfg: TrainingRunConfig, out_dir: Path) -> TrainConfig:
    return pipeline_train_config(
        paths, variant, out_dir, **{**cfg.model_dump(), "batch_size": cfg.batch_size or PIPELINE_BATCH_SIZES.get(variant),
                                    "family_inputs": family_inputs_for(paths, variant)}
    )


def build_training_asset(variant: str) -> dg.AssetsDefinition:
    extra_deps = [FAMILY_INPUTS[n][1] for n in get_family(VARIANTS[variant].family).required_inputs]

    @dg.asset(
        key=bundle_asset_key(variant),
        group_name="training",
        deps=[arrow_cache, *extra_deps],
        kinds={"pytorch"},
        pool=WRITE_POOL,
        description=f"Trained, self-describing model bundle of variant `{variant}` (heads: "
        f"{', '.join(h.name for h in VARIANTS[variant].heads)}), verified by a blocking check.",
    )
    def _train(
        context: dg.AssetExecutionContext,
        config: TrainingRunConfig,
        settings: PipelineSettings,
        pipes_client: dg.PipesSubprocessClient,
    ) -> dg.MaterializeResult:
        paths = settings.paths()
        # operational knobs (logging, threads, workers, device) do not change the trained model
        result_config = config.model_dump(exclude={"log_every", "threads", "num_workers", "device"})
        inputs = {n: upstream_fingerprint(p, FAMILY_INPUTS[n][1]) for n, p in family_inputs_for(paths, variant).items()}
        fp = fingerprint(stage="train", variant=variant, data=upstream_fingerprint(paths.arrow_dir, "arrow_cache"),
                         config={**PIPELINE_VARIANT_TRAINING.get(variant, {}), **result_config},
                         **({"family_inputs": inputs} if inputs else {}))
        out_dir = paths.artifacts / "training" / variant / fp[:16]
        tc = train_config_for(paths, variant, config, out_dir)
        # fast path, read under a shared lock taken without waiting; the decisive check is train()'s,
        # under the run directory's exclusive lock (a run of another instance may be training it now)
        done = completed_run_if_idle(out_dir, paths.models_dir)
        if done is not None:
            # same inputs and config (out_dir is named by their fingerprint), run complete, bundle on
            # disk: report it without starting the training process (~7 s of imports per variant)
            context.log.info(f"training run {out_dir} is complete and its bundle {done.bundle_dir} exists: reused")
            raw: dict[str, Any] = {**summarise(done), "training_process": "not started (run reused)"}
        else:
            invocation = pipes_client.run(
                command=PIPES_ENTRY,
                context=context,
                extras={"train_config": tc.to_dict()},
            )
            reported = invocation.get_materialize_result()
            md: dict[str, Any] = dict(reported.metadata or {})
            raw = {k: (v.value if hasattr(v, "value") else v) for k, v in md.items()}
        bundle = Path(str(raw.get("bundle_path", "")))
        if not bundle.is_dir():
            raise dg.Failure(description=f"training of {variant} reported no bundle (run dir {out_dir})")
        hvb = json.loads(str(raw.pop("head_vs_baseline_json", "{}")))
        rows = [{"head": h, **{k: v for k, v in d.items() if not isinstance(v, dict | list)}} for h, d in hvb.items()]
        metadata: dict[str, Any] = {
            k: v for k, v in raw.items() if k not in ("dataset_json",) and v is not None
        }
        metadata.update({
            "bundle_path": dg.MetadataValue.path(str(bundle)),
            "bundle_name": bundle.name,
            "manifest_sha256": manifest_sha256(bundle) or "unreadable",
            "val_vs_baseline": md_table(rows),
            "dataset": md_table([{"split": k, **v} for k, v in json.loads(str(raw.get("dataset_json", "{}"))).items()]),
            "input_fingerprint": fp[:16],
        })
        metadata["onnx_export"] = _onnx_export(bundle)
        history = _history(bundle)
        if history:  # inline in the UI (a small chart); the full plot below opens with "Show Markdown"
            metadata["loss_curve_inline"] = sparkline(
                {k: [h.get(k) for h in history] for k in ("train_loss", "val_loss")}, f"{variant} loss by epoch"
            )
        curve = bundle / "loss_curve.png"
        if curve.exists():
            metadata["loss_curve"] = image(curve, f"{variant} loss curves")
        context.log.info(f"bundle {bundle}")
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(bundle.name))

    return _train


TRAINING_ASSETS = [build_training_asset(v) for v in VARIANTS]
