"""The graph family (``gat_multi_horizon``) through the family protocol: architecture, model, loss,
signal, metrics, optimizer preference; and, with the symbol graph and the day batcher, prepare ->
batcher -> model -> loss -> bundle files -> graph read back from the bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sentinel_pipeline.data.split_arrays import TARGET_NAMES, SplitArrays
from sentinel_pipeline.training import families, optim
from sentinel_pipeline.training.families.gat_multi_horizon import FAMILY, rank_normalised_targets
from sentinel_pipeline_tests.test_gat_multi_horizon_net import day_batch

DIMS = {"seq": 4, "snap": 3, "ctx_cat": 0, "ctx_cont": 0}
DAY_NS = 86_400 * 10**9


def registered_family():
    """The family registered for the test (unless the registry already lists it)."""
    if FAMILY.name in families.FAMILIES:
        from contextlib import nullcontext

        return nullcontext(FAMILY)
    return families.registered(FAMILY)


def test_arch_model_loss_signal_through_the_registry() -> None:
    with registered_family():
        spec = families.get_variant("gat_multi_horizon")
        assert spec.batch_kind == "days" and families.family_of(spec) is FAMILY
        arch = families.resolve_arch("gat_multi_horizon", DIMS, [], 8, {"hidden_dim": 16, "gat_heads": 2})
        assert json.loads(json.dumps(arch)) == arch
        for key in ("variant", "seq_len", "heads", "input_dim", "hidden_dim"):
            assert key in arch
        assert arch["input_dim"] == 4 and arch["seq_len"] == 8 and arch["horizons"] == [1, 5, 10, 20]
        with pytest.raises(ValueError, match="not hyper-parameters"):
            families.resolve_arch("gat_multi_horizon", DIMS, [], 8, {"horizons": [1]})
        torch.manual_seed(0)
        model = families.build_model(arch)
        batch = day_batch([9, 7], seed=0)
        outputs = model(batch)
        assert [h.name for h in spec.heads] == sorted(outputs, key=lambda k: int(k.split("_")[1]))
        total, per_head = FAMILY.losses(spec, outputs, batch, FAMILY.loss_state(spec, {}, torch.device("cpu")))
        assert set(per_head) == set(outputs) and torch.isfinite(total)
        total.backward()
        assert torch.equal(families.signal_from_outputs(spec, outputs), outputs["ret_5"])
        assert FAMILY.samples_in(batch) == 16
        wrong = {**arch, "heads": arch["heads"][:2]}
        with pytest.raises(ValueError, match="heads"):
            families.build_model(wrong)


def test_optimizer_preference_is_valid_config() -> None:
    d = FAMILY.optimizer_defaults
    assert d["optimizer"] in optim.OPTIMIZERS and d["scheduler"] in optim.SCHEDULERS
    params = d["scheduler_params"]["cosine_restarts"]
    assert params == {"T_0": 3, "T_mult": 2, "eta_min": 5e-5}
    assert optim.check_params("scheduler", "cosine_restarts", params) == []


def test_metrics_and_baseline_comparison() -> None:
    spec = FAMILY.variant("gat_multi_horizon")
    rng = np.random.default_rng(0)
    n_days, per_day = 6, 10
    ts = np.repeat(np.arange(n_days) * DAY_NS, per_day)
    targets = rng.normal(size=(ts.size, len(TARGET_NAMES))).astype(np.float32)
    targets[3, TARGET_NAMES.index("fwd_ret_20")] = np.nan
    kept = {"targets": targets, "timestamp": ts, "symbol_idx": np.tile(np.arange(per_day), n_days)}
    perfect = {f"ret_{h}": targets[:, TARGET_NAMES.index(f"fwd_ret_{h}")] ** 3 for h in (1, 5, 10, 20)}
    perfect["ret_20"] = np.nan_to_num(perfect["ret_20"])
    reversed_ = {k: -v for k, v in perfect.items()}
    m = FAMILY.epoch_metrics(spec, perfect, kept)
    assert m["val_rank_ic"] == pytest.approx(1.0) and m["val_rank_ic_ret_1"] == pytest.approx(1.0)
    assert FAMILY.epoch_metrics(spec, reversed_, kept)["val_rank_ic"] == pytest.approx(-1.0)
    assert set(m) <= {"val_rank_ic", *FAMILY.monitor_modes(spec)}
    final = FAMILY.evaluate(spec, perfect, kept, {})
    assert final["n_samples"] == ts.size and final["rank_ic"] == pytest.approx(1.0)
    h5 = final["heads"]["ret_5"]
    assert h5["n_ic_timestamps"] == n_days and 0 < h5["ic"] < 1  # cubed target: Pearson IC below 1
    assert h5["baseline_mse"] == pytest.approx(
        np.nanmean(rank_normalised_targets(targets, ts, TARGET_NAMES.index("fwd_ret_5")) ** 2))
    assert final["heads"]["ret_20"]["n"] == ts.size - 1  # the NaN target is left out
    json.dumps(final)
    cmp = FAMILY.head_vs_baseline(spec, final)
    assert cmp["ret_5"]["beats_baseline"] is True and cmp["ret_5"]["metric"] == "rank_ic"
    assert FAMILY.head_vs_baseline(spec, FAMILY.evaluate(spec, reversed_, kept, {}))["ret_5"]["beats_baseline"] is False


def test_prepare_requires_the_graph_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="symbol_graph"):
        FAMILY.prepare(SimpleNamespace(family_inputs={}), SimpleNamespace())
    with pytest.raises(FileNotFoundError, match="symbol_graph"):
        FAMILY.prepare(SimpleNamespace(family_inputs={"symbol_graph": tmp_path / "absent"}), SimpleNamespace())


# -- with the symbol graph and the day batcher ------------------------------------------------------
def small_split(n_symbols: int = 8, n_days: int = 30, seq_len: int = 4, contract: str = "c" * 16) -> SplitArrays:
    """Instrument-major rows (sorted by (symbol, timestamp)), every row after the warm-up a sample end."""
    rng = np.random.default_rng(0)
    sym = np.repeat(np.arange(n_symbols), n_days)
    day = np.tile(np.arange(n_days), n_symbols)
    n = sym.size
    ends = np.flatnonzero(day >= seq_len - 1).astype(np.int64)
    return SplitArrays(
        split="train", seq=rng.normal(size=(n, DIMS["seq"])).astype(np.float32),
        snap=rng.normal(size=(n, DIMS["snap"])).astype(np.float32),
        ctx_cat=np.zeros((n, 0), np.int32), ctx_cont=np.zeros((n, 0), np.float32),
        targets=rng.normal(size=(n, len(TARGET_NAMES))).astype(np.float32),
        tb_label=rng.integers(-1, 2, size=n).astype(np.int8), symbol_idx=sym.astype(np.int32),
        timestamp=(day.astype(np.int64) + 19_000) * DAY_NS, sample_end_rows=ends, feature_contract_hash=contract,
        feature_names={"seq": [f"s{i}" for i in range(DIMS["seq"])], "snap": ["a", "b", "c"], "ctx_cat": [],
                       "ctx_cont": []},
        symbols=[f"S{i}" for i in range(n_symbols)], seq_len=seq_len,
    )


def test_graph_folder_to_batches_to_bundle_and_back(tmp_path: Path) -> None:
    sg = pytest.importorskip("sentinel_pipeline.data.symbol_graph", reason="the symbol graph stage")
    pytest.importorskip("sentinel_pipeline.training.batchers.day_batches", reason="the day batcher")
    split = small_split()
    src = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 2])
    tgt = np.array([1, 2, 3, 4, 5, 6, 7, 0, 4, 6])
    w = np.linspace(0.3, 1.0, src.size).astype(np.float32)
    edges = sg.EdgeSet(src, tgt, w, np.zeros(src.size, np.int8), w.copy())
    folder = tmp_path / "symbol_graph"
    folder.mkdir()
    sg.write_graph_files(folder, [(int(split.timestamp.max()), edges)], split.symbols, sg.GraphConfig().params(),
                         split.feature_contract_hash)
    config = SimpleNamespace(family_inputs={"symbol_graph": folder})
    data = FAMILY.prepare(config, SimpleNamespace(train=split, val=split))
    assert data.digests["symbol_graph"] == json.loads((folder / "graph.json").read_text())["graph_hash"]
    batcher = FAMILY.make_batcher(split, seq_len=4, batch_size=2, shuffle=True, seed=0, data=data)
    assert len(batcher) == 14  # 27 eligible days, two per batch
    spec = FAMILY.variant("gat_multi_horizon")
    arch = FAMILY.resolve_arch(spec, DIMS, [], 4, {"hidden_dim": 16, "gat_heads": 2, "use_snap": True})
    torch.manual_seed(0)
    model = FAMILY.build_model(arch)
    batch = batcher.batch(0)
    assert batch["edge_index"].shape == (2, 2 * src.size) and FAMILY.samples_in(batch) == 16
    assert all(k in batch for k in FAMILY.eval_keys)
    total, _ = FAMILY.losses(spec, model(batch), batch, None)
    total.backward()
    assert model.graph[0].att_src.grad.abs().sum() > 0
    # the bundle carries the graph files; the graph read back gives the same edges
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name, path in FAMILY.bundle_files(data).items():
        assert name in FAMILY.bundle_file_names
        shutil.copy2(path, bundle / name)
    back = FAMILY.load_bundle_data(bundle)
    assert back.digests == data.digests
    again = FAMILY.make_batcher(split, seq_len=4, batch_size=2, shuffle=True, seed=0, data=back).batch(0)
    assert torch.equal(again["edge_index"], batch["edge_index"])
    assert torch.equal(again["edge_weight"], batch["edge_weight"])
    # a graph built for another feature contract is refused
    with pytest.raises(Exception, match="contract"):
        FAMILY.prepare(config, SimpleNamespace(train=small_split(contract="d" * 16)))
