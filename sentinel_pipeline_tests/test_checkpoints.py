"""Checkpoint files: exact keys of model_best.pt, weights_only loading, RNG capture, atomic writes."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sentinel_pipeline.training import checkpoints
from sentinel_pipeline.training.checkpoints import BEST_KEYS, CheckpointError
from sentinel_pipeline.training.models import build_model, resolve_arch

DIMS = {"seq": 5, "snap": 3, "ctx_cat": 2, "ctx_cont": 2}


def _model(variant: str = "seq_ctx_fusion") -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    arch = resolve_arch(variant, DIMS, [3, 5], 8, {"hidden_dim": 16})
    return build_model(arch), arch


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "seq": torch.randn(n, 8, 5, generator=g),
        "snap": torch.randn(n, 3, generator=g),
        "ctx_cat": torch.zeros(n, 2, dtype=torch.int64),
        "ctx_cont": torch.randn(n, 2, generator=g),
    }


def test_best_checkpoint_has_exactly_the_keys_and_loads_weights_only(tmp_path: Path) -> None:
    model, arch = _model()
    path = checkpoints.save_best(tmp_path / "model_best.pt", model.state_dict(), arch, epoch=3, val_loss=0.25)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == list(BEST_KEYS)
    assert raw["epoch"] == 3 and raw["val_loss"] == 0.25 and raw["arch"] == arch
    assert raw["input_dim"] == DIMS["seq"] and raw["hidden_dim"] == 16
    loaded = checkpoints.load_best(path)
    rebuilt = build_model(loaded["arch"])
    rebuilt.load_state_dict(loaded["model_state_dict"])
    model.eval(), rebuilt.eval()
    batch = _batch()
    for name, out in model(batch).items():
        assert torch.equal(out, rebuilt(batch)[name])


def test_extra_or_missing_keys_are_refused(tmp_path: Path) -> None:
    model, arch = _model("mlp_two_head")
    obj = {"model_state_dict": model.state_dict(), "input_dim": 3, "hidden_dim": 16, "epoch": 1,
           "val_loss": 1.0, "arch": arch, "optimizer": {}}
    torch.save(obj, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="keys"):
        checkpoints.load_best(tmp_path / "extra.pt")
    del obj["optimizer"], obj["epoch"]
    torch.save(obj, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="keys"):
        checkpoints.load_best(tmp_path / "missing.pt")


def test_pickled_objects_are_refused_by_weights_only(tmp_path: Path) -> None:
    torch.save({"model_state_dict": {}, "arch": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        checkpoints.load_best(tmp_path / "evil.pt")


def test_rng_state_round_trips_through_resume_file(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.randn(3)  # move the states away from the seeds
    model, _ = _model()
    opt = torch.optim.AdamW(model.parameters())
    model(_batch())["direction"].sum().backward()
    opt.step()
    checkpoints.save_resume(tmp_path / "resume.pt", {"rng": checkpoints.capture_rng_state(),
                                                     "optimizer": opt.state_dict(), "epoch": 4})
    expected = (random.random(), np.random.normal(), torch.randn(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state = checkpoints.load_resume(tmp_path / "resume.pt")
    assert state["epoch"] == 4
    checkpoints.restore_rng_state(state["rng"])
    got = (random.random(), np.random.normal(), torch.randn(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    opt2 = torch.optim.AdamW(_model()[0].parameters())
    opt2.load_state_dict(state["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_resume_of_another_format_is_refused(tmp_path: Path) -> None:
    torch.save({"epoch": 1}, tmp_path / "resume.pt")
    with pytest.raises(CheckpointError, match="format"):
        checkpoints.load_resume(tmp_path / "resume.pt")


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, arch = _model("mlp_two_head")
    path = checkpoints.save_best(tmp_path / "model_best.pt", model.state_dict(), arch, 1, 1.0)
    before = path.read_bytes()
    real_save = torch.save

    def crash(obj: object, f: Path) -> None:
        real_save({"partial": torch.zeros(10)}, f)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_best(path, model.state_dict(), arch, 2, 0.5)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best.pt"]
