"""Stage 5: seq/snap feature scalers, fitted on train rows with valid features only.

Each of the two scaled groups (``seq`` and ``snap``; the context groups are not scaled) gets a
:class:`ClippedRobustScaler`: sklearn's :class:`~sklearn.preprocessing.RobustScaler` (median
centring, divided by the **inter-quartile range, quantile_range=(25, 75)**) followed by clipping to
``±clip`` (default 5). The IQR is the classic robust spread and is insensitive to the fat tails of
return-like features; for a Gaussian feature one unit is about 0.74 standard deviations, so the
default clip only touches values beyond roughly 6.7 sigma. Constant features get scale 1 (sklearn's
rule), a group with zero features is the identity on an ``(N, 0)`` array.

Leakage rule: only rows with ``split == "train"`` and ``feature_valid`` influence the fitted
parameters; val/test rows (and invalid warm-up rows) are never looked at.

Files (``save_scalers``/``load_scalers``): ``scalers.json`` (fit window, row count, feature names,
contract hash, clip, quantile range, the fitted centre/scale per feature, sklearn version) is the
**source of truth**: :func:`load_scalers` rebuilds both scalers from it (plain JSON, no pickle: a file
planted by someone who can write the directory cannot run code). ``seq_scaler.joblib`` and
``snap_scaler.joblib`` are still written, for users who want a ready scikit-learn object; no code of
this package unpickles them. ``load_scalers`` refuses files written for another feature contract and
parameters that do not describe a valid scaler (wrong width, non-finite, scale <= 0).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import sklearn
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.preprocessing import RobustScaler

from sentinel_pipeline.atomic_io import atomic_path, write_json_atomic
from sentinel_pipeline.data.dataset import LabelledDataset
from sentinel_pipeline.data.feature_contract import ContractError, FeatureContract
from sentinel_pipeline.safe_read import UnsafeFileError, read_regular

SCALED_GROUPS: tuple[str, ...] = ("seq", "snap")
DEFAULT_CLIP = 5.0
QUANTILE_RANGE: tuple[float, float] = (25.0, 75.0)
SCALER_FILES: dict[str, str] = {"seq": "seq_scaler.joblib", "snap": "snap_scaler.joblib"}
INFO_FILE = "scalers.json"


class ClippedRobustScaler(TransformerMixin, BaseEstimator):
    """``RobustScaler(quantile_range)`` then ``clip(-clip, clip)``; ``transform`` returns float32 (computed in float32).

    NaN passes through ``transform`` unchanged (sklearn semantics); use :func:`transform_filled`
    to get a NaN-free result. Fitting on an ``(n, 0)`` array gives the identity on zero columns.
    """

    def __init__(self, quantile_range: tuple[float, float] = QUANTILE_RANGE, clip: float = DEFAULT_CLIP):
        self.quantile_range = quantile_range
        self.clip = clip

    def fit(self, X: np.ndarray, y: Any = None) -> ClippedRobustScaler:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"expected a 2-D array, got shape {X.shape}")
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        self.n_features_in_ = int(X.shape[1])
        if self.n_features_in_ == 0:
            self.center_ = np.zeros(0, dtype=np.float64)
            self.scale_ = np.ones(0, dtype=np.float64)
            return self
        if X.shape[0] == 0:
            raise ValueError("cannot fit a scaler on zero rows")
        X = X.astype(np.float64, copy=False)
        self.center_, self.scale_ = robust_parameters(X, self.quantile_range)
        return self

    def _check_width(self, X: np.ndarray) -> None:
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"expected shape (n, {self.n_features_in_}), got {X.shape}")

    def _scale_inplace(self, out: np.ndarray) -> None:
        # float32 arithmetic: exact enough for features and half the memory of float64 on big splits
        out -= self.center_.astype(np.float32)
        out /= self.scale_.astype(np.float32)
        np.clip(out, -self.clip, self.clip, out=out)

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        self._check_width(X)
        out = X.astype(np.float32)
        self._scale_inplace(out)
        return out


# below this many rows sklearn's own fit is used as is: NumPy's nanmedian takes another path for short
# columns (masked arrays), and the cost does not matter there
_ONE_PASS_MIN_ROWS = 600


def robust_parameters(X: np.ndarray, quantile_range: tuple[float, float] = QUANTILE_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """The ``center_`` and ``scale_`` of ``RobustScaler(quantile_range).fit(X)`` for a float64 ``X``,
    bit for bit, from one pass of selections per column.

    sklearn computes them with ``np.nanmedian(X, axis=0)`` and one ``np.nanpercentile(column, q)`` per
    column: each copies the column (to drop NaNs) and partitions it again. For a finite column the
    median is ``np.median`` (``mean`` of the one or two middle order statistics) and each percentile
    NumPy's ``linear`` method (``_lerp`` of the order statistics at ``floor((n - 1) q / 100)`` and the
    next). Here the order statistics all of them need are found in one go on one copy of the column
    (:func:`_order_statistics`) and combined with the same NumPy operations, so the values are identical
    (``test_scalers`` checks this against ``RobustScaler``). A column where one of them is zero goes to
    ``RobustScaler`` itself: which of two tied zeros (0.0 and -0.0) lands in the middle depends on the
    partition algorithm, and the sign must be sklearn's. Short or non-finite inputs also go to
    ``RobustScaler``. Written by hand because neither NumPy nor sklearn gives a median and percentiles
    from one selection; columns run in threads (``np.partition`` releases the GIL).
    """
    n, width = X.shape
    if n < _ONE_PASS_MIN_ROWS or X.dtype != np.float64 or not np.isfinite(X).all():
        return _sklearn_parameters(X, quantile_range)
    # NumPy's linear percentile: virtual index (n - 1) * q, its floor and the next position
    q = np.true_divide(tuple(quantile_range), 100)
    virtual = (n - 1) * q
    previous = np.floor(virtual)
    following = previous + 1
    above = virtual >= n - 1
    previous[above] = -1
    following[above] = -1
    previous, following = previous.astype(np.intp), following.astype(np.intp)
    gamma = np.asanyarray(virtual - previous, dtype=virtual.dtype)
    half = n // 2
    middle = [half - 1, half] if n % 2 == 0 else [half]
    positions = sorted({*middle, *(int(p) % n for p in previous), *(int(p) % n for p in following)})

    scratch = threading.local()  # one column buffer per thread: fresh 56 MB arrays cost page faults

    def one(j: int) -> tuple[float, float] | None:
        if getattr(scratch, "column", None) is None:
            scratch.column = np.empty(n, dtype=np.float64)
        np.copyto(scratch.column, X[:, j])
        stats = _order_statistics(scratch.column, positions)
        if any(v == 0.0 for v in stats.values()):
            return None  # tied zeros: see above
        center = np.mean(np.array([stats[p] for p in middle]))  # as np.median
        a = np.array([stats[int(p) % n] for p in previous])
        b = np.array([stats[int(p) % n] for p in following])
        diff = b - a  # as NumPy's _lerp
        lerp = np.add(a, diff * gamma)
        np.subtract(b, diff * (1 - gamma), out=lerp, where=gamma >= 0.5, casting="unsafe", dtype=lerp.dtype)
        return float(center), float(lerp[1] - lerp[0])

    with ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, width))) as pool:
        results = list(pool.map(one, range(width)))
    center = np.empty(width, dtype=np.float64)
    scale = np.empty(width, dtype=np.float64)
    for j, r in enumerate(results):
        if r is None:
            c, s = _sklearn_parameters(X[:, j : j + 1], quantile_range)
            center[j], scale[j] = c[0], s[0]
        else:
            center[j], scale[j] = r
            if scale[j] < 10 * np.finfo(np.float64).eps:  # sklearn's _handle_zeros_in_scale
                scale[j] = 1.0
    return center, scale


def _sklearn_parameters(X: np.ndarray, quantile_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    fitted = RobustScaler(quantile_range=tuple(quantile_range)).fit(X)
    return np.asarray(fitted.center_, dtype=np.float64), np.asarray(fitted.scale_, dtype=np.float64)


def _order_statistics(values: np.ndarray, positions: list[int], offset: int = 0) -> dict[int, float]:
    """``{p: sorted(values)[p - offset]}`` for sorted, distinct ``positions``; reorders ``values``.

    One ``partition`` with a single kth at the middle position, then the same on the part below and the
    part above it for the positions on either side: NumPy's single-kth partition (SIMD-accelerated) was
    5-10x faster on 7M values than one partition on all six positions at once.
    """
    if not positions:
        return {}
    k = positions[len(positions) // 2]
    values.partition(k - offset)
    out = {k: float(values[k - offset])}
    out.update(_order_statistics(values[: k - offset], [p for p in positions if p < k], offset))
    out.update(_order_statistics(values[k - offset + 1 :], [p for p in positions if p > k], k + 1))
    return out


def transform_filled(scaler: ClippedRobustScaler, X: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Scale ``X`` and replace every non-finite result (from NaN/inf inputs) with ``fill``; float32."""
    out = np.array(X, dtype=np.float32)
    transform_filled_inplace(scaler, out, fill)
    return out


def transform_filled_inplace(scaler: ClippedRobustScaler, X: np.ndarray, fill: float = 0.0) -> None:
    """:func:`transform_filled` written into ``X`` itself (a float32 array): same values, no copies."""
    if X.dtype != np.float32:
        raise TypeError(f"expected a float32 array, got {X.dtype}")
    scaler._check_width(X)
    bad = ~np.isfinite(X)
    X[bad] = 0.0
    scaler._scale_inplace(X)
    X[bad] = fill


@dataclass
class FittedScalers:
    seq: ClippedRobustScaler
    snap: ClippedRobustScaler
    info: dict[str, Any]

    def scaler(self, group: str) -> ClippedRobustScaler:
        if group not in SCALED_GROUPS:
            raise KeyError(f"no scaler for group {group!r}; scaled groups are {SCALED_GROUPS}")
        return self.seq if group == "seq" else self.snap


def _iso(ts: pd.Timestamp) -> str:
    return pd.Timestamp(ts).isoformat()


def _fit_rows(index: pd.DataFrame, n_rows: int, assignment: pd.DataFrame) -> np.ndarray:
    """The rows the scalers are fitted on (``split == "train"`` and ``feature_valid``), checked."""
    if n_rows != len(assignment):
        raise ValueError(f"dataset has {n_rows} rows but the split assignment has {len(assignment)}")
    for col in ("feature_valid", "timestamp"):
        if col not in index.columns:
            raise ValueError(f"dataset lacks column {col!r}")
    if "split" not in assignment.columns:
        raise ValueError("split assignment lacks column 'split'")
    # a vectorised comparison (no per-row Python strings for a str column)
    mask = (assignment["split"] == "train").to_numpy(dtype=bool) & index["feature_valid"].to_numpy(dtype=bool)
    rows = np.flatnonzero(mask)
    if rows.size == 0:
        raise ValueError("no train rows with valid features: cannot fit scalers")
    return rows


def _fit(
    contract: FeatureContract,
    dataset_columns: list[str],
    rows: np.ndarray,
    timestamps: pd.Series,
    fill: Callable[[list[str], np.ndarray], None],
    clip: float,
) -> FittedScalers:
    """Fit both scalers on the fit rows; ``fill(names, X)`` writes the fit rows of those columns into X.

    ``X`` is float64 and column-major (the robust scaler takes its quantiles one column at a time),
    and one buffer serves both groups.
    """
    width = max(len(contract.names(g)) for g in SCALED_GROUPS)
    buffer = np.empty((rows.size, width), dtype=np.float64, order="F")
    fitted: dict[str, ClippedRobustScaler] = {}
    for group in SCALED_GROUPS:
        names = contract.names(group)
        missing = [n for n in names if n not in dataset_columns]
        if missing:
            raise ContractError(f"dataset lacks {group} features of contract {contract.hash}: {missing}")
        X = buffer[:, : len(names)]
        fill(names, X)
        if not np.isfinite(X).all():
            raise ValueError(f"non-finite {group} feature values on train rows flagged feature_valid")
        fitted[group] = ClippedRobustScaler(quantile_range=QUANTILE_RANGE, clip=clip).fit(X)
        fitted[group].feature_contract_hash_ = contract.hash
    del buffer
    ts = timestamps.iloc[rows]
    info: dict[str, Any] = {
        "feature_contract_hash": contract.hash,
        "fit_split": "train",
        "fit_start": _iso(ts.min()),
        "fit_end": _iso(ts.max()),
        "n_rows": int(rows.size),
        "clip": float(clip),
        "quantile_range": list(QUANTILE_RANGE),
        "feature_names": {g: contract.names(g) for g in SCALED_GROUPS},
        "center": {g: fitted[g].center_.tolist() for g in SCALED_GROUPS},
        "scale": {g: fitted[g].scale_.tolist() for g in SCALED_GROUPS},
        "sklearn_version": sklearn.__version__,
    }
    return FittedScalers(seq=fitted["seq"], snap=fitted["snap"], info=info)


def fit_scalers(
    dataset: pd.DataFrame, assignment: pd.DataFrame, contract: FeatureContract, clip: float = DEFAULT_CLIP
) -> FittedScalers:
    """Fit the seq and snap scalers on rows with ``split == "train"`` and ``feature_valid``."""
    rows = _fit_rows(dataset, len(dataset), assignment)

    def fill(names: list[str], X: np.ndarray) -> None:  # gather, then widen to float64 (exact)
        for j, name in enumerate(names):
            values = dataset[name].to_numpy()
            X[:, j] = (values if values.dtype.kind == "f" else dataset[name].to_numpy(dtype=np.float64))[rows]

    return _fit(contract, list(dataset.columns), rows, dataset["timestamp"], fill, clip)


def fit_scalers_from_dataset(
    dataset: LabelledDataset, assignment: pd.DataFrame, contract: FeatureContract, clip: float = DEFAULT_CLIP
) -> FittedScalers:
    """:func:`fit_scalers` for the labelled dataset on disk (features + labels side by side, same result):
    one feature column at a time is mapped and only its fit rows are gathered. ``assignment`` needs
    ``split``. Errors name the features file."""
    where = dataset.features_path
    index = dataset.frame([c for c in ("timestamp", "feature_valid") if c in dataset.names])
    try:
        rows = _fit_rows(index, dataset.num_rows, assignment)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc

    def fill(names: list[str], X: np.ndarray) -> None:
        for j, name in enumerate(names):  # nulls -> NaN, as pandas reads them
            values = dataset.column(name)
            if values.dtype == np.float64:
                np.take(values, rows, out=X[:, j])
            else:
                X[:, j] = values[rows]
            del values  # unmaps the column's pages

    try:
        return _fit(contract, dataset.names, rows, index["timestamp"], fill, clip)
    except ValueError as exc:  # ContractError included: same type, message names the file
        raise type(exc)(f"{where}: {exc}") from exc


def save_scalers(directory: str | Path, fitted: FittedScalers) -> dict[str, Path]:
    """Write ``seq_scaler.joblib``, ``snap_scaler.joblib`` and ``scalers.json`` atomically."""
    directory = Path(directory)
    paths: dict[str, Path] = {}
    for group in SCALED_GROUPS:
        target = directory / SCALER_FILES[group]
        with atomic_path(target) as tmp:
            joblib.dump(fitted.scaler(group), tmp)
        paths[group] = target
    paths["info"] = write_json_atomic(directory / INFO_FILE, fitted.info)
    return paths


def scaler_from_info(info: dict[str, Any], group: str, where: str = INFO_FILE) -> ClippedRobustScaler:
    """Rebuild one group's fitted scaler from the parameters in ``scalers.json`` (no pickle)."""
    try:
        names = list(info["feature_names"][group])
        center = np.asarray(info["center"][group], dtype=np.float64)
        scale = np.asarray(info["scale"][group], dtype=np.float64)
        clip = float(info["clip"])
        quantile_range = tuple(float(q) for q in info.get("quantile_range", QUANTILE_RANGE))
    except (KeyError, TypeError, ValueError) as exc:
        raise ContractError(f"{where}: no valid {group} scaler parameters: {exc!r}") from exc
    problems = []
    if center.shape != (len(names),) or scale.shape != (len(names),):
        problems.append(f"{group} centre/scale have {center.size}/{scale.size} values for {len(names)} features")
    elif not (np.isfinite(center).all() and np.isfinite(scale).all() and (scale > 0).all()):
        problems.append(f"{group} centre/scale are not finite with scale > 0")
    if not (np.isfinite(clip) and clip > 0):
        problems.append(f"clip {clip!r} is not a finite number > 0")
    if problems:
        raise ContractError(f"{where}: " + "; ".join(problems))
    scaler = ClippedRobustScaler(quantile_range=quantile_range, clip=clip)
    scaler.n_features_in_ = len(names)
    scaler.center_ = center
    scaler.scale_ = scale
    scaler.feature_contract_hash_ = info.get("feature_contract_hash")
    return scaler


def read_scaler_info(path: str | Path) -> dict[str, Any]:
    """``scalers.json`` as a dict (a regular file, not a symlink); ``ContractError`` naming it otherwise."""
    path = Path(path)
    try:
        info = json.loads(read_regular(path, 64 << 20))
    except (OSError, UnsafeFileError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContractError(f"{path}: cannot read scaler info: {exc}") from exc
    if not isinstance(info, dict):
        raise ContractError(f"{path}: expected a JSON object")
    return info


def scaler_parameter_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """How two ``scalers.json`` contents differ in what scaling depends on (contract hash, feature
    names, clip, quantile range, centre and scale per group); an empty list means they scale alike."""
    out = []
    for key in ("feature_contract_hash", "clip", "quantile_range", "feature_names"):
        if a.get(key) != b.get(key):
            out.append(f"{key} {a.get(key)!r} != {b.get(key)!r}")
    for key in ("center", "scale"):
        for group in SCALED_GROUPS:
            x = np.asarray((a.get(key) or {}).get(group, []), dtype=np.float64)
            y = np.asarray((b.get(key) or {}).get(group, []), dtype=np.float64)
            if x.shape != y.shape:
                out.append(f"{group} {key} has {x.size} vs {y.size} values")
            elif not np.array_equal(x, y):
                out.append(f"{group} {key} differs by up to {float(np.max(np.abs(x - y))):.6g}")
    return out


def load_scalers(
    directory: str | Path, expected_hash: str, contract: FeatureContract | None = None
) -> FittedScalers:
    """Rebuild the scalers written by :func:`save_scalers` from ``scalers.json`` (the joblib files are
    never unpickled), refusing a contract hash other than ``expected_hash``.

    The feature names of each group are checked, when ``contract`` is given, against it (whose hash
    must then also equal ``expected_hash``).
    """
    directory = Path(directory)
    info_path = directory / INFO_FILE
    info = read_scaler_info(info_path)
    stated = info.get("feature_contract_hash")
    if stated != expected_hash:
        raise ContractError(f"{info_path}: scalers were fitted for feature contract {stated}, expected {expected_hash}")
    if contract is not None and contract.hash != expected_hash:
        raise ContractError(f"contract passed to load_scalers has hash {contract.hash}, expected {expected_hash}")
    scalers: dict[str, ClippedRobustScaler] = {}
    for group in SCALED_GROUPS:
        scaler = scaler_from_info(info, group, str(info_path))
        names = info["feature_names"][group]
        if contract is not None and list(names) != contract.names(group):
            raise ContractError(
                f"{info_path}: {len(names)} {group} features {names} differ from contract {expected_hash}: "
                f"{len(contract.names(group))} features {contract.names(group)}"
            )
        scalers[group] = scaler
    return FittedScalers(seq=scalers["seq"], snap=scalers["snap"], info=info)
