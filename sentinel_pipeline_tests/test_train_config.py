"""TrainConfig: validation, config files (YAML/JSON), CLI precedence and the profiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sentinel_pipeline import train as cli
from sentinel_pipeline.training import optim
from sentinel_pipeline.training.config import ConfigError, TrainConfig, load_config, merge_cli
from sentinel_pipeline.training.engine import THROUGHPUT_BATCH_SIZE, resolve_settings
from sentinel_pipeline.training.families import get_family
from sentinel_pipeline.training.models import VARIANTS

PATHS = {"train_h5": "a/train.h5", "val_h5": "a/val.h5", "feature_schema": "f/schema.txt", "out_dir": "runs/x"}


def test_defaults_follow_the_issue() -> None:
    c = TrainConfig(**PATHS)
    assert (c.model, c.seq_len, c.epochs, c.seed, c.learning_rate, c.weight_decay) == (
        "mlp_two_head", 30, 20, 1337, 1e-3, 1e-4)
    assert (c.patience, c.profile, c.device, c.grad_clip) == (5, "safe", "auto", 1.0)
    # optimizer and scheduler left to the model family: AdamW without a scheduler for the window family
    assert (c.optimizer, c.scheduler) == (None, None)
    family = get_family(VARIANTS[c.model].family)
    setup = optim.resolve(c.optimizer, c.optimizer_params, c.scheduler, c.scheduler_params, family.optimizer_defaults)
    assert (setup.optimizer, setup.optimizer_params, setup.scheduler, setup.scheduler_params) == (
        "adamw", {}, "none", {})
    assert isinstance(c.train_h5, Path) and c.models_dir is None


def test_to_dict_round_trips_through_json() -> None:
    c = TrainConfig(**PATHS, arch={"hidden_dim": 32}, models_dir="m", batch_size=8)
    d = json.loads(json.dumps(c.to_dict()))
    assert TrainConfig(**d) == c


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 0), ("batch_size", -1), ("scheduler", "step"), ("profile", "fast"), ("device", "tpu"),
     ("learning_rate", 0.0), ("monitor", "val_acc"), ("num_workers", -1), ("seed", -3), ("patience", True)],
)
def test_invalid_values_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**PATHS, **{field: value})


def test_load_yaml_and_json_and_reject_unknown_keys(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  epochs: 7\n  learning_rate: 0.01\n  arch:\n    hidden_dim: 32\n")
    assert load_config(y) == {"epochs": 7, "learning_rate": 0.01, "arch": {"hidden_dim": 32}}
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"epochs": 4, "model": "transformer_tbm"}))
    assert load_config(j) == {"epochs": 4, "model": "transformer_tbm"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*epochz"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_cli_flags_override_the_file_which_overrides_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nlearning_rate: 0.01\nmodel: seq_ctx_fusion\n" +
                 "".join(f"{k}: {v}\n" for k, v in PATHS.items()))
    args = cli.build_parser().parse_args(["--config", str(f), "--epochs", "3", "--out-dir", "other"])
    config = merge_cli(load_config(args.config), cli._overrides(args))
    assert config.epochs == 3  # CLI wins
    assert config.learning_rate == 0.01 and config.model == "seq_ctx_fusion"  # file wins over defaults
    assert config.out_dir == Path("other")
    assert config.seq_len == 30  # default where neither says anything


def test_flags_not_given_do_not_override() -> None:
    args = cli.build_parser().parse_args([])
    assert cli._overrides(args) == {}
    base = TrainConfig(**PATHS, epochs=9)
    assert merge_cli(base, {"epochs": None, "seed": 5}).epochs == 9


def test_missing_required_paths_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train_h5"):
        merge_cli({"val_h5": "v", "feature_schema": "s", "out_dir": "o"}, {})


def test_profiles_resolve_on_cpu() -> None:
    cpu = torch.device("cpu")
    safe = resolve_settings(TrainConfig(**PATHS), VARIANTS["mlp_two_head"], cpu)
    assert (safe.batch_size, safe.num_workers, safe.pin_memory, safe.bf16_autocast, safe.shuffle) == (
        VARIANTS["mlp_two_head"].default_batch_size, 0, False, False, False)
    assert safe.batch_size == 16 and safe.monitor == "val_loss" and safe.monitor_mode == "min"
    fast = resolve_settings(TrainConfig(**PATHS, profile="throughput"), VARIANTS["transformer_tbm"], cpu)
    assert fast.batch_size == THROUGHPUT_BATCH_SIZE and 2 <= fast.num_workers <= 4 and fast.shuffle
    assert not fast.bf16_autocast and not fast.pin_memory  # CUDA only
    assert fast.monitor == "val_macro_f1" and fast.monitor_mode == "max"
    explicit = resolve_settings(
        TrainConfig(**PATHS, profile="throughput", batch_size=64, num_workers=0, bf16_autocast=True),
        VARIANTS["mlp_two_head"], cpu,
    )
    assert (explicit.batch_size, explicit.num_workers, explicit.bf16_autocast) == (64, 0, False)


def test_f1_monitor_needs_a_classifier() -> None:
    with pytest.raises(ConfigError, match="classification head"):
        resolve_settings(TrainConfig(**PATHS, monitor="val_macro_f1"), VARIANTS["mlp_two_head"], torch.device("cpu"))
