"""Utility metrics (scikit-learn underneath).

- ``accuracy``: fraction correct; the default for balanced labels.
- ``balanced_accuracy``: mean per-class recall; for skewed labels.
- ``auroc``: area under the ROC curve of the positive-class score (binary) or
  one-vs-rest macro average (multiclass); for rare outcomes such as mortality,
  where accuracy rewards predicting "survives" for everyone.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm

METRICS = ("accuracy", "balanced_accuracy", "auroc")


def score(metric: str, y_true: np.ndarray, proba: np.ndarray) -> float:
    """Score class probabilities ``proba`` (n × classes) against labels."""
    pred = proba.argmax(1)
    if metric == "accuracy":
        return float(skm.accuracy_score(y_true, pred))
    if metric == "balanced_accuracy":
        with warnings.catch_warnings():
            # a single-class test split (a batch holding one class) is scored as the
            # recall of that class; sklearn warns about it on every call
            warnings.simplefilter("ignore", UserWarning)
            return float(skm.balanced_accuracy_score(y_true, pred))
    if metric == "auroc":
        if len(np.unique(y_true)) < 2:
            return float("nan")  # undefined on a single-class split
        if proba.shape[1] == 2:
            return float(skm.roc_auc_score(y_true, proba[:, 1]))
        return float(skm.roc_auc_score(y_true, proba, multi_class="ovr",
                                       labels=list(range(proba.shape[1]))))
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
