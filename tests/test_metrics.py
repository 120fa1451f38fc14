"""metrics.py: the Keras training metrics against their numpy twins in scores.py (which test_scores.py holds to
independent oracles), for any batch size and over a whole epoch."""

import keras
import numpy as np
import pytest

from metrics import MembraneDice, membrane_iou, pixel_difference
from scores import membrane_dice_np, membrane_iou_np, pixel_difference_np


@pytest.mark.parametrize("batch", [1, 3])
def test_pixel_difference_matches_numpy_for_any_batch_size(batch):
    rng = np.random.default_rng(batch)
    y_true = (rng.random((batch, 16, 24, 1)) > 0.5).astype("float32")
    y_pred = rng.random((batch, 16, 24, 1)).astype("float32")
    per_sample = np.asarray(pixel_difference(y_true, y_pred))
    assert per_sample.shape == (batch,)
    assert np.mean(per_sample) == pytest.approx(pixel_difference_np(y_true, y_pred), rel=1e-5)


def test_keras_metric_averages_uneven_batches_exactly():
    rng = np.random.default_rng(0)
    y_true = (rng.random((5, 8, 8, 1)) > 0.5).astype("float32")
    y_pred = rng.random((5, 8, 8, 1)).astype("float32")
    metric = keras.metrics.MeanMetricWrapper(pixel_difference)
    metric.update_state(y_true[:4], y_pred[:4])  # a full batch of 4, then a short one of 1
    metric.update_state(y_true[4:], y_pred[4:])
    assert float(metric.result()) == pytest.approx(pixel_difference_np(y_true, y_pred), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_membrane_dice_and_iou_count_over_the_epoch_as_their_numpy_twins(seed):
    rng = np.random.default_rng(seed)
    y_true = (rng.random((3, 12, 10, 1)) > 0.3).astype("float32")
    y_pred = rng.random((3, 12, 10, 1)).astype("float32")
    for metric, twin in ((membrane_iou(), membrane_iou_np), (MembraneDice(), membrane_dice_np)):
        metric.update_state(y_true[:2], y_pred[:2])  # counted over the epoch, not averaged per batch
        metric.update_state(y_true[2:], y_pred[2:])
        assert float(metric.result()) == pytest.approx(twin(y_true, y_pred), rel=1e-5)


def test_membrane_dice_scores_the_membrane_class_only():
    with pytest.raises(ValueError, match="class 0"):
        MembraneDice(target_class_ids=(1,))


def test_affinity_metrics_count_only_the_pairs_inside_the_mask():
    from metrics import accuracy
    from scores import accuracy_np

    rng = np.random.default_rng(5)
    targets = (rng.random((3, 12, 10, 4)) > 0.3).astype("float32")
    mask = np.broadcast_to(rng.random((1, 12, 10, 4)) > 0.4, targets.shape).astype("float32")  # same in each crop
    y_true = np.concatenate([targets, mask], axis=-1)
    y_pred = rng.random((3, 12, 10, 4)).astype("float32")
    assert np.mean(pixel_difference(y_true, y_pred)) == pytest.approx(pixel_difference_np(targets, y_pred, mask=mask),
                                                                     rel=1e-5)
    metric = accuracy(pair_mask=True)
    metric.update_state(y_true, y_pred)
    assert metric.name == "accuracy"
    assert float(metric.result()) == pytest.approx(accuracy_np(targets, y_pred, mask=mask), rel=1e-5)
    for metric, twin in ((membrane_iou(), membrane_iou_np), (MembraneDice(), membrane_dice_np)):
        metric.update_state(y_true[:2], y_pred[:2])
        metric.update_state(y_true[2:], y_pred[2:])
        assert float(metric.result()) == pytest.approx(twin(targets, y_pred, mask=mask), rel=1e-5)
        assert twin(targets, y_pred, mask=mask) != pytest.approx(twin(targets, y_pred))  # the mask matters here
