"""The optimizer's moving average of the weights (`TrainSettings.ema`, Keras's `use_ema`), in one place.

Where the optimizer keeps one, validation (`AveragedValidation`), the epoch's scores and best.keras see the
average (`averaged_weights`); training goes on from the weights as trained, which last.keras keeps with
their average, so a resumed run continues both (`trained_weights_kept`).
"""

from __future__ import annotations

import contextlib

import keras


def _averaging_optimizer(model):
    """Return the optimizer of `model` that keeps a moving average of its weights, or None."""
    optimizer = getattr(model, "optimizer", None)
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # under loss scaling
    return optimizer if getattr(optimizer, "use_ema", False) else None


@contextlib.contextmanager
def averaged_weights(model: keras.Model):
    """Within the block, `model` holds its optimizer's moving average of the weights instead of the weights
    (nothing changes if it keeps none); the weights are back after it. Nested blocks swap once."""
    optimizer = _averaging_optimizer(model)
    if optimizer is None or getattr(optimizer, "averaged_in_model", False):
        yield
        return
    swap = keras.callbacks.SwapEMAWeights()  # its test hooks swap in and out: the public way to swap
    swap.set_model(model)
    swap.on_test_begin()
    optimizer.averaged_in_model = True
    try:
        yield
    finally:
        swap.on_test_end()
        optimizer.averaged_in_model = False


class AveragedValidation(keras.callbacks.Callback):
    """Keras's validation pass scores the optimizer's moving average of the weights where it keeps one
    (`averaged_weights`); otherwise it does nothing."""

    def __init__(self):
        super().__init__()
        self._block = None

    def on_test_begin(self, logs=None):
        self._block = averaged_weights(self.model)
        self._block.__enter__()

    def on_test_end(self, logs=None):
        if self._block is not None:
            self._block.__exit__(None, None, None)
            self._block = None


@contextlib.contextmanager
def trained_weights_kept(model: keras.Model):
    """Within the block, a fit that ends leaves the weights as trained. Keras ends every fit by copying an
    optimizer's moving average of the weights (settings.ema) into them; only the run's last fit may."""
    model.optimizer.finalize_variable_values = lambda var_list: None
    try:
        yield
    finally:
        del model.optimizer.finalize_variable_values
