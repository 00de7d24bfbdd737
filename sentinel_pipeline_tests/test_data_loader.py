"""The lazy window batch loader: exact windows, ordering, memory bound, workers, split opening."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from sentinel_pipeline.data import arrow_cache, hdf5_splits
from sentinel_pipeline.data.feature_contract import ContractError
from sentinel_pipeline.data.scalers import fit_scalers
from sentinel_pipeline.data.split_arrays import TARGET_NAMES, SplitArrays
from sentinel_pipeline.training import data_loader
from sentinel_pipeline.training.data_loader import (
    BATCH_KEYS,
    WindowBatcher,
    chronological_end_rows,
    load_split_for_training,
    make_dataloader,
    to_device,
)
from sentinel_pipeline_tests.dataset_factory import LABEL_PARAMS, make_labelled_dataset


def random_split(
    seed: int = 0,
    bars: tuple[int, ...] = (57, 40, 83, 31),
    seq_len: int = 6,
    n_seq: int = 5,
    n_snap: int = 3,
    n_cat: int = 2,
    n_cont: int = 2,
    seq: np.ndarray | None = None,
) -> SplitArrays:
    """A SplitArrays with several symbols of different lengths and a random subset of valid sample ends."""
    rng = np.random.default_rng(seed)
    n = int(sum(bars))
    symbol_idx = np.repeat(np.arange(len(bars), dtype=np.int32), bars)
    pos = np.concatenate([np.arange(b) for b in bars])
    timestamp = (pos * 300 + symbol_idx * 7).astype(np.int64) * 1_000_000_000
    ends = np.flatnonzero((pos >= seq_len - 1) & (rng.random(n) < 0.8)).astype(np.int64)
    return SplitArrays(
        split="train",
        seq=rng.normal(size=(n, n_seq)).astype(np.float32) if seq is None else seq,
        snap=rng.normal(size=(n, n_snap)).astype(np.float32),
        ctx_cat=rng.integers(0, 4, size=(n, n_cat)).astype(np.int32),
        ctx_cont=rng.normal(size=(n, n_cont)).astype(np.float32),
        targets=rng.normal(size=(n, len(TARGET_NAMES))).astype(np.float32),
        tb_label=rng.integers(-1, 2, size=n).astype(np.int8),
        symbol_idx=symbol_idx,
        timestamp=timestamp,
        sample_end_rows=ends,
        feature_contract_hash="0" * 16,
        feature_names={"seq": [f"s{i}" for i in range(n_seq)], "snap": [], "ctx_cat": [], "ctx_cont": []},
        symbols=[f"SYM{i}" for i in range(len(bars))],
        seq_len=seq_len,
    )


def collect(batches) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {k: [] for k in BATCH_KEYS}
    for b in batches:
        for k in BATCH_KEYS:
            parts[k].append(b[k].numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


@pytest.mark.parametrize("seq_len,batch_size", [(6, 16), (3, 7), (1, 1000)])
def test_windows_equal_naive_slices_for_every_sample(seq_len, batch_size):
    split = random_split(seed=seq_len)
    batcher = WindowBatcher(split, seq_len=seq_len, batch_size=batch_size)
    got = collect(batcher)
    ends = got["end_rows"]
    np.testing.assert_array_equal(np.sort(ends), split.sample_end_rows)  # every sample exactly once
    for k, end in enumerate(ends):
        np.testing.assert_array_equal(got["seq"][k], split.seq[end - seq_len + 1 : end + 1])
        # no window crosses a symbol
        assert len(set(split.symbol_idx[end - seq_len + 1 : end + 1])) == 1
    np.testing.assert_array_equal(got["snap"], split.snap[ends])
    np.testing.assert_array_equal(got["ctx_cat"], split.ctx_cat[ends])
    np.testing.assert_array_equal(got["ctx_cont"], split.ctx_cont[ends])
    np.testing.assert_array_equal(got["targets"], split.targets[ends])
    np.testing.assert_array_equal(got["tb_class"], split.tb_label[ends].astype(np.int64) + 1)
    np.testing.assert_array_equal(got["timestamp"], split.timestamp[ends])
    np.testing.assert_array_equal(got["symbol_idx"], split.symbol_idx[ends])


def test_batch_dtypes_and_shapes():
    split = random_split()
    batch = WindowBatcher(split, seq_len=4, batch_size=10).batch(0)
    assert set(batch) == set(BATCH_KEYS)
    expected = {
        "seq": ((10, 4, 5), torch.float32),
        "snap": ((10, 3), torch.float32),
        "ctx_cat": ((10, 2), torch.int64),
        "ctx_cont": ((10, 2), torch.float32),
        "targets": ((10, len(TARGET_NAMES)), torch.float32),
        "tb_class": ((10,), torch.int64),
        "end_rows": ((10,), torch.int64),
        "timestamp": ((10,), torch.int64),
        "symbol_idx": ((10,), torch.int64),
    }
    for key, (shape, dtype) in expected.items():
        assert tuple(batch[key].shape) == shape and batch[key].dtype == dtype, key
    assert set(batch["tb_class"].tolist()) <= {0, 1, 2}


def test_context_off_gives_zero_width_tensors():
    split = random_split(n_cat=0, n_cont=0)
    batch = WindowBatcher(split, seq_len=6, batch_size=8).batch(1)
    assert tuple(batch["ctx_cat"].shape) == (8, 0) and tuple(batch["ctx_cont"].shape) == (8, 0)


def test_targets_are_reordered_to_target_names_order():
    split = random_split()
    perm = np.random.default_rng(1).permutation(len(TARGET_NAMES))
    shuffled = SplitArrays(
        **{
            **split.__dict__,
            "targets": split.targets[:, perm],
            "target_names": [TARGET_NAMES[j] for j in perm],
        }
    )
    a = collect(WindowBatcher(split, seq_len=6, batch_size=32))
    b = collect(WindowBatcher(shuffled, seq_len=6, batch_size=32))
    np.testing.assert_array_equal(a["targets"], b["targets"])


def test_shuffle_is_a_deterministic_permutation_per_seed_and_epoch():
    split = random_split()
    make = lambda seed: WindowBatcher(split, seq_len=6, batch_size=13, shuffle=True, seed=seed)  # noqa: E731
    a, b = make(7), make(7)
    orders = {}
    for epoch in (0, 1, 2):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        ra, rb = collect(a), collect(b)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(ra[k], rb[k])
        # every sample exactly once
        np.testing.assert_array_equal(np.sort(ra["end_rows"]), split.sample_end_rows)
        orders[epoch] = ra["end_rows"]
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    # set_epoch back to 0 gives epoch 0's order again; another seed gives another order
    a.set_epoch(0)
    np.testing.assert_array_equal(collect(a)["end_rows"], orders[0])
    assert not np.array_equal(collect(make(8))["end_rows"], orders[0])
    # batch(i) is the i-th batch of the epoch's order
    a.set_epoch(2)
    np.testing.assert_array_equal(a.batch(3)["end_rows"].numpy(), orders[2][39:52])


def test_no_shuffle_keeps_temporal_order():
    """Without shuffling, samples come in global time order across symbols (ties by symbol), not
    symbol after symbol as the rows are stored."""
    split = random_split()
    got = collect(WindowBatcher(split, seq_len=6, batch_size=9, shuffle=False, seed=5))
    np.testing.assert_array_equal(np.sort(got["end_rows"]), split.sample_end_rows)
    assert (np.diff(got["timestamp"]) >= 0).all()
    same_ts = np.diff(got["timestamp"]) == 0
    assert (np.diff(got["symbol_idx"])[same_ts] > 0).all()
    assert len(np.unique(got["symbol_idx"][:20])) > 1  # symbols interleave from the start
    for sym in np.unique(got["symbol_idx"]):
        ts = got["timestamp"][got["symbol_idx"] == sym]
        assert (np.diff(ts) > 0).all()


def test_limit_samples_len_and_drop_last():
    split = random_split()
    m = split.n_samples
    lim = WindowBatcher(split, seq_len=6, batch_size=10, limit_samples=25)
    assert lim.n_samples == 25 and len(lim) == 3
    earliest = chronological_end_rows(split)[:25]
    assert split.timestamp[earliest].max() <= split.timestamp[np.setdiff1d(split.sample_end_rows, earliest)].min()
    np.testing.assert_array_equal(collect(lim)["end_rows"], earliest)
    shuffled = WindowBatcher(split, seq_len=6, batch_size=10, limit_samples=25, shuffle=True)
    np.testing.assert_array_equal(np.sort(collect(shuffled)["end_rows"]), np.sort(earliest))
    assert len(WindowBatcher(split, seq_len=6, batch_size=10)) == -(-m // 10)
    dropped = WindowBatcher(split, seq_len=6, batch_size=10, drop_last=True)
    assert len(dropped) == m // 10
    assert all(b["seq"].shape[0] == 10 for b in dropped)
    with pytest.raises(IndexError):
        dropped.batch(len(dropped))


def test_rejects_windows_longer_than_the_split_warmup_or_crossing_symbols():
    split = random_split(seq_len=6)
    with pytest.raises(ValueError, match="longer than the split's seq_len"):
        WindowBatcher(split, seq_len=7, batch_size=4)
    bad = random_split(seq_len=6)
    bad.sample_end_rows = np.r_[bad.sample_end_rows, 57 + 2].astype(np.int64)  # 3rd row of symbol 1
    bad.sample_end_rows.sort()
    with pytest.raises(ValueError, match="cross a symbol boundary"):
        WindowBatcher(bad, seq_len=6, batch_size=4)


def test_memory_per_batch_is_bounded_by_batch_not_split(tmp_path):
    """Over a 200k-row read-only memmap, a batch allocates O(B·L·F), never O(N·L·F)."""
    n, f, seq_len, b = 200_000, 16, 30, 256
    path = tmp_path / "seq.f32"
    np.random.default_rng(0).normal(size=(n, f)).astype(np.float32).tofile(path)
    seq = np.memmap(path, dtype=np.float32, mode="r", shape=(n, f))
    split = random_split(bars=(n // 2, n - n // 2), seq_len=seq_len, n_seq=f, seq=seq)
    per_batch = b * seq_len * f * 4
    full = split.n_samples * seq_len * f * 4
    tracemalloc.start()
    try:
        batcher = WindowBatcher(split, seq_len=seq_len, batch_size=b, shuffle=True, seed=1)
        _, setup_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for i in (0, 1, 2):
            batch = batcher.batch(i)
            assert batch["seq"].shape == (b, seq_len, f)
            del batch
        _, batch_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # setup holds O(M) index arrays only (the order permutation and checks): far below N·L·F
    assert setup_peak < 64 * split.n_samples
    assert setup_peak < full / 10
    # one batch: the window tensor plus a few small per-sample arrays
    assert batch_peak - base < 2.5 * per_batch, (batch_peak - base, per_batch)
    assert not seq.flags.writeable


def test_dataloader_with_workers_yields_the_same_batches():
    split = random_split(bars=(300, 250, 280))
    batcher = WindowBatcher(split, seq_len=6, batch_size=32, shuffle=True, seed=3)
    assert make_dataloader(batcher, num_workers=0) is batcher
    batcher.set_epoch(1)
    expected = [{k: v.clone() for k, v in b.items()} for b in batcher]
    loader = make_dataloader(batcher, num_workers=2, prefetch_factor=2)
    got = list(loader)
    assert len(got) == len(expected) == len(loader)
    for g, e in zip(got, expected, strict=True):
        assert set(g) == set(BATCH_KEYS)
        for k in BATCH_KEYS:
            assert torch.equal(g[k], e[k]), k
    # set_epoch before iterating reaches the workers
    batcher.set_epoch(2)
    first = next(iter(loader))
    assert torch.equal(first["end_rows"], batcher.batch(0)["end_rows"])
    assert not torch.equal(first["end_rows"], expected[0]["end_rows"])


class _FakeTensor:
    """Records how ``to_device`` moves it (stands in for a pinned CUDA-bound tensor on a CPU host)."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self.calls: list[tuple[torch.device, bool]] = []

    def is_pinned(self) -> bool:
        return self.pinned

    def to(self, device: torch.device, non_blocking: bool = False) -> _FakeTensor:
        self.calls.append((device, non_blocking))
        return self


def test_to_device_is_non_blocking_only_for_pinned_tensors_to_cuda():
    pinned, pageable = _FakeTensor(True), _FakeTensor(False)
    to_device({"a": pinned, "b": pageable}, "cuda")  # type: ignore[dict-item]
    assert pinned.calls == [(torch.device("cuda"), True)]
    assert pageable.calls == [(torch.device("cuda"), False)]
    to_device({"a": pinned}, "cpu")  # type: ignore[dict-item]
    assert pinned.calls[-1] == (torch.device("cpu"), False)
    batch = WindowBatcher(random_split(), seq_len=6, batch_size=4).batch(0)
    moved = to_device(batch, "cpu")
    assert all(torch.equal(moved[k], batch[k]) for k in BATCH_KEYS)


# --- opening splits from files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def h5_files(tmp_path_factory) -> tuple[dict[str, Path], str]:
    dataset, assignment, contract = make_labelled_dataset(n_symbols=4, n_bars=200, seq_len=8, seed=11)
    scalers = fit_scalers(dataset, assignment, contract)
    root = tmp_path_factory.mktemp("data")
    paths = hdf5_splits.write_splits(
        dataset, assignment, contract, scalers, LABEL_PARAMS, root / "artifacts" / "hdf5"
    )
    return paths, contract.hash


def test_load_split_prefers_a_matching_arrow_cache(h5_files):
    paths, contract_hash = h5_files
    h5 = paths["val"]
    from_h5, source = load_split_for_training(h5, contract_hash, prefer_arrow=True)
    assert source == "hdf5"  # no cache yet
    arrow_path = arrow_cache.build_cache(h5)
    assert arrow_path == data_loader.arrow_cache_for(h5)
    from_arrow, source = load_split_for_training(h5, contract_hash)
    assert source == "arrow"
    assert not from_arrow.seq.flags.writeable  # memory-mapped
    assert load_split_for_training(h5, contract_hash, prefer_arrow=False)[1] == "hdf5"
    a = collect(WindowBatcher(from_h5, seq_len=8, batch_size=64))
    b = collect(WindowBatcher(from_arrow, seq_len=8, batch_size=64))
    for k in BATCH_KEYS:
        np.testing.assert_array_equal(a[k], b[k])


def test_load_split_ignores_a_stale_cache_and_refuses_a_wrong_hash(h5_files, tmp_path):
    paths, contract_hash = h5_files
    h5 = tmp_path / "artifacts" / "hdf5" / "test.h5"
    h5.parent.mkdir(parents=True)
    h5.write_bytes(paths["test"].read_bytes())
    arrow_cache.build_cache(h5)
    assert load_split_for_training(h5, contract_hash)[1] == "arrow"
    # rewrite the HDF5 with different content: its checksum no longer matches the cache's source
    split = hdf5_splits.read_split(h5)
    split.snap = split.snap + np.float32(1.0)
    hdf5_splits.write_split_file(h5, split)
    reread, source = load_split_for_training(h5, contract_hash)
    assert source == "hdf5"
    np.testing.assert_array_equal(reread.snap, split.snap)
    with pytest.raises(ContractError, match=str(h5.name)):
        load_split_for_training(h5, "f" * 16)
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        load_split_for_training(tmp_path / "missing.h5", contract_hash)


def test_hdf5_read_refused_when_it_does_not_fit_the_memory_limit(tmp_path, monkeypatch):
    """The loader reads an HDF5 split whole only when it fits the memory this process may use
    (cgroup-aware); otherwise it fails with a clear error instead of being OOM-killed."""
    from sentinel_pipeline.data import hdf5_splits, scalers
    from sentinel_pipeline.training import data_loader, runtime

    dataset, assignment, contract = make_labelled_dataset(n_symbols=2, n_bars=120, seq_len=6, seed=3)
    fitted = scalers.fit_scalers(dataset, assignment, contract)
    files = hdf5_splits.write_splits(dataset, assignment, contract, fitted, LABEL_PARAMS, tmp_path / "hdf5")
    need = data_loader.h5_split_nbytes(files["train"])
    assert need > 0
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda *a, **k: need)  # 80% budget < need
    with pytest.raises(data_loader.SplitTooLargeError, match="train.h5.*MiB"):
        load_split_for_training(files["train"], contract.hash, prefer_arrow=False)
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda *a, **k: 10 * need)
    split, source = load_split_for_training(files["train"], contract.hash, prefer_arrow=False)
    assert source == "hdf5" and split.n_rows > 0
