"""The multi-horizon rank loss of the graph family: per day and horizon, MSE + lambda * (1 - soft Spearman).

For horizon h (output ``ret_h``, target column ``fwd_ret_h`` of ``batch["targets"]``, in
``split_arrays.TARGET_NAMES`` order) and day d, over the day's nodes with a finite target:

    L_dh = mean_i (out_i - r_i)^2 + lam * (1 - soft_spearman(out, target; tau))

where ``r`` is the target rank-normalised within the day to [-1, 1] (:func:`soft_rank.rank_normalise`).
The rank term is left out of a day with fewer than two valid nodes or a constant target (Spearman is
undefined there); a day without any valid node is left out of the horizon's mean. Per horizon the loss
is the mean over its days; the total is the **mean** over horizons (so its scale does not grow with
the number of horizons and stays comparable to a single-head loss).
"""

from __future__ import annotations

import torch

from sentinel_pipeline.data.split_arrays import TARGET_NAMES
from sentinel_pipeline.training.layers.soft_rank import rank_normalise, soft_spearman

DEFAULT_HORIZONS: tuple[int, ...] = (1, 5, 10, 20)
DEFAULT_LAMBDA = 1.0
DEFAULT_TAU = 0.1


def head_name(h: int) -> str:
    return f"ret_{h}"


def target_column(h: int) -> int:
    """Column of ``fwd_ret_h`` in ``batch["targets"]``."""
    name = f"fwd_ret_{h}"
    if name not in TARGET_NAMES:
        raise ValueError(f"rank loss: no target {name!r} in TARGET_NAMES {TARGET_NAMES}")
    return TARGET_NAMES.index(name)


def rank_targets(batch: dict[str, torch.Tensor], horizons: tuple[int, ...] = DEFAULT_HORIZONS
                 ) -> dict[str, torch.Tensor]:
    """The rank-normalised targets per head (NaN where the raw target is NaN)."""
    day_ptr = batch["day_ptr"]
    return {head_name(h): rank_normalise(batch["targets"][:, target_column(h)], day_ptr) for h in horizons}


def multi_horizon_rank_loss(
    outputs: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    horizons: tuple[int, ...] = DEFAULT_HORIZONS,
    lam: float = DEFAULT_LAMBDA,
    tau: float = DEFAULT_TAU,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(total, {"ret_h": loss_h})``; see the module docstring. Differentiable in ``outputs``."""
    if not horizons:
        raise ValueError("rank loss: no horizons")
    targets, day_ptr = batch["targets"], batch["day_ptr"]
    bounds = day_ptr.tolist()
    per_head: dict[str, torch.Tensor] = {}
    for h in horizons:
        name = head_name(h)
        if name not in outputs:
            raise ValueError(f"rank loss: the model output has no head {name!r} (has {sorted(outputs)})")
        out = outputs[name]
        raw = targets[:, target_column(h)]
        r = rank_normalise(raw, day_ptr)
        day_losses = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            valid = torch.isfinite(raw[a:b])
            n_valid = int(valid.sum())
            if n_valid == 0:
                continue
            o, t = out[a:b][valid], raw[a:b][valid]
            loss = (o - r[a:b][valid]).pow(2).mean()
            if lam and n_valid >= 2 and bool(t.max() > t.min()):
                loss = loss + lam * (1.0 - soft_spearman(o, t, tau))
            day_losses.append(loss)
        per_head[name] = torch.stack(day_losses).mean() if day_losses else 0.0 * out.sum()
    total = torch.stack(list(per_head.values())).mean()
    return total, per_head
