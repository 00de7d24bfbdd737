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
import time
from dataclasses import dataclass, field
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


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: short and rounded for a log line."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@dataclass
class EpochProgress:
    """Turns the engine's per-epoch records into one readable progress line with an ETA.

    The ETA is the mean epoch time so far times the epochs left; with early stopping the run may end
    sooner: the line says after which epoch it stops if the monitor does not improve again.
    """

    n_epochs: int
    patience: int
    started: float = field(default_factory=time.monotonic)
    epoch_seconds: list[float] = field(default_factory=list)
    best_epoch: int | None = None

    def line(self, record: dict[str, Any], now: float | None = None) -> str:
        epoch = int(record["epoch"])
        self.epoch_seconds.append(float(record.get("epoch_seconds") or 0.0))
        if record.get("improved") or self.best_epoch is None:
            self.best_epoch = epoch
        elapsed = (time.monotonic() if now is None else now) - self.started
        mean = sum(self.epoch_seconds) / len(self.epoch_seconds)
        left = self.n_epochs - epoch
        parts = [f"epoch {epoch}/{self.n_epochs}", f"elapsed {_duration(elapsed)}"]
        if left > 0:
            eta = f"ETA {_duration(mean * left)}"
            stop_after = self.best_epoch + self.patience
            if stop_after < self.n_epochs:
                eta += (f" (or {_duration(mean * max(stop_after - epoch, 0))} if it stops early after epoch "
                        f"{stop_after}: patience {self.patience}, best epoch {self.best_epoch})")
            parts.append(eta)
        else:
            parts.append("last epoch")
        rate = record.get("throughput_samples_per_s") or record.get("samples_per_s")
        if rate:
            parts.append(f"{rate:,.0f} samples/s")
        for key in ("train_loss", "val_loss", "val_macro_f1"):
            if record.get(key) is not None:
                parts.append(f"{key} {_num(record[key])}")
        if record.get("improved"):
            parts.append("(best so far)")
        return " | ".join(parts)


def main() -> None:
    with open_dagster_pipes() as pipes:
        cfg = TrainConfig(**pipes.get_extra("train_config"))
        pipes.log.info(f"training {cfg.model} in {cfg.out_dir} (device={cfg.device}, at most {cfg.epochs} "
                       f"epochs, patience {cfg.patience})")
        progress = EpochProgress(cfg.epochs, cfg.patience)

        def on_epoch_end(record: dict[str, Any]) -> None:
            pipes.log.info(f"{cfg.model}: {progress.line(record)}")

        try:
            result = train(cfg, progress=False, on_epoch_end=on_epoch_end)
        except Exception as exc:  # the cause first in the run log; the traceback follows from Pipes
            pipes.log.error(f"training {cfg.model} failed: {type(exc).__name__}: {exc}")
            raise
        # the pid shows in the UI that training ran in its own process, not in the run worker
        pipes.report_asset_materialization(metadata={**summarise(result), "training_pid": os.getpid()})


if __name__ == "__main__":
    main()
