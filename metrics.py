"""The training metrics (Keras): pixel difference, the membrane class's IoU and Dice score.

An affinity network's targets carry, after its C affinities, C masks of the pairs that count
(`affinities.label_targets`: a pair whose partner the crop cut off does not); `split_targets` is the one
place that reads them, for these metrics and for the losses.

Their numpy twins, and the challenge's V_rand and V_info, are in scores.py, which never loads TensorFlow;
tests/test_metrics.py holds each metric to its twin. No project imports; losses.py shares `split_targets`
and `per_sample_mean`.
"""

from __future__ import annotations

import keras
from keras import ops


def split_targets(y_true, y_pred):
    """Return (targets, mask): the C channels of `y_true` that `y_pred` predicts, as float32, and the float32 mask
    of the pairs that count when `y_true` carries one after them (2C channels), else None."""
    channels = y_pred.shape[-1]
    mask = ops.cast(y_true[..., channels:], "float32") if y_true.shape[-1] == 2 * channels else None
    return ops.cast(y_true[..., :channels], "float32"), mask


def per_sample_mean(values, mask=None):
    """Return the (weighted) mean of `values` over everything but the batch axis, shape (batch,)."""
    batch = ops.shape(values)[0]
    values = ops.reshape(values, (batch, -1))
    if mask is None:
        return ops.mean(values, axis=-1)
    mask = ops.reshape(mask, (batch, -1))
    return ops.sum(values * mask, axis=-1) / ops.maximum(ops.sum(mask, axis=-1), 1.0)


# Registered (package "unet_isbi"), so that a model compiled with them loads with plain
# keras.models.load_model in any process that has imported this module. Keras 3 never imports a
# non-Keras module named in a saved config, so a process that has not imported it cannot rebuild
# them: that is why best.keras is saved without its compile config (model.inference_model).
@keras.saving.register_keras_serializable(package="unet_isbi")
def pixel_difference(y_true, y_pred):
    """Return 100 * mean |y_true - y_pred| per sample (percent, 0..100), shape (batch,), over the pairs that count.

    Returned per sample so that Keras averages it over any batch size exactly
    (the original divided by a fixed 512 * 512 * batch_size). Numpy twin: `scores.pixel_difference_np`.
    """
    y_true, mask = split_targets(y_true, y_pred)
    return 100.0 * per_sample_mean(ops.abs(y_true - ops.cast(y_pred, "float32")), mask)


@keras.saving.register_keras_serializable(package="unet_isbi")
def pair_accuracy(y_true, y_pred):
    """Return the fraction (0..1) per sample, shape (batch,), of the pairs that count whose prediction
    (> 0.5) agrees with the target: Keras' binary accuracy for targets with a mask (affinities).
    Numpy twin: `scores.accuracy_np`."""
    y_true, mask = split_targets(y_true, y_pred)
    agree = ops.cast(ops.equal(ops.cast(y_pred, "float32") > 0.5, y_true > 0.5), "float32")
    return per_sample_mean(agree, mask)


def accuracy(pair_mask: bool = False):
    """Return what `model.compile(metrics=...)` takes for the accuracy: Keras' 'accuracy', or with targets
    that carry a mask of the pairs, `pair_accuracy` under the same name."""
    return keras.metrics.MeanMetricWrapper(pair_accuracy, name="accuracy") if pair_mask else "accuracy"


@keras.saving.register_keras_serializable(package="unet_isbi")
class MembraneIoU(keras.metrics.BinaryIoU):
    """Keras metric: the membrane class's IoU (0..1), TP / (TP + FP + FN), over a whole epoch and the pairs that
    count: Keras' BinaryIoU for class 0 (membrane: label 0, prediction below `threshold`).
    Numpy twin: `scores.membrane_iou_np`."""

    def __init__(self, threshold: float = 0.5, name: str = "membrane_iou", dtype=None, target_class_ids=(0,)):
        if list(target_class_ids) != [0]:
            raise ValueError(f"{type(self).__name__} scores class 0 (membrane) only, got "
                             f"target_class_ids={target_class_ids}")
        super().__init__(target_class_ids=[0], threshold=threshold, name=name, dtype=dtype)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true, mask = split_targets(y_true, y_pred)
        if mask is not None:
            sample_weight = ops.cast(mask, self.dtype) if sample_weight is None else mask * sample_weight  # 0/1: exact
        return super().update_state(y_true, y_pred, sample_weight)


def membrane_iou() -> keras.metrics.Metric:
    """Return the Keras metric of the membrane class's IoU (0..1), `MembraneIoU`."""
    return MembraneIoU()


@keras.saving.register_keras_serializable(package="unet_isbi")
class MembraneDice(MembraneIoU):
    """Keras metric: the Dice (F1) score of the membrane class (0..1), 2 TP / (2 TP + FP + FN), over a whole epoch.

    Dice = 2 IoU / (1 + IoU) of the same confusion matrix, so it shares
    BinaryIoU's counting: membrane = label 0 and prediction below `threshold`.
    Numpy twin: `scores.membrane_dice_np`.
    """

    def __init__(self, threshold: float = 0.5, name: str = "membrane_dice", dtype=None, target_class_ids=(0,)):
        super().__init__(threshold=threshold, name=name, dtype=dtype, target_class_ids=target_class_ids)

    def result(self):
        iou = super().result()
        return 2.0 * iou / (1.0 + iou)
