"""Typed optimizer and scheduler configuration (training.optim): checking, family preferences, building."""

from __future__ import annotations

import pytest
import torch
from pytorch_optimizer import AdaBelief

from sentinel_pipeline.training import optim
from sentinel_pipeline.training.config import ConfigError, TrainConfig
from sentinel_pipeline.training.families import get_family

PATHS = {"train_h5": "a/train.h5", "val_h5": "a/val.h5", "feature_schema": "f/schema.txt", "out_dir": "runs/x"}
SEED_FAMILY = {"optimizer": "adabelief", "scheduler": "cosine_restarts",
               "scheduler_params": {"cosine_restarts": {"T_0": 3, "T_mult": 2, "eta_min": 5e-5}}}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"optimizer": "sgd"}, r"optimizer must be one of \['adamw', 'adabelief'\]"),
        ({"scheduler": "step"}, "scheduler must be one of"),
        ({"optimizer": "adamw", "optimizer_params": {"epsilon": 1e-8}}, r"\['epsilon'\] are not parameters of 'adamw'"),
        ({"optimizer": "adabelief", "optimizer_params": {"betas": [0.9]}}, "betas must be a list of 2 numbers"),
        ({"optimizer": "adabelief", "optimizer_params": {"rectify": 1}}, "rectify must be true or false"),
        ({"scheduler": "cosine_restarts", "scheduler_params": {"T_0": 2.5}}, "T_0 must be an integer"),
        ({"scheduler": "plateau", "scheduler_params": {"factor": -1}}, "factor must be >= 0"),
        ({"scheduler": "plateau", "scheduler_params": {"T_0": 3}}, r"allowed: \['cooldown', 'factor'"),
        ({"optimizer_params": [1, 2]}, "optimizer_params must be a mapping"),
    ],
)
def test_bad_optimizer_or_scheduler_config_is_refused_by_name(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**PATHS, **fields)


def test_values_are_coerced_to_their_declared_types() -> None:
    typed = optim.typed_params("optimizer", "adabelief", {"betas": [0.8, 0.99], "eps": 1})
    assert typed == optim.AdaBeliefParams(betas=(0.8, 0.99), eps=1.0)
    assert optim.typed_params("scheduler", "cosine_restarts", {"eta_min": 0}).eta_min == 0.0


def test_the_window_family_keeps_adamw_without_a_scheduler_and_the_old_defaults() -> None:
    window = get_family("window_models").optimizer_defaults
    setup = optim.resolve(None, {}, None, {}, window)
    assert (setup.optimizer, setup.scheduler, setup.optimizer_params, setup.scheduler_params) == ("adamw", "none", {}, {})
    # asked for explicitly, the schedulers keep the defaults the engine always used
    assert optim.resolve(None, {}, "cosine_restarts", {}, window).scheduler_params == {"T_0": 5, "T_mult": 1,
                                                                                         "eta_min": 0.0}
    assert optim.resolve(None, {}, "plateau", {"patience": 0}, window).scheduler_params == {"factor": 0.5,
                                                                                              "patience": 0}


def test_a_family_preference_applies_only_where_the_config_is_silent() -> None:
    setup = optim.resolve(None, {}, None, {}, SEED_FAMILY)
    assert (setup.optimizer, setup.scheduler) == ("adabelief", "cosine_restarts")
    assert setup.scheduler_params == {"T_0": 3, "T_mult": 2, "eta_min": 5e-5}  # the seed's, for this family only
    assert optim.resolve(None, {}, None, {"T_0": 7}, SEED_FAMILY).scheduler_params["T_0"] == 7
    assert optim.resolve("adamw", {}, "plateau", {}, SEED_FAMILY).to_dict() == {
        "optimizer": "adamw", "optimizer_params": {}, "scheduler": "plateau",
        "scheduler_params": {"factor": 0.5, "patience": 2}}


def test_built_optimizers_and_schedulers_are_the_libraries_with_the_given_values() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    setup = optim.resolve(None, {"eps": 1e-12}, None, {}, SEED_FAMILY)
    opt = optim.build_optimizer(setup, params, lr=0.01, weight_decay=0.1)
    assert isinstance(opt, AdaBelief)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["eps"], group["weight_decouple"]) == (0.01, 0.1, 1e-12, True)
    sched = optim.build_scheduler(setup, opt, "min")
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts)
    assert (sched.T_0, sched.T_mult, sched.eta_min) == (3, 2, 5e-5)
    adamw = optim.build_optimizer(optim.resolve("adamw", {"betas": [0.8, 0.9]}, "none", {}, {}), params, 0.1, 0.0)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.9)
    plateau = optim.build_scheduler(optim.resolve("adamw", {}, "plateau", {}, {}), adamw, "max")
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau) and plateau.mode == "max"
    assert optim.build_scheduler(optim.resolve("adamw", {}, "none", {}, {}), adamw, "min") is None
