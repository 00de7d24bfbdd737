"""Model families: the registry, and a toy family of its own batch kind trained, resumed, bundled,
verified and scored through the project's code with no change to the engine.

The toy family ``toy_rows`` reads one snap row per sample (batch kind ``"rows"``: no window), scales
it by a factor read from an extra input file (``TrainConfig.family_inputs["scale"]``, carried into the
bundle), predicts ``early_move`` with a small MLP, monitors its own metric ``val_mae``, counts the
positive targets per epoch as telemetry and prefers AdaBelief with cosine warm restarts.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from sentinel_pipeline.bundles import BundleError, check_manifest, load_bundle
from sentinel_pipeline.data.split_arrays import TARGET_NAMES, SplitArrays
from sentinel_pipeline.evaluation.predictions import head_column, score_split
from sentinel_pipeline.training import engine, evaluation
from sentinel_pipeline.training import families as registry
from sentinel_pipeline.training.checkpoints import load_best
from sentinel_pipeline.training.data_loader import chronological_end_rows
from sentinel_pipeline.training.engine import TrainingError, train
from sentinel_pipeline.training.families import (
    BatchTelemetry,
    FamilyData,
    HeadSpec,
    ModelFamily,
    VariantSpec,
    family_of,
    get_family,
    registered,
)
from sentinel_pipeline.verification import QualityGates, verify_bundle
from sentinel_pipeline_tests.training_fixtures import TrainingData, make_training_data, train_config

LIMIT = 240
TARGET = "early_move"


class Interrupt(Exception):
    pass


class ToyNet(nn.Module):
    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(arch["input_dim"], arch["hidden_dim"]), nn.Tanh(),
                                 nn.Dropout(arch["dropout"]), nn.Linear(arch["hidden_dim"], 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"ret": self.net(batch["x"]).squeeze(-1)}


class RowBatcher:
    """Batches of sample rows (no window): ``x`` = snap row * scale, ``y`` = the target."""

    def __init__(self, split: SplitArrays, batch_size: int, shuffle: bool, seed: int, scale: float) -> None:
        self.split, self.batch_size, self.shuffle, self.seed, self.scale = split, batch_size, shuffle, seed, scale
        self.ends = chronological_end_rows(split)
        self.n_samples = int(self.ends.size)
        self.order = self.ends
        self.col = list(split.target_names).index(TARGET)

    def __len__(self) -> int:
        return -(-self.n_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.order = (np.random.default_rng([self.seed, epoch]).permutation(self.ends) if self.shuffle
                      else self.ends)

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        ends = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        return {
            "x": torch.from_numpy(np.asarray(self.split.snap[ends], dtype=np.float32) * np.float32(self.scale)),
            "y": torch.from_numpy(np.asarray(self.split.targets[ends, self.col], dtype=np.float32)),
            "end_rows": torch.from_numpy(ends.astype(np.int64)),
            "timestamp": torch.from_numpy(np.asarray(self.split.timestamp[ends], dtype=np.int64)),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self.batch(i) for i in range(len(self)))


class PositiveShare(BatchTelemetry):
    def __init__(self) -> None:
        self.pos, self.n = 0, 0

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        y = batch["y"]
        self.pos += int((y > 0).sum())
        self.n += int(y.numel())

    def summary(self) -> dict[str, Any]:
        return {"toy_positive_share": self.pos / max(self.n, 1)}


SEED_COSINE = {"T_0": 3, "T_mult": 2, "eta_min": 5e-5}


class ToyRows(ModelFamily):
    name = "toy_rows"
    batch_kind = "rows"
    variants = (VariantSpec(
        name="toy_linear", inputs=("snap",), heads=(HeadSpec("ret", "regression", TARGET, 1, "mse"),),
        default_arch={"hidden_dim": 8, "dropout": 0.1}, monitor="val_mae", monitor_mode="min",
        default_batch_size=32, classifier=False, build=ToyNet, family="toy_rows", batch_kind="rows"),)
    required_inputs = ("scale",)
    bundle_file_names = ("toy_scale.json",)
    eval_keys = ("y", "timestamp")
    optimizer_defaults = {"optimizer": "adabelief", "scheduler": "cosine_restarts",
                          "scheduler_params": {"cosine_restarts": SEED_COSINE}}
    prepared: list[Path] = []

    def resolve_arch(self, spec, contract_dims, ctx_cat_cardinalities, seq_len, overrides=None):
        hyper = {**spec.default_arch, **(overrides or {})}
        return {"variant": spec.name, "input_dim": int(contract_dims["snap"]), "seq_len": int(seq_len),
                "heads": [h.to_dict() for h in spec.heads], **hyper}

    def build_model(self, arch):
        return ToyNet(arch)

    @staticmethod
    def _data(path: Path) -> FamilyData:
        raw = path.read_bytes()
        return FamilyData(values={"scale": float(json.loads(raw)["scale"])}, paths={"scale": path},
                          digests={"scale": hashlib.sha256(raw).hexdigest()})

    def prepare(self, config, inputs):
        super().prepare(config, inputs)  # required inputs given and present
        type(self).prepared.append(Path(config.family_inputs["scale"]))
        return self._data(Path(config.family_inputs["scale"]))

    def make_batcher(self, split, *, seq_len, batch_size, shuffle, seed, data, keys=None):
        return RowBatcher(split, batch_size, shuffle, seed, data.values["scale"])

    def samples_in(self, batch):
        return int(batch["y"].shape[0])

    def bundle_files(self, data):
        return {"toy_scale.json": data.paths["scale"]}

    # ONNX: the model reads "x" (not an input group), so the family declares it
    def onnx_inputs(self, spec, arch):
        return {"x": {0: "batch"}}

    def onnx_example(self, spec, arch, dims, n=2):
        return {"x": torch.zeros(n, int(arch["input_dim"]))}

    def load_bundle_data(self, bundle_dir):
        return self._data(Path(bundle_dir) / "toy_scale.json")

    def train_baselines(self, spec, train_split, data):
        ends = chronological_end_rows(train_split)
        values = np.asarray(train_split.target(TARGET))[ends]
        return {"target_means": {TARGET: float(np.nanmean(values))}}

    def losses(self, spec, outputs, batch, state):
        loss = torch.mean((outputs["ret"] - batch["y"]) ** 2)
        return loss, {"ret": loss}

    def batch_telemetry(self, spec):
        return PositiveShare()

    def monitor_modes(self, spec):
        return {"val_mae": "min"}

    def epoch_metrics(self, spec, outputs, kept):
        return {"val_mae": float(np.mean(np.abs(outputs["ret"] - kept["y"])))}

    def epoch_log(self, spec, record: Mapping[str, Any]) -> str:
        return f" toy-mae {record['val_mae']:.4f}"

    def evaluate(self, spec, outputs, kept, baselines):
        head = evaluation.regression_metrics(outputs["ret"], kept["y"], kept["timestamp"],
                                             baselines["target_means"][TARGET])
        return {"n_samples": int(kept["y"].shape[0]), "heads": {"ret": head}}

    def head_vs_baseline(self, spec, final_val):
        m = final_val["heads"]["ret"]
        return {"ret": {"metric": "mse", "higher_is_better": False, "model": m["mse"],
                        "baseline": m["baseline_mse"], "beats_baseline": m["mse"] < m["baseline_mse"]}}

    def signal(self, spec, outputs):
        return outputs["ret"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    return make_training_data(tmp_path_factory.mktemp("data"), signal=1.5)


@pytest.fixture()
def toy() -> Iterator[ToyRows]:
    with registered(ToyRows()) as family:
        yield family


def _scale_file(path: Path, scale: float) -> Path:
    path.write_text(json.dumps({"scale": scale}))
    return path


def _config(data: TrainingData, out: Path, scale: Path, **kw: Any):
    return train_config(data, out, model="toy_linear", limit_samples=LIMIT, epochs=3, shuffle=True,
                        family_inputs={"scale": scale}, **kw)


# -- the registry ------------------------------------------------------------------------------


def test_registry_holds_the_window_family_and_dispatches_by_variant() -> None:
    window = get_family("window_models")
    assert window.batch_kind == "windows"
    assert {s.name for s in window.variants} == {"mlp_two_head", "seq_ctx_fusion", "transformer_tbm"}
    for spec in window.variants:
        assert registry.VARIANTS[spec.name] is spec and (spec.family, spec.batch_kind) == ("window_models", "windows")
        assert family_of(spec.name) is window
    # training.models keeps its names (a re-export of the registry)
    from sentinel_pipeline.training import models

    assert models.VARIANTS is registry.VARIANTS and models.build_model is registry.build_model
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        get_family("nope")


def test_registering_a_family_is_temporary_and_checked(toy: ToyRows) -> None:
    assert registry.VARIANTS["toy_linear"].family == "toy_rows"
    with pytest.raises(ValueError, match="already registered"):
        registry.register_family(ToyRows())

    class Mismatched(ToyRows):
        name = "toy_other"

    with pytest.raises(ValueError, match="names family 'toy_rows'"):
        registry.register_family(Mismatched())  # its variants still say toy_rows
    assert "toy_other" not in registry.FAMILIES


def test_unregistered_after_the_block() -> None:
    with registered(ToyRows()):
        assert "toy_linear" in registry.VARIANTS
    assert "toy_linear" not in registry.VARIANTS and "toy_rows" not in registry.FAMILIES


# -- the loop knows no family -------------------------------------------------------------------


def test_engine_source_names_no_family() -> None:
    """The training loop reads the family through its hooks only: no variant name, no batcher class, no
    window-family target or loss detail in engine.py."""
    source = inspect.getsource(engine)
    forbidden = [s.name for s in get_family("window_models").variants] + [
        "WindowBatcher", "tb_class", "class_counts", "class_weights", "N_CLASSES", "compute_losses",
        "evaluate_predictions", "macro_f1", "window_models", "\"windows\"", "training.losses",
        "training.evaluation", "training.models", "training.batchers"]
    found = [word for word in forbidden if re.search(re.escape(word), source)]
    assert found == []


def test_a_new_family_trains_resumes_bundles_and_verifies_without_engine_change(
    toy: ToyRows, data: TrainingData, tmp_path: Path
) -> None:
    scale = _scale_file(tmp_path / "scale.json", 0.5)
    full = train(_config(data, tmp_path / "full", scale, models_dir=tmp_path / "models"), progress=False)
    m = full.metrics
    # the family's hooks made the run: its monitor, telemetry, epoch metric and evaluation
    assert m["variant"] == "toy_linear" and m["monitor"] == "val_mae" and m["monitor_mode"] == "min"
    assert [h["epoch"] for h in full.history] == [1, 2, 3]
    for h in full.history:
        assert 0 < h["toy_positive_share"] < 1 and h["val_mae"] > 0 and h["monitor_value"] == h["val_mae"]
    assert m["final_val"]["n_samples"] == m["dataset"]["val"]["samples_used"] == min(LIMIT, m["dataset"]["val"]["samples"])
    assert m["head_vs_baseline"]["ret"]["beats_baseline"] is True  # the planted signal is in snap_f0
    assert m["baselines"]["target_means"][TARGET] == pytest.approx(
        float(np.nanmean(np.asarray(toy_split(data, "train").target(TARGET))[
            chronological_end_rows(toy_split(data, "train"), LIMIT)])))
    log = (tmp_path / "full" / "train_log.txt").read_text()
    assert "toy-mae" in log and "val_mae" in log
    # the family's preferred optimizer and scheduler, with the seed's cosine restarts
    cfg = json.loads((tmp_path / "full" / "train_config.json").read_text())
    assert cfg["optim"] == {"optimizer": "adabelief", "optimizer_params": {}, "scheduler": "cosine_restarts",
                            "scheduler_params": SEED_COSINE}
    assert (cfg["model_family"], cfg["batch_kind"]) == ("toy_rows", "rows")
    assert [h["lr"] for h in full.history][:2] == [1e-3, pytest.approx(5e-5 + (1e-3 - 5e-5) * 0.75)]

    # kill after epoch 1 and resume: the same weights and history as the uninterrupted run
    out = tmp_path / "resumed"

    def stop(record: dict[str, Any]) -> None:
        if record["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(_config(data, out, scale), progress=False, on_epoch_end=stop)
    resumed = train(_config(data, out, scale), progress=False)
    assert resumed.resumed_from_epoch == 1
    for a, b in zip(load_best(out / "model_best.pt")["model_state_dict"].values(),
                    load_best(full.best_checkpoint)["model_state_dict"].values(), strict=True):
        assert torch.equal(a, b)
    assert resumed.metrics["final_val"] == full.metrics["final_val"]

    # the family input's content is part of the run's identity: another scale file refuses the resume.pt
    other = _scale_file(tmp_path / "scale2.json", 0.25)
    with pytest.raises(TrainingError, match="different configuration"):
        train(_config(data, out, other), progress=False)

    # the bundle carries the family's file under its manifest; loading reads it back through the family
    bundle = full.bundle_dir
    assert bundle is not None and (bundle / "toy_scale.json").read_bytes() == scale.read_bytes()
    assert check_manifest(bundle) == []
    meta = json.loads((bundle / "bundle_metadata.json").read_text())
    assert (meta["bundle_format_version"], meta["model_family"], meta["batch_kind"]) == (3, "toy_rows", "rows")
    assert meta["family_inputs"] == {"scale": hashlib.sha256(scale.read_bytes()).hexdigest()}
    # exported through the family's ONNX hooks, with its own input name
    assert meta["onnx"]["status"] == "exported" and [i["name"] for i in meta["onnx"]["inputs"]] == ["x"]
    assert (bundle / "model.onnx").is_file()
    loaded = load_bundle(bundle, expected_hash=data.hash)
    assert (loaded.family, loaded.batch_kind, loaded.format_version) == ("toy_rows", "rows", 3)
    assert loaded.family_data is not None and loaded.family_data.values == {"scale": 0.5}

    # verification batches and scores through the family: every check up to the gates passes
    report = verify_bundle(bundle, data.hash, val_h5=data.val_h5, gate_h5=data.test_h5,
                           gates=QualityGates(min_directional_t=None))
    assert report.passed, report.render()
    assert "family toy_rows" in report.check("metadata_agrees").detail
    assert "reproduces metrics.json" in report.check("metrics_reproduced").detail
    assert report.onnx_parity["passed"] and report.onnx_parity["n_samples"] > 0

    # scoring a split for the gates and the backtest uses the family's batcher, scale and signal
    test = toy_split(data, "test")
    table = score_split(loaded.model, loaded.arch, test, data=loaded.family_data)
    ends = chronological_end_rows(test)
    assert table["row"].tolist() == ends.tolist()
    x = torch.from_numpy(np.asarray(test.snap[ends], dtype=np.float32) * np.float32(0.5))
    with torch.no_grad():
        expected = loaded.model({"x": x})["ret"].double().numpy()
    np.testing.assert_allclose(table["signal"].to_numpy(), expected, rtol=1e-6)
    assert np.array_equal(table[head_column("ret")].to_numpy(), table["signal"].to_numpy())


def test_a_family_without_its_required_input_is_refused(toy: ToyRows, data: TrainingData, tmp_path: Path) -> None:
    from sentinel_pipeline.training.config import ConfigError

    with pytest.raises(ConfigError, match=r"needs family_inputs \['scale'\]"):
        train(train_config(data, tmp_path / "a", model="toy_linear", limit_samples=LIMIT), progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        train(_config(data, tmp_path / "b", tmp_path / "missing.json"), progress=False)


def toy_split(data: TrainingData, name: str) -> SplitArrays:
    from sentinel_pipeline.training.data_loader import load_split_for_training

    path = {"train": data.train_h5, "val": data.val_h5, "test": data.test_h5}[name]
    split, _ = load_split_for_training(path, data.hash)
    assert TARGET in TARGET_NAMES
    return split


class ToyWithoutOnnx(ToyRows):
    """The toy family without its ONNX hooks: the default inputs ("snap") are not what its model reads."""

    def onnx_inputs(self, spec, arch):
        return ModelFamily.onnx_inputs(self, spec, arch)

    def onnx_example(self, spec, arch, dims, n=2):
        return ModelFamily.onnx_example(self, spec, arch, dims, n)


def test_a_family_that_cannot_export_is_marked_and_fails_only_the_onnx_check(
    data: TrainingData, tmp_path: Path
) -> None:
    """Never silently skipped: the export's failure and reason are in the signed metadata, there is no
    model.onnx, verification fails onnx_parity with the reason (and nothing else), runtime onnx is
    refused naming it, and the torch runtime still loads."""
    with registered(ToyWithoutOnnx()):
        scale = _scale_file(tmp_path / "scale.json", 0.5)
        result = train(_config(data, tmp_path / "run", scale, models_dir=tmp_path / "models"), progress=False)
        bundle = result.bundle_dir
        assert bundle is not None
        meta = json.loads((bundle / "bundle_metadata.json").read_text())
        assert meta["onnx"]["status"] == "failed" and "'x'" in meta["onnx"]["reason"]
        assert not (bundle / "model.onnx").exists() and check_manifest(bundle) == []
        report = verify_bundle(bundle, data.hash, val_h5=data.val_h5, gate_h5=data.test_h5,
                               gates=QualityGates(min_directional_t=None))
        assert report.failed_checks == ["onnx_parity"]
        assert "ONNX export failed" in report.check("onnx_parity").detail
        assert "'x'" in report.check("onnx_parity").detail
        with pytest.raises(BundleError, match="ONNX export of this bundle failed"):
            load_bundle(bundle, expected_hash=data.hash, runtime="onnx")
        assert load_bundle(bundle, expected_hash=data.hash).runtime == "torch"
