"""Utility metrics.

- ``accuracy``: fraction correct; the default for balanced labels.
- ``balanced_accuracy``: mean per-class recall over the classes present in
  ``y_true``; for skewed labels.
- ``auroc``: area under the ROC curve of the positive-class score (binary) or
  one-vs-rest macro average (multiclass); for rare outcomes such as mortality,
  where accuracy rewards predicting "survives" for everyone.

AUROC is scikit-learn's. Accuracy and balanced accuracy are computed with
numpy, exactly as scikit-learn's ``accuracy_score`` and
``balanced_accuracy_score`` define them (tests/test_engine.py checks the two
agree): a cell scores every site every round, and scikit-learn's input
validation costs about 4 ms a call, which at 100 sites is most of a round.
"""

from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "auroc")


def score(metric: str, y_true: np.ndarray, proba: np.ndarray) -> float:
    """Score class probabilities ``proba`` (n × classes) against labels."""
    from sklearn import metrics as skm

    pred = proba.argmax(1)
    y_true = np.asarray(y_true)
    if metric == "accuracy":
        return float(np.mean(pred == y_true)) if len(y_true) else float("nan")
    if metric == "balanced_accuracy":
        # the recall of each class present in y_true, averaged (a single-class split is
        # scored as the recall of that class, as scikit-learn does after its warning)
        classes, inv = np.unique(y_true, return_inverse=True)
        if not len(classes):
            return float("nan")
        hits = np.bincount(inv, weights=(pred == y_true), minlength=len(classes))
        return float(np.mean(hits / np.bincount(inv, minlength=len(classes))))
    if metric == "auroc":
        if len(np.unique(y_true)) < 2:
            return float("nan")  # undefined on a single-class split
        if proba.shape[1] == 2:
            return float(skm.roc_auc_score(y_true, proba[:, 1]))
        return float(skm.roc_auc_score(y_true, proba, multi_class="ovr",
                                       labels=list(range(proba.shape[1]))))
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
