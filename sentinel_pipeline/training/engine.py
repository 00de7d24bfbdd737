"""The training engine: :func:`train` is the one loop used by the CLI, the Dagster asset and the tests.

Inputs are ``train.h5``/``val.h5`` (the Arrow cache of each is preferred when it matches, see
``data_loader.load_split_for_training``) and ``feature_schema.txt``. Training never reads raw bars or
the test split, and never infers feature counts from data: ``input_dim`` is the length of a feature
schema group. The expected feature contract hash comes from the config, else from
``feature_contract.json`` beside the schema, else from the schema's header line; splits with another
hash are refused.

Profiles (fields of :class:`~sentinel_pipeline.training.config.TrainConfig` left at ``None`` take
the profile's value; explicit values always win):

============== ============================== ==============================================
setting        ``safe`` (default)             ``throughput``
============== ============================== ==============================================
batch size     the variant's default (MLP 16) 1024
loader workers 0 (batches built in-process)   2-4 (usable CPUs - 1, clamped to [2, 4])
pin_memory     only with CUDA                 only with CUDA
bf16 autocast  off                            on CUDA only (never on CPU)
shuffle        off                            on (order reseeded from (seed, epoch))
============== ============================== ==============================================

Validation uses ``max(batch size, 256)`` samples per batch (no gradients, so memory is small). The
1024 and 256 are the defaults of ``ModelFamily.throughput_batch_size`` / ``min_eval_batch_size``; batch
sizes are in the unit of the model family's batcher.

The loop knows no model family: the variant's family (``training.families``, protocol in
``families/base.py``) gives the batcher, the losses, the per-batch telemetry, the epoch metrics, the
final evaluation, the baselines and the extra bundle files; the engine owns what every family shares.

The loop: the model is built once from the resolved architecture config and moved to the device once;
``train()``/``eval()`` are toggled explicitly; the optimizer (AdamW or AdaBelief) and an optional
scheduler (``ReduceLROnPlateau``, stepped on the monitor, or ``CosineAnnealingWarmRestarts``, stepped
per epoch) come from the typed config (``training.optim``; left at ``None``, the family's
preference); gradient clipping; validation without gradients every epoch; early stopping on the
monitor (val loss, or a family metric such as val macro-F1 for classifiers) after ``patience`` epochs
without improvement. A non-finite loss or gradient norm raises
:class:`TrainingDivergedError`: ``model_best.pt``, ``resume.pt`` and any bundle stay as they were.
Step statistics stay on the device and are checked every ``log_every`` steps and at the end of each
epoch, so the loop does not synchronise with the GPU at every step.

Files in ``out_dir``: ``model_best.pt`` (rewritten when the monitor improves), ``resume.pt`` (every
epoch), ``train_config.json`` (the resolved configuration), ``train_log.txt``, and at the end
``metrics.json`` and ``loss_curve.png``; with ``models_dir`` a bundle is written there
(``bundles.write_bundle``).

Locks and write errors: ``train()`` holds an exclusive lock on ``out_dir`` (``.run.lock``,
``locking.run_dir_lock``) for the whole run, the completed-run check and the bundle write included: a
second process on the same ``out_dir`` waits, then finds the run complete with its bundle and reuses
it. Before that, ``out_dir`` and ``models_dir`` are probed (a file created and removed; free space
against a rough bundle size), so a read-only or full disk fails in seconds with
``atomic_io.WriteError`` in plain words rather than after the training.

Resuming: a run started on an ``out_dir`` that holds a ``resume.pt`` of the same configuration
continues after the last completed epoch and ends with exactly the weights of an uninterrupted run
(model, optimizer, scheduler, early-stopping state and all RNG states are restored; the loader
order depends only on (seed, epoch)). A completed run is not retrained (``TrainResult.already_complete``);
``fresh=True`` discards the earlier run. A ``resume.pt`` of a different configuration is refused.

Before the first epoch the untrained model is evaluated on the validation split once
(``metrics.json["initial_val_loss"]``, kept across a resume): the reference that verification's
``metrics_sane`` compares the best validation loss with.

Per-epoch telemetry (logged, in ``metrics.json["history"]``, drawn in ``loss_curve.png``): train and
val loss per head and in total, grad-norm mean/max, the family's batch telemetry (the window family:
class balance of the direction target over the train batches) and epoch metrics, learning rate, wall seconds, throughput (samples/s) and the loader's share of the
training time (time spent waiting for the next batch / epoch training time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sentinel_pipeline.atomic_io import probe_writable, sweep_stale_temps, write_json_atomic
from sentinel_pipeline.data.feature_contract import (
    FEATURE_GROUPS,
    ContractError,
    FeatureContract,
    read_contract,
    read_feature_schema,
)
from sentinel_pipeline.data.split_arrays import SplitArrays
from sentinel_pipeline.locking import LockTimeout, bundle_writes_lock, run_dir_lock
from sentinel_pipeline.training import optim, runtime
from sentinel_pipeline.training.checkpoints import (
    BEST_NAME,
    RESUME_NAME,
    capture_rng_state,
    cpu_state_dict,
    load_best,
    load_resume,
    restore_rng_state,
    save_best,
    save_resume,
)
from sentinel_pipeline.training.config import ConfigError, TrainConfig
from sentinel_pipeline.training.data_loader import (
    Batch,
    chronological_end_rows,
    load_split_for_training,
    make_dataloader,
    to_device,
)
from sentinel_pipeline.training.families import (
    Batcher,
    FamilyData,
    ModelFamily,
    VariantSpec,
    get_family,
    get_variant,
)
from sentinel_pipeline.training.plots import plot_loss_curves

log = logging.getLogger(__name__)

LOG_NAME = "train_log.txt"
METRICS_NAME = "metrics.json"
CURVE_NAME = "loss_curve.png"
CONFIG_NAME = "train_config.json"
RUN_OUTPUTS: tuple[str, ...] = (BEST_NAME, RESUME_NAME, METRICS_NAME, CURVE_NAME, CONFIG_NAME)
THROUGHPUT_BATCH_SIZE = ModelFamily.throughput_batch_size  # the defaults; a family may set its own
MIN_EVAL_BATCH_SIZE = ModelFamily.min_eval_batch_size
SCHEDULER_DEFAULTS = optim.SCHEDULER_DEFAULTS
_SCHEMA_HASH_RE = re.compile(r"^#\s*feature schema of contract\s+([0-9a-f]+)")
# config fields that change the result of a run; a resume.pt recorded for other values is refused
_FINGERPRINT_FIELDS: tuple[str, ...] = (
    "model", "seq_len", "seed", "learning_rate", "weight_decay", "limit_samples", "patience",
    "scheduler_params", "grad_clip",
)


class TrainingError(RuntimeError):
    """Training could not run or finish (bad inputs for training, inconsistent out_dir...)."""


class TrainingDivergedError(TrainingError):
    """A loss or gradient norm became NaN or infinite; nothing was saved for the failing epoch."""


@dataclass
class TrainResult:
    out_dir: Path
    best_checkpoint: Path | None
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    bundle_dir: Path | None = None
    stopped_early: bool = False
    best_epoch: int | None = None
    already_complete: bool = False  # the out_dir held a completed run; nothing was retrained
    resumed_from_epoch: int | None = None  # the last completed epoch found in resume.pt, if resumed


@dataclass(frozen=True)
class ResolvedSettings:
    device: str
    batch_size: int
    eval_batch_size: int
    num_workers: int
    pin_memory: bool
    bf16_autocast: bool
    shuffle: bool
    monitor: str
    monitor_mode: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Inputs:
    schema: dict[str, list[str]]
    contract: FeatureContract | None
    contract_path: Path
    expected_hash: str
    train: SplitArrays
    val: SplitArrays
    sources: dict[str, str]


@dataclass
class _EarlyStopping:
    mode: str
    patience: int
    best_value: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's monitor value; True when it improved on the best so far."""
        improved = self.best_value is None or (value < self.best_value if self.mode == "min" else value > self.best_value)
        if improved:
            self.best_value, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load(self, state: dict[str, Any]) -> None:
        self.best_value, self.best_epoch, self.bad_epochs = state["best_value"], state["best_epoch"], state["bad_epochs"]


@dataclass
class _Run:
    """Everything a run holds once set up (:func:`_setup`); the loop reads the family through it only."""

    config: TrainConfig
    out_dir: Path
    spec: VariantSpec
    family: ModelFamily
    settings: ResolvedSettings
    inputs: _Inputs
    data: FamilyData
    arch: dict[str, Any]
    train_batcher: Batcher
    val_batcher: Batcher
    baselines: dict[str, Any]
    loss_state: Any
    model: torch.nn.Module
    setup: optim.OptimSetup
    optimizer: torch.optim.Optimizer
    scheduler: Any
    stopper: _EarlyStopping
    fingerprint: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    history: list[dict[str, Any]] = field(default_factory=list)
    initial_val: dict[str, Any] | None = None  # the untrained model on the validation split
    start_epoch: int = 1
    complete: bool = False
    stopped_early: bool = False
    resumed_from: int | None = None
    threads: int = 1  # torch intra-op threads of this run (a resumed run takes its predecessor's)

    def save_state(self, epoch: int) -> None:
        """``resume.pt`` after ``epoch``: everything needed to continue bit for bit."""
        save_resume(self.out_dir / RESUME_NAME, {
            "fingerprint": self.fingerprint, "run_id": self.run_id, "epoch": epoch, "complete": self.complete,
            "stopped_early": self.stopped_early, "model_state_dict": cpu_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "early_stopping": self.stopper.state(), "history": self.history, "rng": capture_rng_state(),
            "initial_val": self.initial_val, "threads": self.threads,
        })


# -- settings and inputs ----------------------------------------------------------------------


def resolve_settings(config: TrainConfig, spec: VariantSpec, device: torch.device) -> ResolvedSettings:
    """The profile's values for every setting the config left at ``None`` (see module docstring);
    batch sizes in the unit of the variant's family (``ModelFamily.throughput_batch_size``,
    ``ModelFamily.min_eval_batch_size``)."""
    family = get_family(spec.family)
    throughput = config.profile == "throughput"
    cuda = device.type == "cuda"
    batch_size = config.batch_size or (family.throughput_batch_size if throughput else spec.default_batch_size)
    if config.num_workers is not None:
        workers = config.num_workers
    else:
        workers = min(4, max(2, runtime.usable_cpu_count() - 1)) if throughput else 0
    bf16 = config.bf16_autocast if config.bf16_autocast is not None else throughput
    if bf16 and not cuda:
        if config.bf16_autocast:
            log.warning("bf16 autocast was requested but the device is %s: autocast is used on CUDA only", device)
        bf16 = False
    pin = config.pin_memory if config.pin_memory is not None else cuda
    if pin and not cuda:
        log.warning("pin_memory was requested without CUDA: ignored")
        pin = False
    monitor = config.monitor or spec.monitor
    modes = {"val_loss": "min", **family.monitor_modes(spec), spec.monitor: spec.monitor_mode}
    if monitor not in modes:
        hint = family.monitor_hints.get(monitor, "is not one of its metrics")
        raise ConfigError(f"monitor {monitor!r} {hint}; variant {spec.name!r} can monitor {sorted(modes)}")
    return ResolvedSettings(
        device=str(device),
        batch_size=int(batch_size),
        eval_batch_size=max(int(batch_size), family.min_eval_batch_size),
        num_workers=int(workers),
        pin_memory=bool(pin),
        bf16_autocast=bool(bf16),
        shuffle=config.shuffle if config.shuffle is not None else throughput,
        monitor=monitor,
        monitor_mode=modes[monitor],
    )


def _schema_header_hash(schema_path: Path) -> str | None:
    with open(schema_path, encoding="utf-8") as fh:
        m = _SCHEMA_HASH_RE.match(fh.readline().strip())
    return m.group(1) if m else None


def _load_inputs(config: TrainConfig) -> _Inputs:
    schema_path = Path(config.feature_schema)
    if not schema_path.is_file():
        raise FileNotFoundError(f"{schema_path}: feature schema does not exist")
    schema = read_feature_schema(schema_path)
    contract_path = schema_path.parent / "feature_contract.json"
    contract = read_contract(contract_path) if contract_path.is_file() else None
    if contract is not None:
        for group in FEATURE_GROUPS:
            if contract.names(group) != schema[group]:
                raise ContractError(f"{schema_path}: {group} features differ from {contract_path} ({contract.hash})")
    expected = config.expected_hash or (contract.hash if contract else None) or _schema_header_hash(schema_path)
    if expected is None:
        raise ContractError(
            f"{schema_path}: no expected feature contract hash (set expected_hash, or put "
            "feature_contract.json beside the schema)"
        )
    if contract is not None and contract.hash != expected:
        raise ContractError(f"{contract_path}: contract hash {contract.hash} != expected {expected}")
    train, train_src = load_split_for_training(config.train_h5, expected, config.prefer_arrow)
    val, val_src = load_split_for_training(config.val_h5, expected, config.prefer_arrow)
    for split, path in ((train, config.train_h5), (val, config.val_h5)):
        for group in FEATURE_GROUPS:
            if list(split.feature_names.get(group, [])) != schema[group]:
                raise ContractError(f"{path}: {group} feature names differ from {schema_path}")
    return _Inputs(schema, contract, contract_path, expected, train, val, {"train": train_src, "val": val_src})


def _limited(split: SplitArrays, limit: int | None) -> SplitArrays:
    """The split with only its earliest ``limit`` sample end rows (arrays shared, not copied)."""
    if limit is None:
        return split
    return dataclasses.replace(split, sample_end_rows=np.sort(chronological_end_rows(split, limit)))


def _fingerprint(
    config: TrainConfig, settings: ResolvedSettings, arch: dict[str, Any], inputs: _Inputs,
    setup: optim.OptimSetup, data: FamilyData,
) -> str:
    """A digest of everything that changes the result of a run (a ``resume.pt`` of another is refused).

    The optimizer block and the family inputs enter only when they differ from what every run used
    before they existed (AdamW with its defaults, no family input), so that runs recorded before
    keep their fingerprint and resume."""
    body = {
        **{name: getattr(config, name) for name in _FINGERPRINT_FIELDS},
        "scheduler": setup.scheduler,
        "batch_size": settings.batch_size,
        "shuffle": settings.shuffle,
        "bf16_autocast": settings.bf16_autocast,
        "monitor": settings.monitor,
        "arch": arch,
        "feature_contract_hash": inputs.expected_hash,
        "train_checksum": inputs.train.attrs.get("content_checksum"),
        "val_checksum": inputs.val.attrs.get("content_checksum"),
    }
    legacy_scheduler = {**optim.SCHEDULER_DEFAULTS.get(setup.scheduler, {}), **config.scheduler_params}
    if (setup.optimizer, setup.optimizer_params) != ("adamw", {}) or setup.scheduler_params != legacy_scheduler:
        body["optim"] = setup.to_dict()
    if config.family_inputs or data.digests:
        body["family_inputs"] = {"paths": {k: str(v) for k, v in config.family_inputs.items()},
                                 "digests": dict(data.digests)}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _iterate(loader: Iterable[Batch]) -> Iterable[Batch]:
    """Iterate a loader without drawing from torch's global RNG (DataLoader seeds its workers from it),
    so the training RNG stream is the same whatever the number of workers."""
    with torch.random.fork_rng(devices=[]):
        it = iter(loader)
    return it


# -- the epoch loop ---------------------------------------------------------------------------


class _StepStats:
    """Per-step loss / grad-norm statistics kept on the device and checked in chunks."""

    def __init__(self, heads: list[str]) -> None:
        self.heads = heads
        self.pending: list[torch.Tensor] = []
        self.pending_sizes: list[int] = []
        self.n_steps = 0
        self.n_samples = 0
        self.loss_sum = 0.0
        self.head_sums = np.zeros(len(heads))
        self.gnorm_sum = 0.0
        self.gnorm_max = 0.0
        self.first_loss: float | None = None
        self.last_loss: float | None = None

    def add(self, total: torch.Tensor, per_head: dict[str, torch.Tensor], gnorm: torch.Tensor, size: int) -> None:
        row = torch.stack([total.detach().float(), gnorm.detach().float(), *(per_head[h].detach().float() for h in self.heads)])
        self.pending.append(row)
        self.pending_sizes.append(size)

    def flush(self, epoch: int) -> None:
        """Move pending rows to the host; raise TrainingDivergedError on the first non-finite value."""
        if not self.pending:
            return
        rows = torch.stack(self.pending).cpu().numpy().astype(np.float64)
        sizes = np.asarray(self.pending_sizes, dtype=np.float64)
        bad = ~np.isfinite(rows)
        if bad.any():
            i, j = map(int, np.argwhere(bad)[0])
            what = ["loss", "gradient norm", *(f"loss of head {h!r}" for h in self.heads)][j]
            raise TrainingDivergedError(
                f"training diverged: {what} is {rows[i, j]} at epoch {epoch}, step {self.n_steps + i + 1}; "
                "model_best.pt and resume.pt were not updated (try a lower learning rate or check the data)"
            )
        if self.first_loss is None:
            self.first_loss = float(rows[0, 0])
        self.last_loss = float(rows[-1, 0])
        self.loss_sum += float((rows[:, 0] * sizes).sum())
        self.head_sums += (rows[:, 2:] * sizes[:, None]).sum(axis=0)
        self.gnorm_sum += float(rows[:, 1].sum())
        self.gnorm_max = max(self.gnorm_max, float(rows[:, 1].max()))
        self.n_steps += len(rows)
        self.n_samples += int(sizes.sum())
        self.pending, self.pending_sizes = [], []

    def summary(self) -> dict[str, Any]:
        n = max(self.n_samples, 1)
        return {
            "train_loss": self.loss_sum / n,
            "train_head_losses": {h: float(v / n) for h, v in zip(self.heads, self.head_sums, strict=True)},
            "grad_norm_mean": self.gnorm_sum / max(self.n_steps, 1),
            "grad_norm_max": self.gnorm_max,
            "first_step_loss": self.first_loss,
            "last_step_loss": self.last_loss,
            "n_steps": self.n_steps,
            "n_train_samples": self.n_samples,
        }


def _autocast(settings: ResolvedSettings) -> Any:
    if settings.bf16_autocast:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def _train_epoch(run: _Run, epoch: int, progress: bool) -> dict[str, Any]:
    """One pass over the train batches: forward, the family's losses, backward, clipping, step."""
    config, settings, family, spec = run.config, run.settings, run.family, run.spec
    device = torch.device(settings.device)
    model, optimizer, batcher = run.model, run.optimizer, run.train_batcher
    stats = _StepStats([h.name for h in spec.heads])
    telemetry = family.batch_telemetry(spec)
    batcher.set_epoch(epoch)
    loader = make_dataloader(batcher, num_workers=settings.num_workers, pin_memory=settings.pin_memory)
    model.train()
    wait = 0.0
    bar = tqdm(total=len(batcher), desc=f"epoch {epoch}/{config.epochs}", file=sys.stderr, disable=not progress,
               leave=False, dynamic_ncols=True)
    t_start = time.perf_counter()
    it = _iterate(loader)
    for step in range(1, len(batcher) + 1):
        t0 = time.perf_counter()
        cpu_batch = next(it)
        wait += time.perf_counter() - t0
        telemetry.add(cpu_batch)
        batch = to_device(cpu_batch, device)
        with _autocast(settings):
            outputs = model(batch)
        outputs = {k: v.float() for k, v in outputs.items()}
        total, per_head = family.losses(spec, outputs, batch, run.loss_state)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        stats.add(total, per_head, gnorm, family.samples_in(cpu_batch))
        if step % config.log_every == 0 or step == len(batcher):
            stats.flush(epoch)  # raises on a non-finite value of any step since the last flush
            if step % config.log_every == 0:
                log.info("epoch %d step %d/%d loss %.6g", epoch, step, len(batcher), stats.last_loss)
            bar.set_postfix(loss=f"{stats.last_loss:.4g}")
        optimizer.step()
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t_start
    out = stats.summary()
    out.update(telemetry.summary())
    out.update(
        {
            "train_seconds": seconds,
            "throughput_samples_per_s": stats.n_samples / seconds if seconds > 0 else None,
            "loader_share": wait / seconds if seconds > 0 else None,
        }
    )
    return out


@torch.no_grad()
def _predict(run: _Run) -> dict[str, Any]:
    """Validation pass: mean losses (per head and total) and the outputs / the family's ``eval_keys`` as
    NumPy arrays in sample order.

    Outputs and kept keys are written into arrays allocated once for the whole split (sized from the
    first batch), not collected per batch and concatenated: small per-batch arrays that outlive their
    batch sit between the freed batch-sized blocks and fragment the heap. Measured on an 800k-row
    train split (the GRU fusion window model, 480 KiB val windows per batch): the per-batch lists made anonymous
    memory jump by ~330 MiB during a val pass in 4 of 6 runs (peak RSS 1.1-1.4 GiB instead of 0.8).
    """
    settings, family, spec, model, batcher = run.settings, run.family, run.spec, run.model, run.val_batcher
    device = torch.device(settings.device)
    heads = [h.name for h in spec.heads]
    model.eval()
    loader = make_dataloader(batcher, num_workers=settings.num_workers, pin_memory=settings.pin_memory)
    sums = torch.zeros(len(heads) + 1, dtype=torch.float64, device=device)
    total_n = batcher.n_samples
    kept = tuple(family.eval_keys)
    out: dict[str, np.ndarray] = {}
    n = 0
    for cpu_batch in _iterate(loader):
        batch = to_device(cpu_batch, device)
        with _autocast(settings):
            outputs = model(batch)
        outputs = {k: v.float() for k, v in outputs.items()}
        total, per_head = family.losses(spec, outputs, batch, run.loss_state)
        size = family.samples_in(cpu_batch)
        sums += torch.stack([total, *(per_head[h] for h in heads)]).double() * size
        parts = {**{h: outputs[h].detach().cpu().numpy() for h in heads}, **{k: cpu_batch[k].numpy() for k in kept}}
        if not out:
            out = {k: np.empty((total_n, *v.shape[1:]), dtype=v.dtype) for k, v in parts.items()}
        for k, v in parts.items():
            out[k][n : n + size] = v
        n += size
    if n != total_n:
        raise TrainingError(f"validation pass saw {n} samples, the batcher has {total_n}")
    values = (sums / max(n, 1)).cpu().numpy()
    if not np.isfinite(values).all():
        raise TrainingDivergedError(f"training diverged: validation loss is not finite ({values.tolist()})")
    return {
        "val_loss": float(values[0]),
        "val_head_losses": {h: float(v) for h, v in zip(heads, values[1:], strict=True)},
        "outputs": {h: out[h] for h in heads},
        "kept": {k: out[k] for k in kept},
        "n": n,
    }


# -- summary ----------------------------------------------------------------------------------


def head_vs_baseline(spec: VariantSpec, final_val: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per head: the model's metric and the trivial baseline's, side by side (``ModelFamily.head_vs_baseline``
    of the variant's family)."""
    return get_family(spec.family).head_vs_baseline(spec, final_val)


def _data_windows(inputs: _Inputs, train_used: int, val_used: int) -> dict[str, Any]:
    out = {}
    for name, split, used in (("train", inputs.train, train_used), ("val", inputs.val, val_used)):
        out[name] = {
            "start": split.attrs.get("time_min"),
            "end": split.attrs.get("time_max"),
            "n_rows": split.n_rows,
            "n_samples": split.n_samples,
            "n_samples_used": used,
        }
    return out


# -- out_dir housekeeping ---------------------------------------------------------------------


def _clear_run(out_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)


def _attach_log_file(out_dir: Path, append: bool) -> tuple[logging.Handler, logging.Logger, int]:
    handler = logging.FileHandler(out_dir / LOG_NAME, mode="a" if append else "w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    pkg = logging.getLogger("sentinel_pipeline")
    old_level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    return handler, pkg, old_level


def _existing_bundle(models_dir: Path | None, variant: str, run_id: str) -> Path | None:
    """A bundle in ``models_dir`` that was written from run ``run_id`` (so a rerun does not duplicate it)."""
    if models_dir is None:
        return None
    from sentinel_pipeline.bundles import list_bundles

    for path in list_bundles(models_dir, variant):
        try:
            if json.loads((path / METRICS_NAME).read_text(encoding="utf-8")).get("run_id") == run_id:
                return path
        except (OSError, json.JSONDecodeError):
            continue
    return None


def completed_run(out_dir: str | Path, models_dir: str | Path | None) -> TrainResult | None:
    """The result of a run in ``out_dir`` that completed and whose bundle is in ``models_dir``, read
    from its files alone (no data, no torch state); ``None`` when there is no such run.

    What ``train()`` would return for it (``already_complete``), minus its start-up: the Dagster
    training asset uses it to skip the training subprocess when nothing changed.
    """
    out_dir = Path(out_dir)
    try:
        metrics = json.loads((out_dir / METRICS_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(metrics, dict) or metrics.get("status") != "complete" or not (out_dir / BEST_NAME).is_file():
        return None
    variant, run_id = metrics.get("variant"), metrics.get("run_id")
    if not isinstance(variant, str) or not isinstance(run_id, str):
        return None
    bundle = _existing_bundle(Path(models_dir) if models_dir is not None else None, variant, run_id)
    if bundle is None:
        return None
    return TrainResult(out_dir, out_dir / BEST_NAME, metrics, list(metrics.get("history") or []), bundle,
                       bool(metrics.get("stopped_early")), metrics.get("best_epoch"), already_complete=True)


def completed_run_if_idle(out_dir: str | Path, models_dir: str | Path | None) -> TrainResult | None:
    """:func:`completed_run`, read under a shared lock on the run directory taken without waiting:
    ``None`` while a ``train()`` holds the directory (the caller then starts ``train()``, which waits
    for the lock and makes the decisive check itself). A fast path that never reads a run being written.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    try:
        with run_dir_lock(out_dir, shared=True, timeout_s=0):
            return completed_run(out_dir, models_dir)
    except LockTimeout:
        return None


def _write_bundle(run: _Run, metrics: dict[str, Any]) -> Path:
    from sentinel_pipeline.bundles import write_bundle

    config = run.config
    existing = _existing_bundle(config.models_dir, metrics["variant"], metrics["run_id"])
    if existing is not None:
        log.info("bundle of this run already exists: %s", existing)
        return existing
    # under the run directory's lock (train()), and the models directory's write lock: one writer
    # at a time chooses a free bundle name; leftovers of writers that died are swept first
    with bundle_writes_lock(config.models_dir):
        sweep_stale_temps(config.models_dir)
        path = write_bundle(
            run.out_dir,
            models_dir=config.models_dir,
            scalers_dir=_scalers_dir(config),
            contract_path=run.inputs.contract_path,
            schema_path=config.feature_schema,
            label_params=run.inputs.train.label_params,
            data_windows=metrics["data_windows"],
            extra_metadata={"run_id": metrics["run_id"], "data_source": metrics["data_source"]},
            family_files=run.family.bundle_files(run.data),
            family_input_digests=run.data.digests,
        )
    log.info("wrote bundle %s", path)
    return path


def _scalers_dir(config: TrainConfig) -> Path:
    """``config.scalers_dir``, else ``<artifacts>/scalers`` of the ``<artifacts>/hdf5/train.h5`` layout."""
    return Path(config.scalers_dir) if config.scalers_dir else Path(config.train_h5).parent.parent / "scalers"


def _check_bundle_inputs(config: TrainConfig, inputs: _Inputs) -> None:
    """Fail before training when a bundle was asked for but its inputs are missing."""
    if config.models_dir is None:
        return
    scalers = _scalers_dir(config)
    missing = [str(p) for p in (scalers / "seq_scaler.joblib", scalers / "snap_scaler.joblib",
                                scalers / "scalers.json", inputs.contract_path) if not p.is_file()]
    if missing:
        raise ConfigError(f"models_dir is set but the bundle inputs are missing: {missing} (set scalers_dir?)")


# -- train ------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    progress: bool = True,
    *,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``config.model`` on the config's train/val splits; see the module docstring.

    ``on_epoch_end`` is called with each epoch's history record after ``resume.pt`` is written
    (an exception raised there interrupts the run as a crash would; rerunning resumes).
    """
    out_dir = Path(config.out_dir)
    _probe_outputs(config, out_dir)  # a read-only or full disk fails now, not after the training
    # the whole run under the run directory's lock: a second process on the same run directory
    # waits here, then finds the run complete with its bundle and reuses it instead of training again
    with run_dir_lock(out_dir):
        sweep_stale_temps(out_dir)  # temp files of a killed run (never of a live writer)
        if config.fresh:
            _clear_run(out_dir)
        resuming = (out_dir / RESUME_NAME).is_file()
        if not resuming:
            _clear_run(out_dir)  # outputs without a resume state belong to no run we can continue
        handler, pkg, old_level = _attach_log_file(out_dir, append=resuming)
        try:
            return _train(config, out_dir, progress, on_epoch_end, resuming)
        except Exception:
            log.exception("training failed")
            raise
        finally:
            pkg.removeHandler(handler)
            pkg.setLevel(old_level)
            handler.close()


def _probe_outputs(config: TrainConfig, out_dir: Path) -> None:
    """Create and remove a probe file in the run directory and the models directory, and check the
    models directory's free space against a rough bundle size (:class:`atomic_io.WriteError` in plain
    words: disk full, read-only, permission denied)."""
    probe_writable(out_dir, what="training run")
    if config.models_dir is not None:
        probe_writable(config.models_dir, needed_bytes=_rough_bundle_bytes(config), what="bundle")


def _rough_bundle_bytes(config: TrainConfig) -> int:
    """What a new bundle of ``config.model`` will take: the newest one of the variant already there,
    else the scalers and contract it copies plus a few MB for weights and reports."""
    from sentinel_pipeline.bundles import list_bundles

    def size(paths: Iterable[Path]) -> int:
        total = 0
        for p in paths:
            with contextlib.suppress(OSError):
                total += p.stat().st_size if p.is_file() else 0
        return total

    if config.models_dir is not None:
        previous = list_bundles(config.models_dir, config.model)
        if previous:
            return size(previous[0].iterdir())
    scalers = _scalers_dir(config)
    return size(scalers.glob("*")) + 8 * 1024 * 1024


def _train(
    config: TrainConfig, out_dir: Path, progress: bool, on_epoch_end: Callable[[dict[str, Any]], None] | None,
    resuming: bool,
) -> TrainResult:
    run = _setup(config, out_dir)
    if resuming:
        done = _resume(run)
        if done is not None:
            return done
    else:
        log.info("training %s on %s (%s) and %s (%s), contract %s", run.spec.name, config.train_h5,
                 run.inputs.sources["train"], config.val_h5, run.inputs.sources["val"], run.inputs.expected_hash)
    write_json_atomic(out_dir / CONFIG_NAME, {
        **config.to_dict(), "optimizer": run.setup.optimizer, "scheduler": run.setup.scheduler,
        "resolved": run.settings.to_dict(), "arch": run.arch, "feature_contract_hash": run.inputs.expected_hash,
        "run_id": run.run_id, "model_family": run.family.name, "batch_kind": run.family.batch_kind,
        "optim": run.setup.to_dict(),
    })
    log.info("settings: %s; %d train / %d val samples", run.settings.to_dict(), run.train_batcher.n_samples,
             run.val_batcher.n_samples)
    if not resuming:
        _initial_validation(run)
    _epoch_loop(run, progress, on_epoch_end)
    t_final = time.perf_counter()
    best_val_loss, final_val = _final_evaluation(run)
    metrics = _metrics(run, best_val_loss, final_val, time.perf_counter() - t_final)
    plot_loss_curves(run.history, out_dir / CURVE_NAME, title=f"{run.spec.name} ({run.inputs.expected_hash})")
    write_json_atomic(out_dir / METRICS_NAME, metrics)
    log.info("final validation (best epoch %s): %s", run.stopper.best_epoch,
             json.dumps(metrics["head_vs_baseline"], default=str))
    bundle = _write_bundle(run, metrics) if config.models_dir else None
    return TrainResult(out_dir, out_dir / BEST_NAME, metrics, run.history, bundle, run.stopped_early,
                       run.stopper.best_epoch, resumed_from_epoch=run.resumed_from)


def _setup(config: TrainConfig, out_dir: Path) -> _Run:
    """Threads, device, settings, inputs (the family's too), architecture, batchers, baselines, model,
    optimizer, scheduler: a run ready for its first (or next) epoch."""
    # every training path (CLI, Pipes, tests) pins its thread count; None: runtime.default_thread_count
    n_threads = runtime.configure_threads(config.threads)
    log.info("torch intra-op threads: %d (%s; %d usable CPUs)", n_threads,
             "configured" if config.threads is not None else "default: the usable CPUs not busy at the start",
             runtime.usable_cpu_count())
    try:
        spec = get_variant(config.model)
        family = get_family(spec.family)
        device = runtime.select_device(config.device)
        setup = optim.resolve(config.optimizer, config.optimizer_params, config.scheduler, config.scheduler_params,
                              family.optimizer_defaults)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(str(exc)) from exc
    settings = resolve_settings(config, spec, device)
    runtime.seed_everything(config.seed)
    inputs = _load_inputs(config)
    _check_bundle_inputs(config, inputs)
    try:
        data = family.prepare(config, inputs)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"inputs of model family {family.name!r}: {exc}") from exc
    arch = _resolve_arch(config, spec, family, inputs)
    train_split = _limited(inputs.train, config.limit_samples)
    val_split = _limited(inputs.val, config.limit_samples)
    # each batcher builds only the batch keys the variant's model, losses and metrics read
    train_batcher = family.make_batcher(train_split, seq_len=config.seq_len, batch_size=settings.batch_size,
                                        shuffle=settings.shuffle, seed=config.seed, data=data,
                                        keys=family.batch_keys(spec))
    val_batcher = family.make_batcher(val_split, seq_len=config.seq_len, batch_size=settings.eval_batch_size,
                                      shuffle=False, seed=config.seed, data=data,
                                      keys=family.batch_keys(spec, evaluation=True))
    for name, b, path in (("train", train_batcher, config.train_h5), ("val", val_batcher, config.val_h5)):
        if b.n_samples == 0:
            raise TrainingError(f"{path}: the {name} split has no samples to train on")
    baselines = family.train_baselines(spec, train_split, data)
    loss_state = family.loss_state(spec, baselines, device)
    model = family.build_model(arch)
    model.to(device)
    optimizer = optim.build_optimizer(setup, model.parameters(), config.learning_rate, config.weight_decay)
    try:
        scheduler = optim.build_scheduler(setup, optimizer, settings.monitor_mode)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"scheduler_params {config.scheduler_params} for {setup.scheduler!r}: {exc}") from exc
    return _Run(
        config=config, out_dir=out_dir, spec=spec, family=family, settings=settings, inputs=inputs, data=data,
        arch=arch, train_batcher=train_batcher, val_batcher=val_batcher, baselines=baselines,
        loss_state=loss_state, model=model, setup=setup, optimizer=optimizer, scheduler=scheduler,
        stopper=_EarlyStopping(settings.monitor_mode, config.patience),
        fingerprint=_fingerprint(config, settings, arch, inputs, setup, data), threads=n_threads,
    )


def _resolve_arch(config: TrainConfig, spec: VariantSpec, family: ModelFamily, inputs: _Inputs) -> dict[str, Any]:
    """The architecture from the feature schema's dims and the contract's cardinalities (never from data)."""
    dims = {g: len(inputs.schema[g]) for g in FEATURE_GROUPS}
    if dims["ctx_cat"] and inputs.contract is None:
        raise ContractError(
            f"{inputs.contract_path}: needed for the ctx_cat cardinalities but missing (feature_contract.json "
            "must sit beside the feature schema)"
        )
    cards = inputs.contract.ctx_cat_cardinalities if inputs.contract is not None else []
    try:
        arch = family.resolve_arch(spec, dims, cards, config.seq_len, config.arch)
    except ValueError as exc:
        raise ConfigError(f"architecture of {spec.name!r}: {exc}") from exc
    for split, path in ((inputs.train, config.train_h5), (inputs.val, config.val_h5)):
        if config.seq_len > split.seq_len:
            raise ConfigError(f"{path}: seq_len {config.seq_len} is longer than the split's seq_len {split.seq_len}")
    return arch


def _resume(run: _Run) -> TrainResult | None:
    """Restore the run from ``resume.pt`` (refused for another fingerprint). A completed run with its
    metrics is returned as it is (``already_complete``, its bundle written if missing); else None and
    the run continues after the last completed epoch."""
    out_dir = run.out_dir
    state = load_resume(out_dir / RESUME_NAME, map_location=torch.device(run.settings.device))
    if state.get("fingerprint") != run.fingerprint:
        raise TrainingError(
            f"{out_dir / RESUME_NAME}: holds a run with a different configuration or data "
            f"(fingerprint {state.get('fingerprint')} != {run.fingerprint}); use --fresh or another out dir"
        )
    run.run_id = state["run_id"]
    run.history = list(state["history"])
    run.initial_val = state.get("initial_val")
    run.stopper.load(state["early_stopping"])
    run.complete, run.stopped_early = bool(state["complete"]), bool(state["stopped_early"])
    run.resumed_from = int(state["epoch"])
    saved_threads = state.get("threads")
    if run.config.threads is None and saved_threads and int(saved_threads) != run.threads:
        # the default follows the free CPUs at the start; continue with the count the run began with
        # (results are bit-identical only at equal thread counts)
        run.threads = runtime.configure_threads(int(saved_threads))
        log.info("torch intra-op threads: %d (those of the run being resumed)", run.threads)
    if run.complete and (out_dir / METRICS_NAME).is_file():
        metrics = json.loads((out_dir / METRICS_NAME).read_text(encoding="utf-8"))
        log.info("run in %s is already complete (best epoch %s); not retraining (use --fresh to retrain)",
                 out_dir, metrics.get("best_epoch"))
        bundle = _write_bundle(run, metrics) if run.config.models_dir else None
        return TrainResult(out_dir, out_dir / BEST_NAME, metrics, run.history, bundle, run.stopped_early,
                           run.stopper.best_epoch, already_complete=True, resumed_from_epoch=run.resumed_from)
    run.model.load_state_dict(state["model_state_dict"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    run.start_epoch = run.resumed_from + 1
    log.info("resuming %s after epoch %d", out_dir, run.resumed_from)
    return None


def _initial_validation(run: _Run) -> None:
    """The untrained model's validation loss: what "training improved the model" is measured against
    (verification's ``metrics_sane``); run under forked RNG states so that it changes nothing of the
    training run (a DataLoader draws a seed from torch's RNG per iterator)."""
    device = torch.device(run.settings.device)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        pred = _predict(run)
    run.initial_val = {"val_loss": pred["val_loss"], "val_head_losses": pred["val_head_losses"]}
    log.info("untrained model: val loss %.6g", run.initial_val["val_loss"])


def _epoch_loop(run: _Run, progress: bool, on_epoch_end: Callable[[dict[str, Any]], None] | None) -> None:
    """Train, validate, checkpoint and log every epoch until the last one or early stopping."""
    config, settings = run.config, run.settings
    epoch = run.start_epoch - 1
    for epoch in range(run.start_epoch, config.epochs + 1) if not run.complete else ():
        t_epoch = time.perf_counter()
        lr = float(run.optimizer.param_groups[0]["lr"])
        record: dict[str, Any] = {"epoch": epoch, "lr": lr}
        record.update(_train_epoch(run, epoch, progress))
        t_val = time.perf_counter()
        pred = _predict(run)
        record["val_loss"] = pred["val_loss"]
        record["val_head_losses"] = pred["val_head_losses"]
        record.update(run.family.epoch_metrics(run.spec, pred["outputs"], pred["kept"]))
        record["val_seconds"] = time.perf_counter() - t_val
        value = record[settings.monitor]
        record["monitor_value"] = value
        record["improved"] = run.stopper.update(value, epoch)
        if record["improved"]:
            save_best(run.out_dir / BEST_NAME, cpu_state_dict(run.model), run.arch, epoch, pred["val_loss"])
        optim.step_scheduler(run.scheduler, value)
        run.stopped_early = run.stopper.should_stop and epoch < config.epochs
        run.complete = run.stopped_early or epoch == config.epochs
        record["epoch_seconds"] = time.perf_counter() - t_epoch
        run.history.append(record)
        run.save_state(epoch)
        _log_epoch(run, record, lr)
        if on_epoch_end is not None:
            on_epoch_end(record)
        if run.complete:
            break
    if run.stopped_early:
        log.info("early stopping after epoch %d: %s did not improve for %d epochs (best %.6g at epoch %d)",
                 epoch, settings.monitor, config.patience, run.stopper.best_value, run.stopper.best_epoch)


def _log_epoch(run: _Run, record: dict[str, Any], lr: float) -> None:
    log.info(
        "epoch %d/%d: train %.6g val %.6g%s | %s %.6g%s | grad-norm mean %.3g max %.3g | %.0f samples/s, "
        "loader %.0f%% | lr %.3g | %.1fs", record["epoch"], run.config.epochs, record["train_loss"],
        record["val_loss"], run.family.epoch_log(run.spec, record), run.settings.monitor, record["monitor_value"],
        " (best)" if record["improved"] else "", record["grad_norm_mean"], record["grad_norm_max"],
        record["throughput_samples_per_s"] or 0.0, 100 * (record["loader_share"] or 0.0), lr,
        record["epoch_seconds"],
    )


def _final_evaluation(run: _Run) -> tuple[float, dict[str, Any]]:
    """The best checkpoint on the validation split: ``(its val loss, the family's evaluation)``."""
    best = load_best(run.out_dir / BEST_NAME, map_location=torch.device(run.settings.device))
    run.model.load_state_dict(best["model_state_dict"])
    pred = _predict(run)
    return float(best["val_loss"]), run.family.evaluate(run.spec, pred["outputs"], pred["kept"], run.baselines)


def _metrics(run: _Run, best_val_loss: float, final_val: dict[str, Any], final_seconds: float) -> dict[str, Any]:
    """``metrics.json``: the run's identity, settings, best epoch, dataset counts, step and throughput
    summaries, baselines, the final evaluation and the per-epoch history."""
    history, inputs, settings, stopper = run.history, run.inputs, run.settings, run.stopper
    train_steps = [h for h in history if h.get("first_step_loss") is not None]
    total_samples = sum(h["n_train_samples"] for h in history)
    total_train_s = sum(h["train_seconds"] for h in history)
    return {
        "run_id": run.run_id,
        "status": "complete",
        "variant": run.spec.name,
        "feature_contract_hash": inputs.expected_hash,
        "data_source": inputs.sources,
        "settings": settings.to_dict(),
        "monitor": settings.monitor,
        "monitor_mode": settings.monitor_mode,
        "best_epoch": stopper.best_epoch,
        "best_monitor_value": stopper.best_value,
        "best_val_loss": best_val_loss,
        "initial_val_loss": run.initial_val["val_loss"] if run.initial_val else None,
        "initial_val_head_losses": run.initial_val["val_head_losses"] if run.initial_val else None,
        "epochs_completed": len(history),
        "stopped_early": run.stopped_early,
        "dataset": {
            name: {"rows": s.n_rows, "samples": s.n_samples, "samples_used": b.n_samples,
                   "eligibility_rate": s.n_samples / s.n_rows if s.n_rows else None}
            for name, s, b in (("train", inputs.train, run.train_batcher), ("val", inputs.val, run.val_batcher))
        },
        "data_windows": _data_windows(inputs, run.train_batcher.n_samples, run.val_batcher.n_samples),
        "first_step_loss": train_steps[0]["first_step_loss"] if train_steps else None,
        "last_step_loss": train_steps[-1]["last_step_loss"] if train_steps else None,
        "mean_grad_norm": (sum(h["grad_norm_mean"] * h["n_steps"] for h in history)
                           / max(sum(h["n_steps"] for h in history), 1)),
        "total_seconds": sum(h["epoch_seconds"] for h in history) + final_seconds,
        "train_seconds": total_train_s,
        "avg_throughput_samples_per_s": total_samples / total_train_s if total_train_s > 0 else None,
        "baselines": run.baselines,
        "final_val": final_val,
        "head_vs_baseline": run.family.head_vs_baseline(run.spec, final_val),
        "history": history,
    }


__all__ = [
    "ResolvedSettings",
    "TrainResult",
    "TrainingDivergedError",
    "TrainingError",
    "completed_run",
    "completed_run_if_idle",
    "head_vs_baseline",
    "resolve_settings",
    "train",
]
