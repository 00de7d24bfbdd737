"""Soft rank, soft Spearman, per-day rank normalisation and the multi-horizon rank loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import rankdata, spearmanr

from sentinel_pipeline.data.split_arrays import TARGET_NAMES
from sentinel_pipeline.training.layers.rank_loss import multi_horizon_rank_loss
from sentinel_pipeline.training.layers.soft_rank import (
    rank_normalise,
    soft_rank,
    soft_spearman,
    soft_spearman_days,
)


def test_rank_term_has_gradient_argsort_has_none() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(30, generator=gen, requires_grad=True)
    target = torch.randn(30, generator=gen)
    rho = soft_spearman(pred, target, tau=0.1)
    (grad,) = torch.autograd.grad(1.0 - rho, pred)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 1e-3
    # a small step against the gradient raises the correlation
    with torch.no_grad():
        assert soft_spearman(pred - 0.5 * grad / grad.norm(), target, 0.1) > rho
    # the seed's approach: ranks from argsort(argsort(pred)) are integers cut off from the graph
    hard = torch.argsort(torch.argsort(pred)).float()
    assert not hard.requires_grad and hard.grad_fn is None
    ht = torch.argsort(torch.argsort(target)).float()
    hard_rho = torch.corrcoef(torch.stack([hard, ht]))[0, 1]
    with pytest.raises(RuntimeError, match="does not require grad"):
        (1.0 - hard_rho).backward()


def test_soft_spearman_converges_to_exact() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=200)
    y = 0.4 * x + rng.normal(size=200)
    y[::17] = y[0]  # ties in the target
    exact = spearmanr(x, y).statistic
    taus = [1.0, 0.3, 0.1, 0.03, 0.01, 1e-3, 1e-4]
    errors = [abs(float(soft_spearman(torch.tensor(x), torch.tensor(y), t)) - exact) for t in taus]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-3
    # and the soft ranks themselves tend to the exact average ranks
    torch.testing.assert_close(soft_rank(torch.tensor(x), 1e-9), torch.tensor(rankdata(x)), atol=1e-6, rtol=0)


def test_soft_rank_ties_average_and_scale_free() -> None:
    x = torch.tensor([3.0, 1.0, 3.0, 2.0])
    torch.testing.assert_close(soft_rank(x, 1e-4), torch.tensor([3.5, 1.0, 3.5, 2.0]))
    torch.testing.assert_close(soft_rank(x, 0.3), soft_rank(100 * x + 5, 0.3))


def test_rank_normalise_per_day_with_nan_and_ties() -> None:
    values = torch.tensor([0.3, float("nan"), -1.0, 0.3, 2.0,  # day 0: 4 finite, one tie
                           5.0,  # day 1: one value
                           1.0, 1.0, 1.0,  # day 2: all equal
                           float("nan"), float("nan"),  # day 3: none finite
                           4.0, -4.0])  # day 4
    ptr = torch.tensor([0, 5, 6, 9, 11, 13])
    out = rank_normalise(values, ptr)
    # day 0: ranks of (0.3, -1, 0.3, 2) = (2.5, 1, 2.5, 4) -> -1 + 2 (r - 1) / 3
    expected0 = [-1 + 2 * 1.5 / 3, math.nan, -1.0, -1 + 2 * 1.5 / 3, 1.0]
    torch.testing.assert_close(out[:5], torch.tensor(expected0), equal_nan=True)
    assert out[5] == 0.0
    assert torch.equal(out[6:9], torch.zeros(3))
    assert torch.isnan(out[9:11]).all()
    torch.testing.assert_close(out[11:], torch.tensor([1.0, -1.0]))
    # agrees with scipy's average ranks on a random multi-day batch
    rng = np.random.default_rng(0)
    sizes = [7, 1, 20, 3]
    vals = np.round(rng.normal(size=sum(sizes)), 1).astype(np.float32)  # rounding makes ties
    vals[[2, 15]] = np.nan
    ptr = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]))
    got = rank_normalise(torch.tensor(vals), ptr).numpy()
    for a, b in zip(ptr[:-1].tolist(), ptr[1:].tolist(), strict=True):
        v = vals[a:b]
        fin = np.isfinite(v)
        r = rankdata(v[fin])
        m = fin.sum()
        exp = np.zeros(m) if m == 1 else -1 + 2 * (r - 1) / (m - 1)
        np.testing.assert_allclose(got[a:b][fin], exp, atol=1e-6)
        assert np.isnan(got[a:b][~fin]).all()


def test_soft_spearman_masks_nan_and_degenerate_days() -> None:
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(12, generator=gen, requires_grad=True)
    target = torch.randn(12, generator=gen)
    target_nan = target.clone()
    target_nan[[0, 4]] = float("nan")
    keep = torch.ones(12, dtype=torch.bool)
    keep[[0, 4]] = False
    # masked nodes are simply left out
    torch.testing.assert_close(soft_spearman(pred, target_nan, 0.05), soft_spearman(pred[keep], target[keep], 0.05))
    ptr = torch.tensor([0, 1, 5, 12])  # day 0: one node; day 1: constant target
    tgt = target.clone()
    tgt[1:5] = 2.0
    rhos = soft_spearman_days(pred, tgt, ptr, 0.1)
    assert torch.isfinite(rhos).all() and rhos[0] == 0 and rhos[1] == 0
    # constant predictions: finite, and a finite gradient
    flat = torch.zeros(6, requires_grad=True)
    rho = soft_spearman(flat, torch.arange(6.0), 0.1)
    (g,) = torch.autograd.grad(rho, flat)
    assert torch.isfinite(rho) and torch.isfinite(g).all()


def _batch(day_sizes: list[int], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = sum(day_sizes)
    targets = torch.randn(n, len(TARGET_NAMES), generator=gen)
    return {"targets": targets,
            "day_ptr": torch.tensor([0, *np.cumsum(day_sizes).tolist()], dtype=torch.int64)}


def test_multi_horizon_loss_matches_definition() -> None:
    batch = _batch([6, 9], seed=2)
    batch["targets"][3, TARGET_NAMES.index("fwd_ret_5")] = float("nan")
    gen = torch.Generator().manual_seed(3)
    outputs = {f"ret_{h}": torch.randn(15, generator=gen, requires_grad=True) for h in (1, 5, 10, 20)}
    total, per_head = multi_horizon_rank_loss(outputs, batch, lam=0.7, tau=0.2)
    assert set(per_head) == {"ret_1", "ret_5", "ret_10", "ret_20"}
    torch.testing.assert_close(total, torch.stack(list(per_head.values())).mean())
    # ret_5 by hand: day means of MSE(rank-normalised target) + 0.7 (1 - soft Spearman), NaN node left out
    t = batch["targets"][:, TARGET_NAMES.index("fwd_ret_5")]
    o = outputs["ret_5"]
    days = []
    for a, b in ((0, 6), (6, 15)):
        tt, oo = t[a:b], o[a:b]
        m = torch.isfinite(tt)
        r = torch.tensor(rankdata(tt[m].numpy()), dtype=torch.float32)
        r = -1 + 2 * (r - 1) / (m.sum() - 1)
        days.append(((oo[m] - r) ** 2).mean() + 0.7 * (1 - soft_spearman(oo[m], tt[m], 0.2)))
    torch.testing.assert_close(per_head["ret_5"], torch.stack(days).mean())
    total.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in outputs.values())
    assert outputs["ret_5"].grad[3] == 0  # the node without a target gets no gradient


def test_loss_degenerate_days_are_finite() -> None:
    batch = _batch([1, 4, 3], seed=5)
    batch["targets"][1:5] = 0.5  # day 1: all-equal targets
    batch["targets"][5:8, :4] = float("nan")  # day 2: no fwd_ret target at all
    outputs = {f"ret_{h}": torch.zeros(8, requires_grad=True) for h in (1, 5, 10, 20)}
    total, _ = multi_horizon_rank_loss(outputs, batch)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(outputs["ret_1"].grad).all()
    # day 0 (one node, target rank 0) and day 1 (all tied, rank 0) have MSE 0 at zero outputs
    assert float(total.detach()) == 0.0


def test_hand_written_backward_matches_autograd() -> None:
    """The soft rank's hand-derived backward equals autograd on the plain pairwise expression."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(40, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(40, generator=gen, dtype=torch.float64)
    tau = 0.2

    def plain(v: torch.Tensor) -> torch.Tensor:
        vc = v - v.mean()
        z = vc / (vc.pow(2).mean() + 1e-8).sqrt()
        return 0.5 + torch.sigmoid((z.unsqueeze(1) - z.unsqueeze(0)) / tau).sum(dim=1)

    torch.testing.assert_close(soft_rank(x, tau), plain(x))
    (ours,) = torch.autograd.grad(soft_rank(x, tau), x, g)
    (ref,) = torch.autograd.grad(plain(x), x, g)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-8)
    small = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: soft_rank(v, 0.5), (small,))
