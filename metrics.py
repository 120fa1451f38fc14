"""The training metrics (Keras): pixel difference, the membrane class's IoU and Dice score.

Their numpy twins, and the challenge's V_rand and V_info, are in scores.py, which never loads TensorFlow;
tests/test_metrics.py holds each metric to its twin. No project imports.
"""

from __future__ import annotations

import keras
from keras import ops


# Registered (package "unet_isbi"), so that a model compiled with them loads with plain
# keras.models.load_model in any process that has imported this module. Keras 3 never imports a
# non-Keras module named in a saved config, so a process that has not imported it cannot rebuild
# them: that is why best.keras is saved without its compile config (model.inference_model).
@keras.saving.register_keras_serializable(package="unet_isbi")
def pixel_difference(y_true, y_pred):
    """Return 100 * mean |y_true - y_pred| per sample (percent, 0..100), shape (batch,).

    Returned per sample so that Keras averages it over any batch size exactly
    (the original divided by a fixed 512 * 512 * batch_size). Numpy twin: `scores.pixel_difference_np`.
    """
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    diff = ops.abs(y_true - y_pred)
    return 100.0 * ops.mean(ops.reshape(diff, (ops.shape(diff)[0], -1)), axis=-1)


def membrane_iou() -> keras.metrics.Metric:
    """Return the Keras metric of the membrane class's IoU (0..1): TP / (TP + FP + FN), over a whole epoch.

    Keras' own BinaryIoU for class 0 (membrane: label 0, prediction below
    0.5), so that it loads anywhere without this module. Numpy twin: `scores.membrane_iou_np`.
    """
    return keras.metrics.BinaryIoU(target_class_ids=[0], threshold=0.5, name="membrane_iou")


@keras.saving.register_keras_serializable(package="unet_isbi")
class MembraneDice(keras.metrics.BinaryIoU):
    """Keras metric: the Dice (F1) score of the membrane class (0..1), 2 TP / (2 TP + FP + FN), over a whole epoch.

    Dice = 2 IoU / (1 + IoU) of the same confusion matrix, so it shares
    BinaryIoU's counting: membrane = label 0 and prediction below `threshold`.
    Numpy twin: `scores.membrane_dice_np`.
    """

    def __init__(self, threshold: float = 0.5, name: str = "membrane_dice", dtype=None, target_class_ids=(0,)):
        if list(target_class_ids) != [0]:
            raise ValueError(f"MembraneDice scores class 0 (membrane) only, got target_class_ids={target_class_ids}")
        super().__init__(target_class_ids=[0], threshold=threshold, name=name, dtype=dtype)

    def result(self):
        iou = super().result()
        return 2.0 * iou / (1.0 + iou)
