"""Out-of-process training under Dagster Pipes.

The training asset launches ``python -m sentinel_pipeline.orchestration.pipes_training`` through a
Pipes client (``PipesSubprocessClient`` locally). This process reads its ``TrainConfig`` from the Pipes
extras, runs the same engine as the CLI, streams per-epoch progress to the Dagster run log and reports
the materialisation (bundle path, metrics) back. Swapping the client for Dagster's Kubernetes Pipes
client runs exactly this entry point in a pod instead (see README, "Scale-out").
"""

import json
import math
import os
from typing import Any

from dagster_pipes import open_dagster_pipes

from sentinel_pipeline.training.config import TrainConfig
from sentinel_pipeline.training.engine import train


def _finite(v: Any) -> Any:
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def summarise(result: Any) -> dict[str, Any]:
    """The JSON-able metadata a training run reports to Dagster."""
    m = result.metrics
    out: dict[str, Any] = {
        "bundle_path": str(result.bundle_dir) if result.bundle_dir else "",
        "run_dir": str(result.out_dir),
        "best_epoch": result.best_epoch,
        "stopped_early": bool(result.stopped_early),
        "already_complete": bool(getattr(result, "already_complete", False)),
    }
    for key in ("variant", "feature_contract_hash", "total_seconds", "avg_throughput_samples_per_s",
                "best_val_loss", "best_monitor_value", "monitor", "epochs_completed"):
        if m.get(key) is not None:
            out[key] = _finite(m[key])
    out["head_vs_baseline_json"] = json.dumps(m.get("head_vs_baseline", {}), default=str)
    out["dataset_json"] = json.dumps(m.get("dataset", {}), default=str)
    return out


def main() -> None:
    with open_dagster_pipes() as pipes:
        cfg = TrainConfig(**pipes.get_extra("train_config"))
        pipes.log.info(f"training {cfg.model} in {cfg.out_dir} (device={cfg.device}, epochs={cfg.epochs})")

        def on_epoch_end(record: dict[str, Any]) -> None:
            keys = ("epoch", "train_loss", "val_loss", "val_macro_f1", "seconds", "samples_per_s", "lr")
            pipes.log.info("epoch " + ", ".join(f"{k}={record[k]}" for k in keys if k in record))

        result = train(cfg, progress=False, on_epoch_end=on_epoch_end)
        # the pid shows in the UI that training ran in its own process, not in the run worker
        pipes.report_asset_materialization(metadata={**summarise(result), "training_pid": os.getpid()})


if __name__ == "__main__":
    main()
