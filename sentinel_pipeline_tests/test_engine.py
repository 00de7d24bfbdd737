"""The training engine on tiny data: determinism, bit-for-bit resume, divergence, early stopping, telemetry."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from sentinel_pipeline.data.feature_contract import ContractError
from sentinel_pipeline.training.checkpoints import BEST_KEYS, load_best, load_resume
from sentinel_pipeline.training.engine import TrainingDivergedError, TrainingError, completed_run, train
from sentinel_pipeline.training.families import get_family
from sentinel_pipeline_tests.training_fixtures import TrainingData, make_training_data, train_config

LIMIT = 240


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    return make_training_data(tmp_path_factory.mktemp("data"), signal=1.5, arrow=True)


def _stop_after(k: int):
    def hook(record: dict) -> None:
        if record["epoch"] == k:
            raise Interrupt(f"stop after epoch {k}")

    return hook


def _losses(history: list[dict]) -> list[tuple]:
    return [(h["epoch"], h["train_loss"], h["val_loss"], h["grad_norm_mean"], h["lr"]) for h in history]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_gives_identical_weights(data: TrainingData, tmp_path: Path) -> None:
    kw = {"model": "seq_ctx_fusion", "limit_samples": LIMIT, "shuffle": True, "batch_size": 32}
    r1 = train(train_config(data, tmp_path / "a", **kw), progress=False)
    r2 = train(train_config(data, tmp_path / "b", **kw), progress=False)
    _assert_same_weights(load_best(r1.best_checkpoint)["model_state_dict"],
                         load_best(r2.best_checkpoint)["model_state_dict"])
    assert _losses(r1.history) == _losses(r2.history)
    r3 = train(train_config(data, tmp_path / "c", **{**kw, "seed": 7}), progress=False)
    assert _losses(r3.history) != _losses(r1.history)  # the seed matters


def test_interrupted_run_resumes_bit_for_bit(data: TrainingData, tmp_path: Path) -> None:
    # dropout, shuffling and a plateau scheduler: every piece of state has to come back
    kw = {"model": "seq_ctx_fusion", "limit_samples": LIMIT, "shuffle": True, "batch_size": 32, "epochs": 3,
          "scheduler": "plateau", "scheduler_params": {"patience": 0, "factor": 0.5}}
    full = train(train_config(data, tmp_path / "full", **kw), progress=False)

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        train(train_config(data, out, **kw), progress=False, on_epoch_end=_stop_after(1))
    assert load_resume(out / "resume.pt")["epoch"] == 1 and not (out / "metrics.json").exists()
    resumed = train(train_config(data, out, **kw), progress=False)

    assert resumed.resumed_from_epoch == 1 and not resumed.already_complete
    assert _losses(resumed.history) == _losses(full.history)
    _assert_same_weights(load_resume(out / "resume.pt")["model_state_dict"],
                         load_resume(tmp_path / "full" / "resume.pt")["model_state_dict"])
    _assert_same_weights(load_best(out / "model_best.pt")["model_state_dict"],
                         load_best(full.best_checkpoint)["model_state_dict"])
    assert resumed.metrics["final_val"] == full.metrics["final_val"]
    # the untrained model's val loss is measured once, before epoch 1, and kept across the resume
    assert resumed.metrics["initial_val_loss"] == full.metrics["initial_val_loss"]
    assert resumed.metrics["initial_val_loss"] > min(h["val_loss"] for h in full.history)
    assert "resuming" in (out / "train_log.txt").read_text()


SCHEDULER_CASES = {
    "none": {},
    "plateau": {"patience": 0, "factor": 0.5, "threshold": 0.5},  # needs a 50 % gain: the LR drops
    "cosine_restarts": {"T_0": 2, "T_mult": 2, "eta_min": 5e-5},
}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULER_CASES))
@pytest.mark.parametrize("optimizer", ["adamw", "adabelief"])
def test_every_optimizer_and_scheduler_resumes_bit_for_bit(
    data: TrainingData, tmp_path: Path, optimizer: str, scheduler: str
) -> None:
    """Killed after epoch 1 and resumed, a run ends with the weights, optimizer state, learning rates
    and metrics of the uninterrupted run, for every optimizer x scheduler pair (dropout and shuffling on)."""
    kw = {"model": "mlp_two_head", "limit_samples": LIMIT, "shuffle": True, "batch_size": 32, "epochs": 3,
          "optimizer": optimizer, "scheduler": scheduler, "scheduler_params": SCHEDULER_CASES[scheduler],
          "learning_rate": 3e-3}
    full = train(train_config(data, tmp_path / "full", **kw), progress=False)
    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        train(train_config(data, out, **kw), progress=False, on_epoch_end=_stop_after(1))
    resumed = train(train_config(data, out, **kw), progress=False)
    assert resumed.resumed_from_epoch == 1
    assert _losses(resumed.history) == _losses(full.history)
    a, b = load_resume(out / "resume.pt"), load_resume(tmp_path / "full" / "resume.pt")
    _assert_same_weights(a["model_state_dict"], b["model_state_dict"])
    _assert_same_weights(load_best(out / "model_best.pt")["model_state_dict"],
                         load_best(full.best_checkpoint)["model_state_dict"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        _assert_same_weights(sa, sb)
    assert a["scheduler"] == b["scheduler"]
    assert resumed.metrics["final_val"] == full.metrics["final_val"]
    assert resumed.metrics["best_val_loss"] == full.metrics["best_val_loss"]
    # the optimizer really is the one asked for, and a scheduler really moved the learning rate
    state = next(iter(b["optimizer"]["state"].values()))
    assert ("exp_avg_var" in state) == (optimizer == "adabelief"), sorted(state)
    lrs = [h["lr"] for h in full.history]
    assert (len(set(lrs)) > 1) == (scheduler != "none"), lrs


def test_untrained_evaluation_leaves_the_run_unchanged(
    data: TrainingData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The val pass over the untrained model runs under forked RNG states: with two loader workers (a
    DataLoader draws a seed from torch's RNG per iterator) the run is the same as when that pass
    draws nothing at all."""
    kw = {"model": "seq_ctx_fusion", "limit_samples": LIMIT, "shuffle": True, "batch_size": 32, "epochs": 2,
          "num_workers": 2}
    with_pass = train(train_config(data, tmp_path / "a", **kw), progress=False)
    real_fork = torch.random.fork_rng
    draws: list[int] = []

    def counting_fork(*args, **kwargs):  # the pass still happens; count it, and keep the fork
        draws.append(1)
        return real_fork(*args, **kwargs)

    monkeypatch.setattr(torch.random, "fork_rng", counting_fork)
    again = train(train_config(data, tmp_path / "b", **kw), progress=False)
    assert draws, "the untrained-model pass runs under torch.random.fork_rng"
    assert _losses(again.history) == _losses(with_pass.history)
    monkeypatch.setattr(torch.random, "fork_rng", lambda *a, **k: contextlib.nullcontext())
    unforked = train(train_config(data, tmp_path / "c", **kw), progress=False)
    # without the fork the pass shifts torch's RNG and the dropout masks: the guard is what keeps the
    # run identical to one without the pass
    assert _losses(unforked.history) != _losses(with_pass.history)


def test_completed_run_is_read_from_disk_only_with_its_bundle(data: TrainingData, tmp_path: Path) -> None:
    """``completed_run``: what ``train`` returns for a finished run, read from its files; None while the
    run is unfinished, has no bundle, or its bundle is gone."""
    models = tmp_path / "models"
    out = tmp_path / "run"
    assert completed_run(out, models) is None  # nothing there
    with pytest.raises(Interrupt):
        train(train_config(data, out, limit_samples=LIMIT, epochs=2, models_dir=models), progress=False,
              on_epoch_end=_stop_after(1))
    assert completed_run(out, models) is None  # interrupted: no metrics.json, no bundle
    result = train(train_config(data, out, limit_samples=LIMIT, epochs=2, models_dir=models), progress=False)
    done = completed_run(out, models)
    assert done is not None and done.already_complete
    assert done.bundle_dir == result.bundle_dir and done.best_epoch == result.best_epoch
    assert done.metrics == json.loads((out / "metrics.json").read_text())
    assert completed_run(out, tmp_path / "other_models") is None  # the bundle is not in that models dir
    shutil.rmtree(result.bundle_dir)
    assert completed_run(out, models) is None  # bundle gone: the run must be reported by train() again


def test_completed_run_is_not_retrained_unless_fresh(data: TrainingData, tmp_path: Path) -> None:
    config = train_config(data, tmp_path / "run", limit_samples=LIMIT, epochs=1)
    first = train(config, progress=False)
    stamp = first.best_checkpoint.stat().st_mtime_ns
    again = train(config, progress=False)
    assert again.already_complete and again.best_epoch == first.best_epoch
    assert again.best_checkpoint.stat().st_mtime_ns == stamp
    config.fresh = True
    fresh = train(config, progress=False)
    assert not fresh.already_complete and fresh.metrics["run_id"] != first.metrics["run_id"]


def test_resume_with_another_configuration_is_refused(data: TrainingData, tmp_path: Path) -> None:
    with pytest.raises(Interrupt):
        train(train_config(data, tmp_path, limit_samples=LIMIT), progress=False, on_epoch_end=_stop_after(1))
    with pytest.raises(TrainingError, match="different configuration"):
        train(train_config(data, tmp_path, limit_samples=LIMIT, learning_rate=0.01), progress=False)
    # the optimizer and the scheduler (with its parameters) are part of the configuration
    for changed in ({"optimizer": "adabelief"}, {"optimizer_params": {"eps": 1e-6}}, {"scheduler": "plateau"},
                    {"scheduler": "cosine_restarts", "scheduler_params": {"T_0": 3}}):
        with pytest.raises(TrainingError, match="different configuration"):
            train(train_config(data, tmp_path, limit_samples=LIMIT, **changed), progress=False)
    # the family's defaults written out are the same run: it resumes
    same = train(train_config(data, tmp_path, limit_samples=LIMIT, optimizer="adamw", scheduler="none"),
                 progress=False)
    assert same.resumed_from_epoch == 1


def test_exploding_learning_rate_stops_with_diverged_error(data: TrainingData, tmp_path: Path) -> None:
    models = tmp_path / "models"
    config = train_config(data, tmp_path / "run", limit_samples=LIMIT, learning_rate=1e30, models_dir=models)
    with pytest.raises(TrainingDivergedError, match="diverged"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "model_best.pt").exists()
    assert not models.exists() or not any(models.iterdir())
    assert "TrainingDivergedError" in (tmp_path / "run" / "train_log.txt").read_text()


def test_poisoned_batch_keeps_the_earlier_checkpoint(
    data: TrainingData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    config = train_config(data, out, limit_samples=LIMIT, epochs=3)
    family = get_family("window_models")
    real = family.losses
    calls = {"n": 0}
    steps_per_epoch = -(-LIMIT // 16)

    def poisoned(spec, outputs, batch, state):
        total, heads = real(spec, outputs, batch, state)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == steps_per_epoch + 3:  # third step of epoch 2
                total = total * float("nan")
        return total, heads

    monkeypatch.setattr(family, "losses", poisoned)  # the loop calls the family's losses
    with pytest.raises(TrainingDivergedError, match="epoch 2, step 3"):
        train(config, progress=False)
    assert load_best(out / "model_best.pt")["epoch"] == 1
    assert load_resume(out / "resume.pt")["epoch"] == 1


def test_early_stopping_triggers_when_the_monitor_stalls(data: TrainingData, tmp_path: Path) -> None:
    # a learning rate far below float32 resolution leaves the weights (and the val loss) unchanged
    r = train(train_config(data, tmp_path, limit_samples=LIMIT, epochs=10, patience=2, learning_rate=1e-12),
              progress=False)
    assert r.stopped_early and r.best_epoch == 1
    assert [h["epoch"] for h in r.history] == [1, 2, 3]
    assert [h["improved"] for h in r.history] == [True, False, False]
    assert r.metrics["stopped_early"] and r.metrics["epochs_completed"] == 3


def test_outputs_and_telemetry(data: TrainingData, tmp_path: Path) -> None:
    r = train(train_config(data, tmp_path, model="seq_ctx_fusion", limit_samples=LIMIT), progress=False)
    for name in ("model_best.pt", "resume.pt", "metrics.json", "loss_curve.png", "train_log.txt",
                 "train_config.json"):
        assert (tmp_path / name).is_file(), name
    assert set(torch.load(tmp_path / "model_best.pt", weights_only=True)) == set(BEST_KEYS)
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m == json.loads(json.dumps(r.metrics, default=str))
    assert m["data_source"] == {"train": "arrow", "val": "arrow"}
    assert m["feature_contract_hash"] == data.hash and m["variant"] == "seq_ctx_fusion"
    train_ds = m["dataset"]["train"]
    assert train_ds["samples_used"] == LIMIT
    assert train_ds["eligibility_rate"] == pytest.approx(train_ds["samples"] / train_ds["rows"])
    for key in ("first_step_loss", "last_step_loss", "mean_grad_norm", "total_seconds",
                "avg_throughput_samples_per_s"):
        assert m[key] is not None and m[key] > 0, key
    assert len(m["history"]) == 2
    epoch = m["history"][0]
    assert set(epoch["train_head_losses"]) == set(epoch["val_head_losses"]) == {"direction", "early_move", "quality"}
    assert sum(epoch["class_balance"].values()) == LIMIT
    assert epoch["train_loss"] == pytest.approx(sum(epoch["train_head_losses"].values()), rel=1e-6)
    for key in ("grad_norm_mean", "grad_norm_max", "lr", "train_seconds", "throughput_samples_per_s",
                "loader_share", "val_macro_f1"):
        assert epoch[key] is not None, key
    assert 0 <= epoch["loader_share"] <= 1 and epoch["grad_norm_max"] >= epoch["grad_norm_mean"]
    # model and trivial baseline side by side per head
    assert set(m["head_vs_baseline"]) == {"direction", "early_move", "quality"}
    assert m["head_vs_baseline"]["direction"]["baseline"] == m["final_val"]["heads"]["direction"]["baseline_macro_f1"]
    log = (tmp_path / "train_log.txt").read_text()
    assert "epoch 2/2" in log and "final validation" in log


def test_planted_signal_beats_the_mean_baseline(data: TrainingData, tmp_path: Path) -> None:
    r = train(train_config(data, tmp_path, epochs=3), progress=False)
    for head, cmp in r.metrics["head_vs_baseline"].items():
        assert cmp["beats_baseline"], (head, cmp)


def test_hdf5_source_and_contract_hash_refusal(data: TrainingData, tmp_path: Path) -> None:
    r = train(train_config(data, tmp_path / "h5", limit_samples=64, epochs=1, prefer_arrow=False), progress=False)
    assert r.metrics["data_source"] == {"train": "hdf5", "val": "hdf5"}
    with pytest.raises(ContractError, match="0123456789abcdef"):
        train(train_config(data, tmp_path / "bad", expected_hash="0123456789abcdef", prefer_arrow=False),
              progress=False)


def test_loader_workers_do_not_change_the_result(data: TrainingData, tmp_path: Path) -> None:
    kw = {"model": "seq_ctx_fusion", "limit_samples": 96, "epochs": 1, "batch_size": 32, "shuffle": True}
    r0 = train(train_config(data, tmp_path / "w0", num_workers=0, **kw), progress=False)
    r2 = train(train_config(data, tmp_path / "w2", num_workers=2, **kw), progress=False)
    assert r2.metrics["settings"]["num_workers"] == 2
    _assert_same_weights(load_best(r0.best_checkpoint)["model_state_dict"],
                         load_best(r2.best_checkpoint)["model_state_dict"])


def test_training_without_a_thread_count_uses_the_default_not_torchs(data: TrainingData, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``threads=None`` (the Pipes asset's default) pins torch to ``runtime.default_thread_count`` instead of
    leaving torch's own default (every core), which oversubscribed busy machines 15-20x."""
    from sentinel_pipeline.training import runtime

    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "default_thread_count", lambda usable=None: 1)
    try:
        torch.set_num_threads(2)  # what torch would use on a 2-core machine
        cfg = train_config(data, tmp_path / "run", model="mlp_two_head", limit_samples=LIMIT, epochs=1, threads=None)
        train(cfg, progress=False)
        assert torch.get_num_threads() == 1
        assert "torch intra-op threads: 1 (default" in (tmp_path / "run" / "train_log.txt").read_text()
    finally:
        torch.set_num_threads(before)


def test_a_resumed_run_keeps_the_thread_count_it_started_with(data: TrainingData, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The default thread count follows the CPUs free at the start; a run interrupted on 2 threads and
    resumed when only 1 CPU is free continues on 2 (results are bit-identical only at equal counts)."""
    from sentinel_pipeline.training import runtime

    before = torch.get_num_threads()
    kw = {"model": "mlp_two_head", "limit_samples": LIMIT, "epochs": 2, "threads": None}
    out = tmp_path / "run"
    try:
        monkeypatch.setattr(runtime, "default_thread_count", lambda usable=None, busy=None: 2)
        with pytest.raises(Interrupt):
            train(train_config(data, out, **kw), progress=False, on_epoch_end=_stop_after(1))
        assert load_resume(out / "resume.pt")["threads"] == 2
        monkeypatch.setattr(runtime, "default_thread_count", lambda usable=None, busy=None: 1)
        resumed = train(train_config(data, out, **kw), progress=False)
        assert resumed.resumed_from_epoch == 1
        assert torch.get_num_threads() == 2
        assert load_resume(out / "resume.pt")["threads"] == 2
        assert "torch intra-op threads: 2 (those of the run being resumed)" in (out / "train_log.txt").read_text()
        fresh = tmp_path / "fresh"  # a fresh run takes the count free now
        train(train_config(data, fresh, **{**kw, "epochs": 1}), progress=False)
        assert load_resume(fresh / "resume.pt")["threads"] == 1
    finally:
        torch.set_num_threads(before)
