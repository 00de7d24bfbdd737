"""Losses: focal vs cross-entropy, class weights, per-head sum, NaN-safe regression."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sentinel_pipeline.data.split_arrays import TARGET_NAMES
from sentinel_pipeline.training.losses import FocalLoss, class_weights_from_counts, compute_losses
from sentinel_pipeline.training.models import VARIANTS


def _logits_targets(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g) * 2, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("weight", [None, torch.tensor([2.5, 0.3, 1.2])])
def test_focal_with_gamma_zero_equals_cross_entropy(weight):
    logits, target = _logits_targets()
    logits.requires_grad_(True)
    focal = FocalLoss(gamma=0.0, weight=weight)(logits, target)
    (g_focal,) = torch.autograd.grad(focal, logits)
    ce = F.cross_entropy(logits, target, weight=weight)
    (g_ce,) = torch.autograd.grad(ce, logits)
    torch.testing.assert_close(focal, ce, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_focal, g_ce, rtol=1e-5, atol=1e-7)


def test_focal_down_weights_easy_examples():
    logits, target = _logits_targets(256)
    per_ce = F.cross_entropy(logits, target, reduction="none")
    focal = FocalLoss(gamma=2.0)(logits, target)
    assert focal < per_ce.mean()
    # matches the formula, sample by sample
    p_t = torch.softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(focal, ((1 - p_t) ** 2 * per_ce).mean())
    # an easy (confident, correct) sample contributes much less than under CE
    easy = torch.tensor([[6.0, 0.0, 0.0]])
    assert FocalLoss(gamma=2.0)(easy, torch.tensor([0])) < 1e-3 * F.cross_entropy(easy, torch.tensor([0]))


def test_class_weights_favour_rare_classes():
    w = class_weights_from_counts([100, 800, 100])
    assert w[0] == pytest.approx(w[2]) and w[0] > w[1]
    assert w.mean().item() == pytest.approx(1.0)
    assert (w[0] / w[1]).item() == pytest.approx(8.0**0.5)  # square-root inverse frequency by default
    assert (class_weights_from_counts([100, 800, 100], power=1.0)[0] / w[1]).item() > 1  # full inverse
    w_inv = class_weights_from_counts([100, 800, 100], power=1.0)
    assert (w_inv[0] / w_inv[1]).item() == pytest.approx(8.0)
    assert torch.equal(class_weights_from_counts([5, 50, 500], power=0.0), torch.ones(3))
    w = class_weights_from_counts(np.array([10, 1000, 100]))
    assert w[0] > w[2] > w[1]
    # an absent class gets the neutral weight 1 (finite), present ones average to 1
    w = class_weights_from_counts(torch.tensor([0, 300, 100]))
    assert w[0].item() == 1.0 and w[1:].mean().item() == pytest.approx(1.0) and w[2] > w[1]
    loss = FocalLoss(weight=w)(
        torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    )  # a batch of the absent class
    assert torch.isfinite(loss) and loss > 0
    with pytest.raises(ValueError):
        class_weights_from_counts([-1, 2, 3])
    with pytest.raises(ValueError):
        class_weights_from_counts([1, 2, 3], power=-1.0)


def test_weighted_focal_emphasises_the_rare_class():
    # the model predicts the majority class everywhere: weighting raises the loss of the rare misses
    logits = torch.tensor([[0.0, 3.0, 0.0]]).repeat(10, 1)
    target = torch.tensor([1] * 8 + [0, 2])
    w = class_weights_from_counts([1, 8, 1])
    assert FocalLoss(weight=w)(logits, target) > FocalLoss()(logits, target)


def _batch(b: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "targets": torch.randn(b, len(TARGET_NAMES), generator=g),
        "tb_class": torch.randint(0, 3, (b,), generator=g),
    }


def test_compute_losses_sums_the_heads():
    spec = VARIANTS["seq_ctx_fusion"]
    batch = _batch()
    g = torch.Generator().manual_seed(1)
    outputs = {
        "direction": torch.randn(16, 3, generator=g),
        "early_move": torch.randn(16, generator=g),
        "quality": torch.randn(16, generator=g),
    }
    weights = class_weights_from_counts([1, 5, 2])
    total, per = compute_losses(spec, outputs, batch, weights)
    assert set(per) == {"direction", "early_move", "quality"}
    torch.testing.assert_close(total, per["direction"] + per["early_move"] + per["quality"])
    t = batch["targets"]
    torch.testing.assert_close(
        per["early_move"], F.mse_loss(outputs["early_move"], t[:, TARGET_NAMES.index("early_move")])
    )
    torch.testing.assert_close(
        per["quality"], F.mse_loss(outputs["quality"], t[:, TARGET_NAMES.index("tb_return_atr")])
    )
    # the CE head of seq_ctx_fusion is unweighted; the focal head of transformer_tbm uses the weights
    torch.testing.assert_close(per["direction"], F.cross_entropy(outputs["direction"], batch["tb_class"]))
    _, tbm = compute_losses(VARIANTS["transformer_tbm"], {"direction": outputs["direction"]}, batch, weights)
    torch.testing.assert_close(
        tbm["direction"], FocalLoss(weight=weights)(outputs["direction"], batch["tb_class"])
    )


def test_regression_loss_ignores_non_finite_targets():
    spec = VARIANTS["mlp_two_head"]
    batch = _batch(8)
    col = TARGET_NAMES.index("early_move")
    batch["targets"][:3, col] = float("nan")
    pred = torch.randn(8, requires_grad=True)
    _, per = compute_losses(spec, {"early_move": pred, "tb_return_atr": torch.zeros(8)}, batch, None)
    expected = F.mse_loss(pred[3:], batch["targets"][3:, col])
    torch.testing.assert_close(per["early_move"], expected)
    (grad,) = torch.autograd.grad(per["early_move"], pred)
    assert torch.isfinite(grad).all() and (grad[:3] == 0).all()
