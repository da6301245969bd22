"""Linear-probe readout: does a frozen representation carry 3D pose at all?

A ridge regression from frozen per-frame features to the 17 root-relative camera-frame joints,
fit on the train (gallery) frames and scored on the query frames. Retrieval asks whether pose
*dominates* the features (nearest neighbours must match in pose); the probe asks whether pose
is *present* (linearly readable), so the two together tell "no pose information" from "pose
information present but not dominant".

Nothing is tuned on the query frames: the ridge strength is chosen by cross-validation over
train clips (each fold holds out whole clips, as the query split does), then the probe is refit
on every train frame. Features are standardised with train statistics; closed form, float64.
"""

from __future__ import annotations

import numpy as np

from finetune.evaluation import metrics
from finetune.evaluation.embed import Embeddings

LAMBDAS = tuple(10.0**e for e in range(-2, 8))
"""Ridge strengths tried (on standardised features, per train frame summed)."""


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (x - mean) / std


def ridge_fit(x: np.ndarray, y: np.ndarray, lambdas) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each lambda, weights (D, K) and bias (K,) minimising |x W + b - y|^2 + lam |W|^2
    (the bias is not penalised); one Gram matrix serves every lambda."""
    xm, ym = x.mean(0), y.mean(0)
    xc = x - xm
    gram, rhs = xc.T @ xc, xc.T @ (y - ym)
    eye = np.eye(x.shape[1])
    out = []
    for lam in lambdas:
        w = np.linalg.solve(gram + lam * eye, rhs)
        out.append((w, ym - xm @ w))
    return out


def _folds(clips: np.ndarray, count: int) -> list[np.ndarray]:
    """Boolean masks of held-out rows: the train clips dealt into ``count`` groups."""
    names = sorted(set(clips.tolist()))
    count = min(count, len(names))
    return [np.isin(clips, names[i::count]) for i in range(count)]


def ridge_probe(train: Embeddings, query: Embeddings, lambdas=LAMBDAS, folds: int = 5) -> dict:
    """Fit on ``train`` (lambda by clip-wise cross-validation), score on ``query``: MPJPE and
    P-MPJPE (mm) of the probe, the chosen lambda and each lambda's cross-validated MPJPE."""
    if len(train) == 0 or len(query) == 0:
        raise ValueError("the linear probe needs train and query frames")
    x = train.vectors.astype(np.float64)
    mean, std = x.mean(0), np.maximum(x.std(0), 1e-8)
    x = _standardise(x, mean, std)
    y = train.pose3d.reshape(len(train), -1).astype(np.float64)  # (N, J*3)
    masks = _folds(train.clips, folds)
    errors: dict[float, list[np.ndarray]] = {lam: [] for lam in lambdas}
    for held in masks if len(masks) > 1 else []:  # one train clip: nothing to validate on
        for lam, (w, b) in zip(lambdas, ridge_fit(x[~held], y[~held], lambdas), strict=True):
            pred = (x[held] @ w + b).reshape(-1, *train.pose3d.shape[1:])
            errors[lam].append(metrics.mpjpe(pred, train.pose3d[held].astype(np.float64),
                                             reduce="none"))  # fmt: skip
    cv = {lam: float(np.concatenate(e).mean()) if e else float("nan") for lam, e in errors.items()}
    finite = {lam: e for lam, e in cv.items() if np.isfinite(e)}
    best = min(finite, key=finite.get) if finite else float(np.median(lambdas))
    w, b = ridge_fit(x, y, [best])[0]
    q = _standardise(query.vectors.astype(np.float64), mean, std)
    pred = (q @ w + b).reshape(-1, *query.pose3d.shape[1:])
    target = query.pose3d.astype(np.float64)
    return {
        "mpjpe": float(metrics.mpjpe(pred, target)),
        "p_mpjpe": float(metrics.p_mpjpe(pred, target)),
        "lambda": best,
        "cv_mpjpe": {f"{lam:g}": e for lam, e in cv.items()},
        "folds": len(masks),
    }
