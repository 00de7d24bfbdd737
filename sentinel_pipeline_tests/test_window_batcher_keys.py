"""The window batcher's key selection: batches bit-identical to the previous gather for every key and
subset, and each window variant's declared batch keys are exactly what its model, losses and metrics read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from sentinel_pipeline.data.split_arrays import TARGET_NAMES, SplitArrays
from sentinel_pipeline.training.checkpoints import load_best
from sentinel_pipeline.training.data_loader import BATCH_KEYS, WindowBatcher
from sentinel_pipeline.training.engine import train
from sentinel_pipeline.training.families.window_models import FAMILY
from sentinel_pipeline_tests.test_data_loader import random_split
from sentinel_pipeline_tests.training_fixtures import TrainingData, make_training_data, train_config


def reference_batch(split: SplitArrays, ends: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """The batch as the previous implementation built it: every key, the windows by one ``np.take`` of
    the ``(B, L)`` row-index matrix."""
    b = ends.shape[0]
    rows = (ends[:, None] + np.arange(-seq_len + 1, 1, dtype=np.int64)).reshape(-1)
    seq = np.take(split.seq, rows, axis=0).reshape(b, seq_len, split.seq.shape[1])
    cols = [list(split.target_names).index(t) for t in TARGET_NAMES]
    targets = np.take(split.targets, ends, axis=0)[:, cols]
    return {
        "seq": seq.astype(np.float32),
        "snap": np.take(split.snap, ends, axis=0).astype(np.float32),
        "ctx_cat": np.take(split.ctx_cat, ends, axis=0).astype(np.int64),
        "ctx_cont": np.take(split.ctx_cont, ends, axis=0).astype(np.float32),
        "targets": targets.astype(np.float32),
        "tb_class": np.take(split.tb_label, ends).astype(np.int64) + 1,
        "end_rows": ends.copy(),
        "timestamp": np.take(split.timestamp, ends).astype(np.int64),
        "symbol_idx": np.take(split.symbol_idx, ends).astype(np.int64),
    }


def _assert_batch_equals_reference(batch: dict[str, torch.Tensor], ref: dict[str, np.ndarray], keys) -> None:
    assert list(batch) == [k for k in BATCH_KEYS if k in keys]
    for k, t in batch.items():
        a = t.numpy()
        assert a.dtype == ref[k].dtype and a.shape == ref[k].shape, k
        assert a.flags.c_contiguous, k
        assert a.tobytes() == ref[k].tobytes(), k  # bit-identical (NaN payloads included)


def _variants_split() -> SplitArrays:
    split = random_split(seed=3)
    targets = split.targets.copy()
    targets[::7, 2] = np.nan  # NaN targets travel bit for bit
    return dataclasses.replace(split, targets=targets)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("keys", [None, ("seq",), ("snap", "targets", "tb_class"), ("tb_class", "seq"),
                                  ("end_rows", "timestamp", "symbol_idx", "ctx_cat", "ctx_cont")])
def test_batches_are_bit_identical_to_the_previous_gather(shuffle, keys):
    split = _variants_split()
    batcher = WindowBatcher(split, seq_len=6, batch_size=13, shuffle=shuffle, seed=4, keys=keys)
    for epoch in (0, 1):
        batcher.set_epoch(epoch)
        for i in range(len(batcher)):
            ends = batcher.batch_end_rows(i)
            _assert_batch_equals_reference(batcher.batch(i), reference_batch(split, ends, 6), keys or BATCH_KEYS)


def test_identical_on_read_only_reordered_zero_width_and_float64_inputs(tmp_path: Path):
    """A read-only memory map of ``seq`` (the Arrow cache), targets stored in another column order, no
    context columns, and a float64 ``seq`` (cast per batch) all give the previous implementation's bytes."""
    base = random_split(seed=5, n_cat=0, n_cont=0)
    path = tmp_path / "seq.f32"
    base.seq.tofile(path)
    seq = np.memmap(path, dtype=np.float32, mode="r", shape=base.seq.shape)
    perm = np.random.default_rng(2).permutation(len(TARGET_NAMES))
    cases = [
        dataclasses.replace(base, seq=seq),
        dataclasses.replace(base, targets=base.targets[:, perm], target_names=[TARGET_NAMES[j] for j in perm]),
        dataclasses.replace(base, seq=base.seq.astype(np.float64)),
        dataclasses.replace(base, seq=base.seq[:, :0]),
    ]
    for split in cases:
        batcher = WindowBatcher(split, seq_len=5, batch_size=16, shuffle=True, seed=9)
        for i in range(len(batcher)):
            _assert_batch_equals_reference(batcher.batch(i), reference_batch(split, batcher.batch_end_rows(i), 5),
                                           BATCH_KEYS)
    assert not seq.flags.writeable


def test_key_selection_keeps_the_sample_order_and_refuses_unknown_keys():
    split = random_split(seed=6)
    full = WindowBatcher(split, seq_len=6, batch_size=10, shuffle=True, seed=2)
    some = WindowBatcher(split, seq_len=6, batch_size=10, shuffle=True, seed=2, keys=("tb_class",))
    for epoch in (0, 3):
        full.set_epoch(epoch)
        some.set_epoch(epoch)
        expected = full.end_rows[np.random.default_rng([2, epoch]).permutation(full.n_samples)]
        got = np.concatenate([some.batch_end_rows(i) for i in range(len(some))])
        np.testing.assert_array_equal(got, expected)
        for i in range(len(some)):
            assert torch.equal(some.batch(i)["tb_class"], full.batch(i)["tb_class"])
    with pytest.raises(ValueError, match="unknown batch keys"):
        WindowBatcher(split, seq_len=6, batch_size=10, keys=("seq", "window"))
    end_rows = WindowBatcher(split, seq_len=6, batch_size=10, keys=("end_rows",))
    first = end_rows.batch(0)["end_rows"]
    first += 1_000_000  # a batch tensor never aliases the batcher's own end rows
    np.testing.assert_array_equal(end_rows.batch(0)["end_rows"].numpy(), end_rows.end_rows[:10])


class _Reads(dict):
    """A batch that records which keys are read."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("variant", [s.name for s in FAMILY.variants])
def test_declared_batch_keys_are_exactly_what_the_variant_reads(variant):
    """One train step (forward, losses, backward, telemetry, sample count) on a batch holding only the
    declared train keys, then validation metrics on the declared evaluation keys: nothing missing
    (a KeyError) and nothing gathered that goes unread."""
    split = _variants_split()
    spec = FAMILY.variant(variant)
    dims = {"seq": 5, "snap": 3, "ctx_cat": 2, "ctx_cont": 2}
    arch = FAMILY.resolve_arch(spec, dims, [4, 4], 6)
    torch.manual_seed(0)
    model = FAMILY.build_model(arch)
    baselines = FAMILY.train_baselines(spec, split, None)
    state = FAMILY.loss_state(spec, baselines, torch.device("cpu"))

    keys = FAMILY.batch_keys(spec)
    batch = _Reads(WindowBatcher(split, seq_len=6, batch_size=32, shuffle=True, keys=keys).batch(0))
    assert set(batch) == set(keys)
    telemetry = FAMILY.batch_telemetry(spec)
    telemetry.add(batch)
    outputs = model(batch)
    total, _ = FAMILY.losses(spec, outputs, batch, state)
    total.backward()
    assert FAMILY.samples_in(batch) == 32
    assert batch.read == set(keys)

    eval_keys = FAMILY.batch_keys(spec, evaluation=True)
    assert set(FAMILY.eval_keys) <= set(eval_keys)
    val = _Reads(WindowBatcher(split, seq_len=6, batch_size=1000, keys=eval_keys).batch(0))
    model.eval()
    with torch.no_grad():
        outputs = model(val)
        FAMILY.losses(spec, outputs, val, state)
    FAMILY.samples_in(val)
    kept = _Reads({k: val[k].numpy() for k in FAMILY.eval_keys})
    outs = {h.name: outputs[h.name].numpy() for h in spec.heads}
    FAMILY.epoch_metrics(spec, outs, kept)
    assert FAMILY.evaluate(spec, outs, kept, baselines)["n_samples"] == val["tb_class"].shape[0]
    assert val.read | kept.read == set(eval_keys)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    return make_training_data(tmp_path_factory.mktemp("data"), signal=1.5, arrow=True)


@pytest.mark.parametrize("variant", [s.name for s in FAMILY.variants])
def test_training_on_the_declared_keys_equals_training_on_every_key(variant, data, tmp_path, monkeypatch):
    """The engine hands each batcher the variant's keys; the weights, the history and the final
    validation metrics are those of a run whose batches hold every key."""
    seen: list[tuple[str, ...] | None] = []
    make = type(FAMILY).make_batcher

    def spy(self, *args, keys=None, **kwargs):
        seen.append(keys)
        return make(self, *args, keys=keys, **kwargs)

    monkeypatch.setattr(type(FAMILY), "make_batcher", spy)
    kw = {"model": variant, "limit_samples": 200, "shuffle": True, "batch_size": 32, "epochs": 2}
    reduced = train(train_config(data, tmp_path / "reduced", **kw), progress=False)
    spec = FAMILY.variant(variant)
    assert seen == [FAMILY.batch_keys(spec), FAMILY.batch_keys(spec, evaluation=True)]
    monkeypatch.setattr(type(FAMILY), "batch_keys", lambda self, spec, evaluation=False: None)
    full = train(train_config(data, tmp_path / "full", **kw), progress=False)
    assert seen[2:] == [None, None]
    a = load_best(reduced.best_checkpoint)["model_state_dict"]
    b = load_best(full.best_checkpoint)["model_state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("train_seconds", "val_seconds", "epoch_seconds", "throughput_samples_per_s", "loader_share")
    assert [{k: v for k, v in h.items() if k not in drop} for h in reduced.history] == \
        [{k: v for k, v in h.items() if k not in drop} for h in full.history]
    assert reduced.metrics["final_val"] == full.metrics["final_val"]
