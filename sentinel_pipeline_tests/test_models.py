"""Model registry: configs from the schema alone, head shapes, rebuild from config, context off."""

from __future__ import annotations

import json

import pytest
import torch

from sentinel_pipeline.data.feature_contract import FeatureContract, FeatureSpec, read_feature_schema
from sentinel_pipeline.data.split_arrays import TARGET_NAMES
from sentinel_pipeline.training.losses import class_weights_from_counts, compute_losses
from sentinel_pipeline.training.models import (
    VARIANTS,
    build_model,
    resolve_arch,
    signal_from_outputs,
)
from sentinel_pipeline.training.runtime import seed_everything

# the window family's variants (the graph family has its own tests: test_gat_family, test_gat_multi_horizon_net)
VARIANTS = {k: v for k, v in VARIANTS.items() if v.batch_kind == "windows"}

SEQ_LEN = 30
CARDS = [3, 4, 5, 7, 12]


def contract(context: bool = True, n_seq: int = 14, n_snap: int = 10) -> FeatureContract:
    feats = [FeatureSpec(f"seq_{i}", "seq", "float32") for i in range(n_seq)]
    feats += [FeatureSpec(f"snap_{i}", "snap", "float32") for i in range(n_snap)]
    if context:
        feats += [FeatureSpec(f"cat_{i}", "ctx_cat", "int32", cardinality=c) for i, c in enumerate(CARDS)]
        feats += [FeatureSpec(f"cont_{i}", "ctx_cont", "float32") for i in range(2)]
    return FeatureContract(tuple(feats), seq_len=SEQ_LEN, context_features=context, code_version="t")


def schema_dims(tmp_path, c: FeatureContract) -> dict[str, int]:
    schema = read_feature_schema(c.write(tmp_path)["schema"])
    return {g: len(names) for g, names in schema.items()}


def fake_batch(dims: dict[str, int], cards: list[int], b: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ctx_cat = (
        torch.stack([torch.randint(0, c, (b,), generator=g) for c in cards], 1)
        if cards
        else torch.zeros(b, 0)
    )
    if cards:
        ctx_cat[0] = torch.tensor(cards) - 1  # the largest code of every category
    return {
        "seq": torch.randn(b, SEQ_LEN, dims["seq"], generator=g),
        "snap": torch.randn(b, dims["snap"], generator=g),
        "ctx_cat": ctx_cat.long(),
        "ctx_cont": torch.randn(b, dims["ctx_cont"], generator=g),
        "targets": torch.randn(b, len(TARGET_NAMES), generator=g),
        "tb_class": torch.randint(0, 3, (b,), generator=g),
    }


@pytest.fixture
def deterministic():
    seed_everything(0)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("context", [True, False])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_build_forward_and_rebuild_from_config(tmp_path, deterministic, variant, context):
    c = contract(context)
    dims = schema_dims(tmp_path, c)
    cards = c.ctx_cat_cardinalities
    arch = resolve_arch(variant, dims, cards, SEQ_LEN, None)
    spec = VARIANTS[variant]
    # input_dim comes from the schema file, never from data
    assert arch["input_dim"] == dims["snap" if variant == "mlp_two_head" else "seq"]
    assert arch["variant"] == variant and arch["seq_len"] == SEQ_LEN
    assert arch["ctx_cat_cardinalities"] == (CARDS if context else [])
    assert "hidden_dim" in arch
    arch = json.loads(json.dumps(arch))  # the config is JSON-able and survives a round trip

    model = build_model(arch)
    model.eval()
    batch = fake_batch(dims, cards)
    with torch.no_grad():
        out = model(batch)
    assert set(out) == {h.name for h in spec.heads}
    for head in spec.heads:
        expected = (9,) if head.kind == "regression" else (9, 3)
        assert tuple(out[head.name].shape) == expected, head.name
        assert torch.isfinite(out[head.name]).all()

    # a fresh model from the stored config + state_dict reproduces the outputs exactly
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seed_everything(123)  # different init, overwritten by the state dict
    rebuilt = build_model(json.loads(json.dumps(arch)))
    rebuilt.load_state_dict(state)
    rebuilt.eval()
    with torch.no_grad():
        again = rebuilt(batch)
    for name in out:
        assert torch.equal(out[name], again[name]), name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_parameter_is_trained_and_training_is_deterministic(tmp_path, deterministic, variant):
    dims = schema_dims(tmp_path, contract(True))
    arch = resolve_arch(variant, dims, CARDS, SEQ_LEN, None)
    spec = VARIANTS[variant]
    weights = class_weights_from_counts([50, 300, 80])

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        seed_everything(5)
        model = build_model(arch)
        model.train()
        total, _ = compute_losses(
            spec, model(fake_batch(dims, CARDS, seed=1)), fake_batch(dims, CARDS, seed=1), weights
        )
        total.backward()
        return total.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_a, grads_a = step()
    loss_b, grads_b = step()
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        assert grad is not None and grad.abs().sum() > 0, f"{name} gets no gradient"
        assert torch.equal(grad, grads_b[name]), name


def test_resolve_arch_overrides_and_errors():
    dims = {"seq": 12, "snap": 8, "ctx_cat": 5, "ctx_cont": 2}
    arch = resolve_arch("seq_ctx_fusion", dims, CARDS, 20, {"hidden_dim": 32})
    assert arch["hidden_dim"] == 32 and arch["seq_len"] == 20
    assert sum(p.numel() for p in build_model(arch).parameters()) < sum(
        p.numel() for p in build_model(resolve_arch("seq_ctx_fusion", dims, CARDS, 20, None)).parameters()
    )
    assert resolve_arch("transformer_tbm", dims, CARDS, 30, None)["d_model"] == 64
    assert resolve_arch("mlp_two_head", dims, CARDS, 30, None)["hidden_dim"] == 128
    with pytest.raises(ValueError, match="not hyper-parameters"):
        resolve_arch("mlp_two_head", dims, CARDS, 30, {"input_dim": 99})
    with pytest.raises(ValueError, match="cardinalities"):
        resolve_arch("seq_ctx_fusion", dims, CARDS[:3], 30, None)
    with pytest.raises(ValueError, match="unknown model variant"):
        resolve_arch("nope", dims, CARDS, 30, None)
    with pytest.raises(ValueError, match="has none"):
        resolve_arch("mlp_two_head", {**dims, "snap": 0}, CARDS, 30, None)
    with pytest.raises(ValueError, match="divisible"):
        resolve_arch("transformer_tbm", dims, CARDS, 30, {"d_model": 30, "n_heads": 4})
    broken = dict(arch)
    del broken["snap_dim"]
    with pytest.raises(ValueError, match="lacks"):
        build_model(broken)


def test_registry_matches_the_interface():
    for spec in VARIANTS.values():
        assert all(h.target in TARGET_NAMES or h.target == "tb_class" for h in spec.heads)
        assert set(spec.inputs) <= {"seq", "snap", "ctx_cat", "ctx_cont"}
        assert spec.monitor_mode == ("max" if spec.monitor == "val_macro_f1" else "min")
    assert [(h.name, h.target, h.loss) for h in VARIANTS["mlp_two_head"].heads] == [
        ("early_move", "early_move", "mse"),
        ("tb_return_atr", "tb_return_atr", "mse"),
    ]
    assert VARIANTS["mlp_two_head"].default_batch_size == 16
    assert [(h.name, h.target) for h in VARIANTS["seq_ctx_fusion"].heads] == [
        ("direction", "tb_class"),
        ("early_move", "early_move"),
        ("quality", "tb_return_atr"),
    ]
    tbm = VARIANTS["transformer_tbm"]
    assert (
        tbm.monitor == "val_macro_f1" and [h.loss for h in tbm.heads] == ["focal"] and tbm.uses_class_weights
    )


def test_signal_from_outputs():
    logits = torch.tensor([[3.0, 0.0, -3.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 2.0]])
    sig = signal_from_outputs("transformer_tbm", {"direction": logits})
    p = torch.softmax(logits, -1)
    assert torch.allclose(sig, p[:, 2] - p[:, 0])
    assert sig[0] < 0 and sig[1] == 0 and sig[2] > 0
    reg = {"early_move": torch.tensor([0.1, -0.2]), "tb_return_atr": torch.tensor([5.0, 6.0])}
    assert torch.equal(signal_from_outputs(VARIANTS["mlp_two_head"], reg), reg["early_move"])


def _train_steps(arch: dict, batch: dict[str, torch.Tensor], steps: int = 3) -> torch.Tensor:
    torch.manual_seed(3)
    model = build_model(arch)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        total, _ = compute_losses(VARIANTS["transformer_tbm"], model(batch), batch, None)
        opt.zero_grad()
        total.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_transformer_attention_dropout_is_its_own_setting(tmp_path, deterministic):
    """``attn_dropout`` (default 0.1 = ``dropout``) sets the attention-weight dropout alone; an architecture
    written before the setting existed builds the same model as the default (same training steps)."""
    dims = schema_dims(tmp_path, contract())
    arch = resolve_arch("transformer_tbm", dims, CARDS, SEQ_LEN)
    assert arch["attn_dropout"] == arch["dropout"] == 0.1
    legacy = {k: v for k, v in arch.items() if k != "attn_dropout"}
    batch = fake_batch(dims, CARDS, b=16)
    assert torch.equal(_train_steps(arch, batch), _train_steps(legacy, batch))
    fast = resolve_arch("transformer_tbm", dims, CARDS, SEQ_LEN, {"attn_dropout": 0.0})
    model = build_model(fast)
    assert [blk.self_attn.dropout for blk in model.encoder.layers] == [0.0] * fast["n_layers"]
    assert [blk.dropout.p for blk in model.encoder.layers] == [0.1] * fast["n_layers"]
    assert not torch.equal(_train_steps(fast, batch), _train_steps(arch, batch))
