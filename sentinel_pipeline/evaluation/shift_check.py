"""Adversarial validation: can a classifier tell training rows from later rows (validation, test)?

A domain classifier (scikit-learn ``HistGradientBoostingClassifier``, small) learns "train" (0) vs
"later" (1) from the feature contract's features only: the ``seq``, ``snap``, ``ctx_cat`` and
``ctx_cont`` columns at the sample end rows of each split. Labels, targets, timestamps, symbols and
row ids are never features (timestamps and symbols only cut time blocks and measure trends).

- **Cross-validation by time blocks.** Each side's rows are cut into ``n_blocks`` contiguous blocks
  of time across the whole universe (equal row counts, by timestamp); fold ``f`` holds out the
  ``f``-th contiguous stretch of blocks of *both* sides. Neighbouring bars are near-duplicates, so
  random-row folds let the classifier recognise a held-out row by its neighbour and inflate the AUC
  (``sentinel_pipeline_tests/test_shift_check.py`` shows it on autocorrelated data).
- **AUC with a confidence interval** from a **block bootstrap over time blocks** (stratified: the
  blocks of each side are resampled with replacement, ``n_bootstrap`` times; percentile interval).
  Resampling blocks, not rows, keeps the autocorrelation inside a block. The bootstrap is exact and
  cheap: the out-of-fold pair counts between every train block and every later block are computed
  once (``_pair_counts``), and a resample's AUC is a weighted sum of them.
- **Drift per feature group**: the block-CV AUC of the same classifier on that group's columns alone.
- **Top features**: ``sklearn.inspection.permutation_importance`` (drop in ROC AUC) on each fold's
  held-out blocks, averaged over the folds.
- **Trending features**: a feature whose value is monotone in time on the training rows (the larger
  of ``|Spearman(value, time)|`` pooled and the median of it per symbol, at or above
  ``trend_threshold``) is named: price levels and cumulative counts give AUC ~1 trivially.

Everything here is report-only (the Dagster check in ``orchestration/shift_checks.py`` shows it);
nothing feeds back into training, feature selection or the gate.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy.stats import rankdata
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.inspection import permutation_importance
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

# the feature groups of the contract, in contract order (ctx_* are empty when context is off)
GROUPS: tuple[str, ...] = ("seq", "snap", "ctx_cat", "ctx_cont")
CI_METHOD = "stratified block bootstrap over time blocks (percentile)"


@dataclass(frozen=True)
class ShiftConfig:
    max_rows_per_side: int = 20_000  # deterministic subsample cap per side
    n_blocks: int = 20  # contiguous time blocks per side (CV folds and bootstrap units)
    n_folds: int = 5
    n_bootstrap: int = 1000
    ci_level: float = 0.95
    # the domain classifier: small on purpose (the check costs seconds)
    max_iter: int = 60
    max_leaf_nodes: int = 15
    learning_rate: float = 0.1
    n_top_features: int = 10
    permutation_repeats: int = 3
    permutation_max_rows: int = 2000  # held-out rows per fold that permutation importance scores
    trend_threshold: float = 0.8  # |Spearman(value, time)| at or above: "trending"
    seed: int = 0
    # OpenMP threads of the classifier (threadpoolctl); 1 keeps the check light on a shared machine, where
    # OpenMP threads spinning against other processes made it 3x slower; None: the library's default
    n_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.n_folds < 2 or self.n_blocks < self.n_folds:
            raise ValueError(f"need 2 <= n_folds <= n_blocks, got n_folds={self.n_folds} n_blocks={self.n_blocks}")
        if not 0 < self.ci_level < 1:
            raise ValueError(f"ci_level must lie in (0, 1), got {self.ci_level}")


class _SplitLike(Protocol):  # the parts of ``SplitArrays`` the check reads (labels/targets are not among them)
    seq: np.ndarray
    snap: np.ndarray
    ctx_cat: np.ndarray
    ctx_cont: np.ndarray
    symbol_idx: np.ndarray
    timestamp: np.ndarray
    sample_end_rows: np.ndarray
    feature_names: dict[str, list[str]]


@dataclass
class Side:
    """The features of one split at its sample end rows (``x``: float64, columns in contract order)."""

    x: np.ndarray
    names: list[str]
    groups: list[str]  # group of each column
    timestamp: np.ndarray  # int64 ns, for the time blocks and the trend test only
    symbol: np.ndarray  # for the per-symbol trend test only


def side_from_split(split: _SplitLike) -> Side:
    """The contract's feature columns at the sample end rows. Reads no label, target or row id."""
    rows = np.asarray(split.sample_end_rows, dtype=np.int64)
    cols, names, groups = [], [], []
    for g in GROUPS:
        mat = np.asarray(getattr(split, g))
        g_names = list(split.feature_names.get(g, []))
        if mat.ndim != 2 or mat.shape[1] != len(g_names):
            raise ValueError(f"group {g!r}: {mat.shape} columns vs {len(g_names)} names in the contract")
        if not g_names:
            continue
        cols.append(mat[rows].astype(np.float64))
        names += g_names
        groups += [g] * len(g_names)
    x = np.concatenate(cols, axis=1) if cols else np.empty((len(rows), 0))
    return Side(x, names, groups, np.asarray(split.timestamp)[rows].astype(np.int64),
                np.asarray(split.symbol_idx)[rows].astype(np.int64))


def _subsample(side: Side, cap: int, rng: np.random.Generator) -> Side:
    n = len(side.timestamp)
    idx = np.arange(n) if n <= cap else np.sort(rng.choice(n, size=cap, replace=False))
    # time order (rows come sorted by symbol): blocks are stretches of time across the universe
    idx = idx[np.argsort(side.timestamp[idx], kind="stable")]
    return Side(side.x[idx], side.names, side.groups, side.timestamp[idx], side.symbol[idx])


def time_blocks(n_rows: int, n_blocks: int) -> np.ndarray:
    """Block id 0..n_blocks-1 of each row of a time-sorted side: contiguous, (near) equal counts."""
    return (np.arange(n_rows) * n_blocks // max(n_rows, 1)).astype(np.int64)


def block_folds(blocks: np.ndarray, n_blocks: int, n_folds: int) -> np.ndarray:
    """Fold of each row: fold ``f`` is the ``f``-th contiguous stretch of blocks."""
    return blocks * n_folds // n_blocks


def _classifier(cfg: ShiftConfig) -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(max_iter=cfg.max_iter, max_leaf_nodes=cfg.max_leaf_nodes,
                                          learning_rate=cfg.learning_rate, early_stopping=False,
                                          random_state=cfg.seed)


def cross_val_scores(x: np.ndarray, y: np.ndarray, folds: np.ndarray, cfg: ShiftConfig,
                     importance: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Out-of-fold P(later) of every row; with ``importance`` also the mean permutation importance
    (drop in ROC AUC) per column over the folds' held-out rows."""
    scores = np.empty(len(y))
    imp = np.zeros((x.shape[1], 0)) if importance else None
    rng = np.random.default_rng(cfg.seed)
    for f in np.unique(folds):
        test = folds == f
        model = _classifier(cfg).fit(x[~test], y[~test])
        scores[test] = model.predict_proba(x[test])[:, 1]
        if importance and len(np.unique(y[test])) == 2:
            rows = np.flatnonzero(test)
            if len(rows) > cfg.permutation_max_rows:
                rows = np.sort(rng.choice(rows, cfg.permutation_max_rows, replace=False))
            r = permutation_importance(model, x[rows], y[rows], scoring="roc_auc",
                                       n_repeats=cfg.permutation_repeats, random_state=cfg.seed)
            imp = np.concatenate([imp, r.importances], axis=1)
    return scores, imp


def _pair_counts(scores: np.ndarray, y: np.ndarray, blocks: np.ndarray, n_blocks: int) -> np.ndarray:
    """``C[a, b]``: over pairs (later row of block b, train row of block a), the count of
    ``score_later > score_train`` plus half the ties (the Mann-Whitney numerator, per block pair)."""
    train = [np.sort(scores[(y == 0) & (blocks == a)]) for a in range(n_blocks)]
    later = [scores[(y == 1) & (blocks == b)] for b in range(n_blocks)]
    c = np.zeros((n_blocks, n_blocks))
    for a, t in enumerate(train):
        for b, s in enumerate(later):
            lo = np.searchsorted(t, s, side="left")
            hi = np.searchsorted(t, s, side="right")
            c[a, b] = lo.sum() + 0.5 * (hi - lo).sum()
    return c


def block_bootstrap_auc(scores: np.ndarray, y: np.ndarray, blocks: np.ndarray, n_blocks: int,
                        n_boot: int, level: float, seed: int) -> tuple[float, float, float]:
    """AUC and its percentile interval under a stratified bootstrap of the time blocks of each side."""
    c = _pair_counts(scores, y, blocks, n_blocks)
    n_train = np.bincount(blocks[y == 0], minlength=n_blocks).astype(float)
    n_later = np.bincount(blocks[y == 1], minlength=n_blocks).astype(float)
    auc = float(c.sum() / (n_train.sum() * n_later.sum()))
    rng = np.random.default_rng(seed)
    # multiplicity of each block in each resample (multinomial == drawing n_blocks with replacement)
    wa = rng.multinomial(n_blocks, np.full(n_blocks, 1 / n_blocks), size=n_boot).astype(float)
    wb = rng.multinomial(n_blocks, np.full(n_blocks, 1 / n_blocks), size=n_boot).astype(float)
    num = np.einsum("ra,ab,rb->r", wa, c, wb)
    den = (wa @ n_train) * (wb @ n_later)
    boot = num[den > 0] / den[den > 0]
    alpha = (1 - level) / 2
    return auc, float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))


def trend_scores(side: Side, min_rows_per_symbol: int = 20) -> np.ndarray:
    """Per column: max(|Spearman(value, time)| pooled, median over symbols of |Spearman| per symbol)."""
    def spearman_cols(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        rx = np.apply_along_axis(rankdata, 0, x)
        rt = rankdata(t)
        rx = rx - rx.mean(axis=0)
        rt = rt - rt.mean()
        den = np.sqrt((rx ** 2).sum(axis=0) * (rt ** 2).sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (rx * rt[:, None]).sum(axis=0) / den
        return np.nan_to_num(np.abs(r))

    x = np.nan_to_num(side.x, nan=0.0)
    if len(x) < 3 or x.shape[1] == 0:
        return np.zeros(x.shape[1])
    pooled = spearman_cols(x, side.timestamp)
    per = [spearman_cols(x[side.symbol == s], side.timestamp[side.symbol == s])
           for s in np.unique(side.symbol) if (side.symbol == s).sum() >= min_rows_per_symbol]
    per_symbol = np.median(np.stack(per), axis=0) if per else np.zeros_like(pooled)
    return np.maximum(pooled, per_symbol)


@dataclass
class ShiftReport:
    comparison: str  # e.g. "train_vs_val"
    auc: float
    ci_low: float
    ci_high: float
    n_train_rows: int
    n_later_rows: int
    n_blocks: int
    n_folds: int
    groups: list[dict[str, Any]] = field(default_factory=list)  # group, n_features, auc
    top_features: list[dict[str, Any]] = field(default_factory=list)  # feature, group, importance, std
    trending: list[dict[str, Any]] = field(default_factory=list)  # feature, group, spearman
    features_used: list[str] = field(default_factory=list)
    seconds: float = 0.0
    ci_method: str = CI_METHOD
    cv: str = "blocked K-fold over contiguous time blocks of each side"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_same_columns(a: Side, b: Side) -> None:
    if a.names != b.names or a.groups != b.groups:
        raise ValueError("the two splits carry different feature columns (different feature contracts)")


def adversarial_validation(train: Side, later: Side, cfg: ShiftConfig = ShiftConfig(),
                           comparison: str = "train_vs_later") -> ShiftReport:
    """Train (0) vs later (1) domain classifier, cross-validated by time blocks; see the module doc."""
    with threadpool_limits(limits=cfg.n_threads, user_api="openmp"):
        return _adversarial_validation(train, later, cfg, comparison)


def _adversarial_validation(train: Side, later: Side, cfg: ShiftConfig, comparison: str) -> ShiftReport:
    t0 = time.perf_counter()
    _check_same_columns(train, later)
    rng = np.random.default_rng(cfg.seed)
    a = _subsample(train, cfg.max_rows_per_side, rng)
    b = _subsample(later, cfg.max_rows_per_side, rng)
    n_blocks = min(cfg.n_blocks, len(a.timestamp), len(b.timestamp))
    n_folds = min(cfg.n_folds, n_blocks)
    if n_folds < 2:
        raise ValueError(f"too few rows for time-block CV: {len(a.timestamp)} train, {len(b.timestamp)} later")
    x = np.concatenate([a.x, b.x])
    y = np.concatenate([np.zeros(len(a.x), np.int8), np.ones(len(b.x), np.int8)])
    blocks = np.concatenate([time_blocks(len(a.x), n_blocks), time_blocks(len(b.x), n_blocks)])
    folds = block_folds(blocks, n_blocks, n_folds)

    scores, imp = cross_val_scores(x, y, folds, cfg, importance=True)
    auc, lo, hi = block_bootstrap_auc(scores, y, blocks, n_blocks, cfg.n_bootstrap, cfg.ci_level, cfg.seed)

    groups = []
    present = [g for g in GROUPS if g in train.groups]
    for g in present:
        cols = np.array([gg == g for gg in train.groups])
        if len(present) == 1:
            g_auc = auc
        else:
            g_scores, _ = cross_val_scores(x[:, cols], y, folds, cfg)
            g_auc = float(roc_auc_score(y, g_scores))
        groups.append({"group": g, "n_features": int(cols.sum()), "auc": g_auc})

    top = []
    if imp is not None and imp.shape[1]:
        mean, std = imp.mean(axis=1), imp.std(axis=1)
        for j in np.argsort(-mean, kind="stable")[: cfg.n_top_features]:
            top.append({"feature": train.names[j], "group": train.groups[j],
                        "importance": float(mean[j]), "std": float(std[j])})

    trend = trend_scores(a)
    trending = [{"feature": train.names[j], "group": train.groups[j], "spearman": float(trend[j])}
                for j in np.argsort(-trend, kind="stable") if trend[j] >= cfg.trend_threshold]
    return ShiftReport(comparison=comparison, auc=auc, ci_low=lo, ci_high=hi, n_train_rows=len(a.x),
                       n_later_rows=len(b.x), n_blocks=n_blocks, n_folds=n_folds, groups=groups,
                       top_features=top, trending=trending, features_used=list(train.names),
                       seconds=time.perf_counter() - t0)


def random_row_cv_auc(train: Side, later: Side, cfg: ShiftConfig = ShiftConfig()) -> float:
    """The same classifier under plain shuffled K-fold over rows (the inflated estimate; for comparison)."""
    rng = np.random.default_rng(cfg.seed)
    a = _subsample(train, cfg.max_rows_per_side, rng)
    b = _subsample(later, cfg.max_rows_per_side, rng)
    x = np.concatenate([a.x, b.x])
    y = np.concatenate([np.zeros(len(a.x), np.int8), np.ones(len(b.x), np.int8)])
    folds = rng.permutation(len(y)) % cfg.n_folds
    with threadpool_limits(limits=cfg.n_threads, user_api="openmp"):
        scores, _ = cross_val_scores(x, y, folds, cfg)
    return float(roc_auc_score(y, scores))


def shift_check(splits: dict[str, _SplitLike], cfg: ShiftConfig = ShiftConfig()) -> dict[str, ShiftReport]:
    """``train_vs_val`` and ``train_vs_test`` (where those splits are given and have sample rows)."""
    train = side_from_split(splits["train"])
    out = {}
    for later in ("val", "test"):
        if later in splits:
            side = side_from_split(splits[later])
            if len(side.timestamp) and len(train.timestamp):
                out[f"train_vs_{later}"] = adversarial_validation(train, side, cfg, f"train_vs_{later}")
    return out


def plot_shift(reports: dict[str, ShiftReport], path: Any, threshold: float | None = None) -> Any:
    """Bar charts into a PNG at ``path``: AUC [CI] and drift per group for each comparison, and the
    top features by permutation importance of each comparison."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sentinel_pipeline.atomic_io import atomic_path

    path = Path(path)
    names = list(reports)
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.2 * (1 + len(names)), 3.4), squeeze=False)
    ax = axes[0][0]
    labels = ["all"] + [g["group"] for g in next(iter(reports.values())).groups] if names else []
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        r = reports[name]
        vals = [r.auc] + [g["auc"] for g in r.groups]
        xs = np.arange(len(vals)) + i * width
        ax.bar(xs, vals, width, label=name)
        ax.errorbar(xs[:1], [r.auc], yerr=[[r.auc - r.ci_low], [r.ci_high - r.auc]], fmt="none", ecolor="k")
    ax.axhline(0.5, color="grey", lw=0.8)
    if threshold is not None:
        ax.axhline(threshold, color="red", lw=0.8, ls="--", label="threshold")
    ax.set_xticks(np.arange(len(labels)) + width * (len(names) - 1) / 2, labels)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("domain AUC (time-block CV)")
    ax.set_title("AUC and drift per group")
    ax.legend(fontsize="small")
    for ax, name in zip(axes[0][1:], names, strict=True):
        top = reports[name].top_features[::-1]
        ax.barh([t["feature"] for t in top], [t["importance"] for t in top], xerr=[t["std"] for t in top])
        ax.set_title(f"{name}: permutation importance")
        ax.set_xlabel("drop in AUC")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path
