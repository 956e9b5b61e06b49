"""Evaluation metrics, computed the same way at a site and on the coordinator."""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and AUROC from true labels and class probabilities.

    Binary tasks score the positive class (label 1); multi-class tasks macro-average.
    AUROC is NaN when the labels hold a single class.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    preds = probs.argmax(axis=1)
    binary = probs.shape[1] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-division notices: such scores are reported as 0
        precision, recall, f1, _ = precision_recall_fscore_support(
            labels,
            preds,
            average="binary" if binary else "macro",
            labels=None if binary else list(range(probs.shape[1])),
            zero_division=0,
        )
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "auroc": _auroc(labels, probs),
    }


def _auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    if len(present) < probs.shape[1]:
        return math.nan  # one-vs-rest needs every class present
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def lm_metrics(loss_sum: float, tokens: int) -> dict[str, float]:
    """Mean token loss and perplexity from a summed loss over `tokens` target tokens."""
    if tokens == 0:
        return {"loss": math.nan, "perplexity": math.nan}
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
