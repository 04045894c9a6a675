"""Clip-level metrics of a tagger over a whole evaluation split.

Computed in float64 numpy from every clip's scores at once (never averaged over batches), after
the rows of all hosts are gathered and put in clip-id order, so 1 and N hosts give the same bits.

* ``average_precision``: per class, the area under the step-wise precision-recall curve with one
  point per distinct score (ties grouped), as AudioSet evaluations and scikit-learn compute it.
* ``roc_auc``: per class, the Mann-Whitney statistic with tied scores counted half, which equals
  the trapezoidal area under the ROC curve.
* ``d_prime``: sqrt(2) * Phi^-1(AUC), AudioSet's convention, from the mean AUC.

A class with no positive clip in the split has no AP and no AUC (nor has one with no negative an
AUC): it is NaN per class and left out of the means; ``classes_scored`` says how many counted.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special, stats


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    if labels.shape != scores.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must both be "
                         "(clips, classes)")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    return (labels > 0.5), scores


def average_precision(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(classes,) AP of each class; NaN for a class without positives."""
    positive, scores = _check(labels, scores)
    out = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        y = positive[:, c]
        if not y.any():
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        s, y = scores[order, c], y[order]
        # The last clip of each run of equal scores: one point of the curve per threshold.
        ends = np.flatnonzero(np.append(np.diff(s) != 0, True))
        tp = np.cumsum(y)[ends]
        precision = tp / (ends + 1)
        recall = tp / tp[-1]
        out[c] = np.sum(np.diff(recall, prepend=0.0) * precision)
    return out


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(classes,) ROC AUC of each class; NaN for a class with no positive or no negative."""
    positive, scores = _check(labels, scores)
    out = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        y = positive[:, c]
        n_pos = int(y.sum())
        n_neg = y.size - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = stats.rankdata(scores[:, c])  # average ranks: ties count half
        out[c] = (ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def d_prime(auc: float) -> float:
    """sqrt(2) * Phi^-1(auc): the separation of two unit Gaussians with that AUC."""
    return math.sqrt(2.0) * float(special.ndtri(auc))


def multilabel(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """mAP, mean AUC, d-prime and the number of classes that counted, for multi-hot labels
    (clips, classes) and any monotone scores (logits or probabilities)."""
    ap, auc = average_precision(labels, scores), roc_auc(labels, scores)
    scored = ~np.isnan(ap)
    if not scored.any():
        raise ValueError("no class has a positive clip in this split: mAP is undefined")
    mean_auc = float(np.nanmean(auc)) if (~np.isnan(auc)).any() else float("nan")
    return {"mAP": float(np.mean(ap[scored])), "mAUC": mean_auc,
            "d_prime": d_prime(mean_auc) if not math.isnan(mean_auc) else float("nan"),
            "classes_scored": int(scored.sum())}


def multiclass(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy for one class index per clip (clips,) and scores (clips, classes)."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    if labels.ndim != 1 or scores.ndim != 2 or labels.shape[0] != scores.shape[0]:
        raise ValueError(f"labels {labels.shape} must be (clips,) and scores {scores.shape} "
                         "(clips, classes)")
    if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"class indices must lie in [0, {scores.shape[1]}); got "
                         f"{labels.min()}..{labels.max()}")
    return {"top1": float(np.mean(np.argmax(scores, axis=1) == labels))}
