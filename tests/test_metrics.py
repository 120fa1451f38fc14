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


def _membrane_sets(y_true, y_pred):
    """The oracle: membrane pixels of the truth and of the prediction as sets of coordinates."""
    truth = {index for index, value in np.ndenumerate(y_true) if value == 0}
    predicted = {index for index, value in np.ndenumerate(y_pred) if value < 0.5}
    return truth, predicted


@pytest.mark.parametrize("seed", [0, 1])
def test_membrane_dice_and_iou_match_a_set_oracle_in_numpy_and_keras(seed):
    from metrics import MembraneDice, membrane_dice_np, membrane_iou, membrane_iou_np

    rng = np.random.default_rng(seed)
    y_true = (rng.random((3, 12, 10, 1)) > 0.3).astype("float32")
    y_pred = rng.random((3, 12, 10, 1)).astype("float32")
    truth, predicted = _membrane_sets(y_true, y_pred)
    iou = len(truth & predicted) / len(truth | predicted)
    dice = 2 * len(truth & predicted) / (len(truth) + len(predicted))
    assert membrane_iou_np(y_true, y_pred) == pytest.approx(iou)
    assert membrane_dice_np(y_true, y_pred) == pytest.approx(dice)
    for metric, expected in ((membrane_iou(), iou), (MembraneDice(), dice)):
        metric.update_state(y_true[:2], y_pred[:2])  # counted over the epoch, not averaged per batch
        metric.update_state(y_true[2:], y_pred[2:])
        assert float(metric.result()) == pytest.approx(expected, rel=1e-5)


def test_membrane_dice_is_zero_for_a_model_that_predicts_cell_everywhere():
    from metrics import accuracy_np, membrane_dice_np, membrane_iou_np

    y_true = np.ones((1, 10, 10, 1))
    y_true[0, 2:4] = 0  # 20 % membrane
    everywhere_cell = np.full(y_true.shape, 0.9)
    assert accuracy_np(y_true, everywhere_cell) == pytest.approx(0.8)
    assert membrane_dice_np(y_true, everywhere_cell) == 0.0
    assert membrane_iou_np(y_true, everywhere_cell) == 0.0
    assert membrane_dice_np(y_true, 1.0 - y_true) == 0.0  # inverted
    assert membrane_dice_np(y_true, y_true) == 1.0


@pytest.mark.parametrize("probabilities, what", [
    (np.full((8, 8), 0.5), "every pixel"),
    (np.linspace(0.6, 1.0, 64).reshape(8, 8), "cell"),
    (np.linspace(0.0, 0.4, 64).reshape(8, 8), "membrane"),
])
def test_uniform_predictions_are_named(probabilities, what):
    from metrics import uniform_prediction

    assert what in uniform_prediction(probabilities)


def test_a_prediction_with_membranes_is_not_uniform():
    from metrics import uniform_prediction

    probabilities = np.ones((10, 10))
    probabilities[::5] = 0.0  # 20 % membrane
    assert uniform_prediction(probabilities) is None
