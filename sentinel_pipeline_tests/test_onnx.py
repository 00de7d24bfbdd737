"""ONNX export, the ONNX Runtime model, the parity check and runtime onnx in the replay.

Every registered variant (all families: today's window variants and the graph family) is exported and
run on ONNX Runtime on batches of other sizes than it was traced with; a model that cannot be exported
is recorded as failed with its reason; hostile graphs (external data, custom operator domains) are
refused; the parity check passes on the same weights and fails, naming the decisions, when the torch
model and the ONNX file differ; the replay gives the same trade list on both runtimes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from sentinel_pipeline.data.features import FeatureConfig, build_contract, compute_features
from sentinel_pipeline.data.scalers import ClippedRobustScaler, FittedScalers
from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig, generate_synthetic_market
from sentinel_pipeline.deployment.onnx_export import ONNX_OPSET, SIGNAL_OUTPUT, export_onnx
from sentinel_pipeline.deployment.onnx_model import OnnxModel, OnnxModelError, check_graph
from sentinel_pipeline.deployment.onnx_parity import PARITY_ATOL, PARITY_RTOL, onnx_parity, same_trades
from sentinel_pipeline.replay import ReplayConfig, replay_bundle, replay_window_mask
from sentinel_pipeline.training.data_loader import load_split_for_training
from sentinel_pipeline.training.families import VARIANTS, build_model, get_family, get_variant, resolve_arch
from sentinel_pipeline_tests.test_replay_runtime import LABEL_PARAMS, StandInBundle
from sentinel_pipeline_tests.training_fixtures import TrainingData, make_training_data

SEQ_LEN = 8
CONTRACT = build_contract(FeatureConfig(seq_len=SEQ_LEN))


def _model(variant: str, seed: int = 0, dims: dict[str, int] | None = None, cards: list[int] | None = None,
           seq_len: int = SEQ_LEN) -> tuple[nn.Module, dict]:
    arch = resolve_arch(variant, dims or CONTRACT.dims(), CONTRACT.ctx_cat_cardinalities if cards is None else cards,
                        seq_len)
    torch.manual_seed(seed)
    return build_model(arch).eval(), arch


def _exported(tmp_path: Path, model: nn.Module, arch: dict, dims: dict[str, int] | None = None) -> OnnxModel:
    path = tmp_path / f"{arch['variant']}.onnx"
    result = export_onnx(model, arch, dims or CONTRACT.dims(), path)
    assert result.exported, result.reason
    return OnnxModel.from_file(path, result.to_metadata())


def _random_batch(variant: str, arch: dict, n: int, g: torch.Generator, n_edges: int = 0) -> dict[str, torch.Tensor]:
    dims = CONTRACT.dims()
    batch = {"seq": torch.randn(n, arch["seq_len"], dims["seq"], generator=g), "snap": torch.randn(n, dims["snap"], generator=g),
             "ctx_cat": torch.stack([torch.randint(0, c, (n,), generator=g) for c in CONTRACT.ctx_cat_cardinalities], 1),
             "ctx_cont": torch.randn(n, dims["ctx_cont"], generator=g)}
    if get_variant(variant).batch_kind == "days":
        batch["edge_index"] = torch.randint(0, n, (2, n_edges), generator=g)
        batch["edge_weight"] = torch.rand(n_edges, generator=g) + 0.1
    return batch


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_registered_variant_exports_and_runs_on_onnx_runtime_at_any_batch_size(
    variant: str, tmp_path: Path
) -> None:
    model, arch = _model(variant)
    path = tmp_path / "model.onnx"
    result = export_onnx(model, arch, CONTRACT.dims(), path)
    assert result.exported, result.reason
    meta = result.to_metadata()
    spec = get_variant(variant)
    family = get_family(spec.family)
    assert meta["opset"] == ONNX_OPSET and meta["file"] == "model.onnx"
    assert [o["name"] for o in meta["outputs"]] == [*(h.name for h in spec.heads), SIGNAL_OUTPUT]
    assert [i["name"] for i in meta["inputs"]] == list(family.onnx_inputs(spec, arch))
    # only the sample axis (and for a day batch the edge axis) is dynamic
    for item in meta["inputs"]:
        assert [d for d in item["shape"] if isinstance(d, str)] in (["batch"], ["nodes"], ["edges"])
    proto = onnx.load(str(path))
    assert [op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    assert not model.training
    ort_model = OnnxModel.from_file(path, meta)
    g = torch.Generator().manual_seed(1)
    for n, edges in ((1, 0), (7, 12), (300, 900)):
        batch = _random_batch(variant, arch, n, g, edges)
        with torch.no_grad():
            expected = model(batch)
            signal = family.signal(spec, expected)
        got = ort_model.run(batch)
        for head in spec.heads:
            np.testing.assert_allclose(got[head.name], expected[head.name].numpy(), rtol=PARITY_RTOL, atol=PARITY_ATOL)
        np.testing.assert_allclose(got[SIGNAL_OUTPUT], signal.numpy(), rtol=PARITY_RTOL, atol=PARITY_ATOL)
        # the runtime model is called like the torch model: head outputs as tensors
        assert set(ort_model(batch)) == {h.name for h in spec.heads}


def test_export_leaves_the_training_state_alone(tmp_path: Path) -> None:
    """The export does not consume torch's RNG (training after it is unchanged) and restores train mode."""
    model, arch = _model("transformer_tbm")
    model.train()
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    assert export_onnx(model, arch, CONTRACT.dims(), tmp_path / "m.onnx").exported
    assert torch.equal(torch.rand(3), before) and model.training


class _Unexportable(nn.Module):
    """Uses an operator that ONNX has no function for (Hurwitz zeta)."""

    def __init__(self, arch: dict) -> None:
        super().__init__()
        self.lin = nn.Linear(CONTRACT.dims()["snap"], 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["snap"]
        z = torch.special.zeta(x.abs() + 2, torch.ones_like(x))[:, 0]
        return {"early_move": self.lin(x).squeeze(-1) + z, "tb_return_atr": self.lin(x).squeeze(-1)}


def test_a_model_that_cannot_be_exported_is_recorded_as_failed_with_its_reason(tmp_path: Path) -> None:
    _, arch = _model("mlp_two_head")
    path = tmp_path / "model.onnx"
    result = export_onnx(_Unexportable(arch), arch, CONTRACT.dims(), path)
    meta = result.to_metadata()
    assert meta["status"] == "failed" and meta["reason"].startswith("ConversionError")
    assert "No ONNX function found" in meta["reason"] and "zeta" in meta["reason"]  # names what failed
    assert "\x1b[" not in meta["reason"] and len(meta["reason"]) <= 600 and not path.exists()


def _tiny_graph(domain: str = "") -> onnx.ModelProto:
    node = helper.make_node("Relu" if not domain else "Evil", ["x"], ["y"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    imports = [helper.make_opsetid("", ONNX_OPSET)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports)


def test_hostile_graphs_are_refused(tmp_path: Path) -> None:
    check_graph(_tiny_graph().SerializeToString(), "ok.onnx")
    with pytest.raises(OnnxModelError, match="not standard ONNX"):
        check_graph(_tiny_graph("com.attacker").SerializeToString(), "custom.onnx")
    with pytest.raises(OnnxModelError, match="not a readable ONNX model"):
        check_graph(b"\x80\x04not onnx at all", "junk.onnx")
    # a weight stored as an external file, which ONNX would resolve as a path (possibly outside the bundle)
    weight = numpy_helper.from_array(np.ones(256, np.float32), "w")
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="secret.bin",
                    size_threshold=0)
    assert (tmp_path / "secret.bin").is_file()
    with pytest.raises(OnnxModelError, match="external data"):
        check_graph((tmp_path / "ext.onnx").read_bytes(), "ext.onnx")
    # a graph whose inputs are not the recorded ones
    with pytest.raises(OnnxModelError, match="not the recorded"):
        OnnxModel(_tiny_graph().SerializeToString(), {"inputs": [{"name": "seq"}], "outputs": [{"name": "y"}]})


def test_a_file_changed_after_its_digest_was_taken_is_refused(tmp_path: Path) -> None:
    model, arch = _model("mlp_two_head")
    path = tmp_path / "m.onnx"
    meta = export_onnx(model, arch, CONTRACT.dims(), path).to_metadata()
    with pytest.raises(OnnxModelError, match="sha256 differs"):
        OnnxModel.from_file(path, meta, expected_sha256="0" * 64)


# -- the parity check on a real validation split ----------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    return make_training_data(tmp_path_factory.mktemp("onnx_data"), n_bars=400, signal=1.0)


@pytest.mark.parametrize("variant", [v for v, s in VARIANTS.items() if s.batch_kind == "windows"])
def test_parity_passes_on_the_same_weights_and_fails_on_decisions_when_they_differ(
    variant: str, data: TrainingData, tmp_path: Path
) -> None:
    split, _ = load_split_for_training(data.val_h5, data.hash)
    dims = data.contract.dims()
    model, arch = _model(variant, seed=3, dims=dims, cards=data.contract.ctx_cat_cardinalities,
                         seq_len=data.contract.seq_len)
    ort_model = _exported(tmp_path, model, arch, dims)
    report = onnx_parity(model, ort_model, arch, split)
    assert report.passed, report.problems
    assert report.n_samples == split.sample_end_rows.size and report.ort_threads == 1
    assert {o["name"] for o in report.outputs} >= {"signal", "graph:signal"}
    assert max(o["max_abs"] for o in report.outputs) < PARITY_ATOL
    assert [t["name"] for t in report.thresholds] == ["replay", "backtest"]
    assert all(t["entries"] > 0 and t["mismatches"] == 0 for t in report.thresholds if t["name"] == "backtest")
    assert report.trades["identical"] is True and report.trades["n_torch"] > 0
    # the ONNX file no longer matches the weights (a stale or swapped export): every layer of the check sees it
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bad = onnx_parity(model, ort_model, arch, split)
    assert not bad.passed
    assert any("outside the tolerance" in p for p in bad.problems)
    assert bad.sign_mismatches > 0 or any(t["mismatches"] for t in bad.thresholds)
    assert bad.trades["identical"] is False
    assert "FAILED" in bad.detail()


def test_same_trades_compares_decisions_exactly_and_the_signal_within_tolerance() -> None:
    a = pd.DataFrame({"symbol": ["A", "B"], "side": [1, -1], "net_return": [0.01, -0.02], "signal": [0.5, -0.3]})
    b = a.copy()
    b["signal"] += 1e-7
    assert same_trades(a, b)
    c = a.copy()
    c.loc[1, "side"] = 1
    assert not same_trades(a, c)
    assert not same_trades(a, a.iloc[:1])


# -- runtime onnx in the replay -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def market() -> pd.DataFrame:
    return generate_synthetic_market(SyntheticMarketConfig(n_symbols=20, n_days=16, seed=4))


@pytest.fixture(scope="module")
def scalers(market: pd.DataFrame) -> FittedScalers:
    features = compute_features(market, FeatureConfig(seq_len=SEQ_LEN))
    before = ~replay_window_mask(market["timestamp"], ReplayConfig(window_bars=8)) & features["feature_valid"].to_numpy()
    fitted = {}
    for g in ("seq", "snap"):
        fitted[g] = ClippedRobustScaler().fit(features.loc[before, CONTRACT.names(g)].to_numpy(np.float64))
        fitted[g].feature_contract_hash_ = CONTRACT.hash
    return FittedScalers(seq=fitted["seq"], snap=fitted["snap"], info={"feature_contract_hash": CONTRACT.hash})


@pytest.mark.parametrize("variant", [v for v, s in VARIANTS.items() if s.batch_kind == "windows"])
def test_replay_on_onnx_gives_the_identical_trade_list(
    variant: str, market: pd.DataFrame, scalers: FittedScalers, tmp_path: Path
) -> None:
    model, arch = _model(variant, seed=11)
    bundle = StandInBundle(Path(variant), model, arch, variant, CONTRACT, scalers,
                           metadata={"label_params": dict(LABEL_PARAMS)})
    probe = replay_bundle(bundle, market, ReplayConfig(window_bars=8, threshold=0.0))
    # a threshold that half of the decisions cross, so that crossings are tested, not only signs
    threshold = float(np.nanmedian(np.abs(probe.bars["signal"].to_numpy())))
    config = ReplayConfig(window_bars=8, threshold=threshold)
    on_torch = replay_bundle(bundle, market, config)
    on_onnx = replay_bundle(dataclasses.replace(bundle, model=_exported(tmp_path, model, arch)), market, config)
    assert len(on_torch.trades) > 0
    assert same_trades(on_torch.trades, on_onnx.trades)
    np.testing.assert_array_equal(on_torch.bars["decided"].to_numpy(), on_onnx.bars["decided"].to_numpy())
    np.testing.assert_allclose(on_onnx.bars["signal"].to_numpy(), on_torch.bars["signal"].to_numpy(),
                               rtol=PARITY_RTOL, atol=PARITY_ATOL)
    assert on_torch.metrics["n_trades_created"] == on_onnx.metrics["n_trades_created"]
