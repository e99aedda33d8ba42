"""Linear probes of frozen features: a multinomial logistic regression (L-BFGS on standardised
features, L2 on the weights) trained on a class-stratified share of the labels, scored on held-out
features. ``medalloy probe`` and ``benchmarks/pretrain.py`` score a pretrained encoder with it.

Hand-written in torch rather than taken from scikit-learn (not a dependency): the probe's numbers
are those of this solver (torch's L-BFGS with a strong-Wolfe line search, 200 iterations at most).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medalloy.engine.metrics import balanced_accuracy


def linear_probe(
    train_x: torch.Tensor,
    train_y: np.ndarray,
    test_x: torch.Tensor,
    test_y: np.ndarray,
    fraction: float = 1.0,
    seed: int = 0,
    weight_decay: float = 1e-3,
    balanced: bool = False,
) -> float:
    """Accuracy (``balanced``: :func:`~medalloy.engine.metrics.balanced_accuracy`) of a multinomial
    logistic regression (L-BFGS, standardised features) trained on a class-stratified ``fraction`` of
    the training set (at least one example a class): :func:`probe_predictions`."""
    pred, _ = probe_predictions(train_x, train_y, test_x, fraction, seed, weight_decay)
    return balanced_accuracy(pred, test_y) if balanced else float(np.mean(pred == test_y))


def probe_predictions(
    train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, fraction: float = 1.0, seed: int = 0, weight_decay: float = 1e-3
) -> tuple[np.ndarray, int]:
    """The test set's predicted classes by the logistic regression of :func:`linear_probe`, and how
    many training labels it learnt from. ``train_x`` ``(N, C)``, ``train_y`` ``(N,)``, ``test_x`` ``(M, C)``
    -> classes ``(M,)`` (of ``train_y``'s kind)."""
    classes = sorted(set(train_y.tolist()))
    index = {c: i for i, c in enumerate(classes)}
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        idx = np.flatnonzero(train_y == c)
        chosen.extend(rng.choice(idx, max(1, int(round(fraction * len(idx)))), replace=False).tolist())
    chosen = np.sort(np.asarray(chosen))
    x = train_x[chosen].double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6) if len(chosen) > 1 else torch.ones(x.shape[1], dtype=x.dtype)
    x = (x - mean) / std
    y = torch.tensor([index[c] for c in train_y[chosen]])
    w = torch.zeros(x.shape[1], len(classes), dtype=x.dtype, requires_grad=True)
    b = torch.zeros(len(classes), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = np.array([classes[p] for p in ((test_x.double() - mean) / std @ w + b).argmax(1).numpy()])
    return pred, len(chosen)


def probe_scores(
    train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray, fractions: Sequence[float], seed: int = 0
) -> list[dict[str, Any]]:
    """One row a label fraction: the fraction, how many labels the probe learnt from, its accuracy and
    balanced accuracy on the test set (:func:`probe_predictions`)."""
    scores = []
    for fraction in fractions:
        pred, used = probe_predictions(train_x, train_y, test_x, float(fraction), seed)
        scores.append(
            {"fraction": float(fraction), "labels": used, "accuracy": float(np.mean(pred == test_y)), "balanced_accuracy": balanced_accuracy(pred, test_y)}
        )
    return scores
