import numpy as np
import pytest

from metrics import accuracy_np, pixel_difference, pixel_difference_np


@pytest.mark.parametrize("batch", [1, 3])
def test_pixel_difference_matches_numpy_for_any_batch_size(batch):
    rng = np.random.default_rng(batch)
    y_true = (rng.random((batch, 16, 24, 1)) > 0.5).astype("float32")
    y_pred = rng.random((batch, 16, 24, 1)).astype("float32")
    per_sample = np.asarray(pixel_difference(y_true, y_pred))
    assert per_sample.shape == (batch,)
    assert np.mean(per_sample) == pytest.approx(pixel_difference_np(y_true, y_pred), rel=1e-5)
    assert pixel_difference_np(y_true, y_pred) == pytest.approx(100 * np.abs(y_true - y_pred).mean(), rel=1e-6)


def test_keras_metric_averages_uneven_batches_exactly():
    import keras

    rng = np.random.default_rng(0)
    y_true = (rng.random((5, 8, 8, 1)) > 0.5).astype("float32")
    y_pred = rng.random((5, 8, 8, 1)).astype("float32")
    metric = keras.metrics.MeanMetricWrapper(pixel_difference)
    metric.update_state(y_true[:4], y_pred[:4])  # a full batch of 4, then a short one of 1
    metric.update_state(y_true[4:], y_pred[4:])
    assert float(metric.result()) == pytest.approx(pixel_difference_np(y_true, y_pred), rel=1e-5)


def test_pixel_difference_bounds():
    ones = np.ones((2, 4, 4, 1))
    assert pixel_difference_np(ones, ones) == 0
    assert pixel_difference_np(ones, 0 * ones) == 100


def test_accuracy_counts_thresholded_agreement():
    y_true = np.array([1, 1, 0, 0])
    y_pred = np.array([0.9, 0.4, 0.2, 0.6])
    assert accuracy_np(y_true, y_pred) == 0.5
