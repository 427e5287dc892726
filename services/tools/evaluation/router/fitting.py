"""Fits the router's logistic heads (numpy, Newton's method with an L2 penalty).

Two heads over [embedding, standardised shape features]: P(large model right) and P(small
model right); the score is their difference. Two more over the shape alone score a request
whose embedding could not be had. Out-of-fold scores (k folds of the fit half, seeded) give
the calibration an honest view of scores on prompts the heads never saw.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from services.router.routing.model import Head, RouterModel

Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

L2 = 3.0  # the penalty; 5-fold APGR on the fit half: 0.624 at 1, 0.637 at 3
FOLDS = 5
FOLD_SEED = 13


def fit_head(x: Floats, y: Bools, l2: float = L2, iterations: int = 25) -> Head:
    """Logistic regression (bias unpenalised) by Newton's method."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    beta = np.zeros(xb.shape[1])
    penalty = l2 * np.eye(xb.shape[1])
    penalty[-1, -1] = 0.0
    target = y.astype(np.float64)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ beta, -50, 50)))
        gradient = xb.T @ (p - target) + penalty @ beta
        hessian = (xb * (p * (1 - p))[:, None]).T @ xb + penalty
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if float(np.max(np.abs(step))) < 1e-6:
            break
    return Head(beta[:-1].copy(), float(beta[-1]))


def shape_bounds(shape: Floats) -> tuple[Floats, Floats]:
    """Each standardised shape feature's least and greatest over the fit half: the range the
    model clips a request's features to (the heads never saw beyond it)."""
    low: Floats = shape.min(axis=0).astype(np.float64)
    high: Floats = shape.max(axis=0).astype(np.float64)
    return low, high


def fit_model(
    vectors: npt.NDArray[np.float32],
    shapes: npt.NDArray[np.float32],
    weak: Bools,
    strong: Bools,
    embedder: str,
    l2: float = L2,
) -> RouterModel:
    mean = shapes.mean(axis=0).astype(np.float64)
    scale = shapes.std(axis=0).astype(np.float64)
    scale[scale <= 1e-9] = 1.0
    shape = (shapes - mean) / scale
    low, high = shape_bounds(shape)
    x = np.hstack([vectors.astype(np.float64), shape])
    return RouterModel(
        embedder=embedder,
        dim=vectors.shape[1],
        shape_mean=mean,
        shape_scale=scale,
        shape_low=low,
        shape_high=high,
        large=fit_head(x, strong, l2),
        small=fit_head(x, weak, l2),
        large_shape=fit_head(shape, strong, l2),
        small_shape=fit_head(shape, weak, l2),
        sha256="",
    )


def scores(model: RouterModel, texts: list[str], vectors: npt.NDArray[np.float32]) -> Floats:
    return np.array([model.score(t, v) for t, v in zip(texts, vectors, strict=True)])


def out_of_fold_scores(
    texts: list[str],
    vectors: npt.NDArray[np.float32],
    shapes: npt.NDArray[np.float32],
    weak: Bools,
    strong: Bools,
    embedder: str,
    folds: int = FOLDS,
) -> Floats:
    """Each prompt scored by heads fitted on the other folds."""
    fold = np.random.default_rng(FOLD_SEED).permutation(len(texts)) % folds
    out = np.zeros(len(texts))
    for k in range(folds):
        train, test = fold != k, fold == k
        model = fit_model(vectors[train], shapes[train], weak[train], strong[train], embedder)
        picked = np.nonzero(test)[0]
        out[picked] = scores(model, [texts[i] for i in picked], vectors[picked])
    return out
