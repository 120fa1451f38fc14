"""Segmentation metrics: Keras versions for training and numpy twins for evaluation.

Pure functions; no project imports.
"""

from __future__ import annotations

import numpy as np
from keras import ops


def pixel_difference(y_true, y_pred):
    """Return 100 * mean |y_true - y_pred| per sample (percent, 0..100), shape (batch,).

    Returned per sample so that Keras averages it over any batch size exactly
    (the original divided by a fixed 512 * 512 * batch_size).
    """
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    diff = ops.abs(y_true - y_pred)
    return 100.0 * ops.mean(ops.reshape(diff, (ops.shape(diff)[0], -1)), axis=-1)


def pixel_difference_np(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Return 100 * mean |y_true - y_pred| over all pixels (percent, 0..100)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shapes differ: y_true {y_true.shape}, y_pred {y_pred.shape}")
    return float(100.0 * np.mean(np.abs(y_true - y_pred)))


def accuracy_np(y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 0.5) -> float:
    """Return the fraction (0..1) of pixels where y_pred > threshold agrees with y_true > 0.5."""
    return float(np.mean((np.asarray(y_pred) > threshold) == (np.asarray(y_true) > 0.5)))
