"""Keras callbacks of the project. They take what they need as arguments, never globals."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import keras
import tensorflow as tf


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Return `image` min-max scaled to uint8 0..255 (a constant image becomes all zeros)."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros(image.shape, dtype=np.uint8)
    return np.round((image - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def prediction_grid(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return one (2H, N*W, 1) image: predictions side by side on top, labels below."""
    top = np.concatenate(list(predictions), axis=1)
    bottom = np.concatenate(list(labels), axis=1)
    return np.concatenate([top, bottom], axis=0)


class ImageHistory(keras.callbacks.Callback):
    """Write validation predictions to TensorBoard as images while a model trains.

    Every `draw_interval` optimizer steps (tag 'batch') and at each epoch end
    (tag 'epoch') it predicts `images` and writes one picture: predictions side
    by side in the top row, `labels` in the bottom row, min-max scaled to uint8.
    The 'batch' step is the optimizer's iteration count, so a run resumed from
    a checkpoint carries on its history instead of starting again at 0.

    Args:
        log_dir: folder of the TensorBoard event files written.
        images, labels: float arrays (N, H, W, 1) of the held examples.
        draw_interval: optimizer steps between two 'batch' pictures.
    """

    def __init__(self, log_dir: str | os.PathLike, images: np.ndarray, labels: np.ndarray, draw_interval: int = 100):
        super().__init__()
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.log_dir = str(log_dir)
        self.images = np.asarray(images, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.float32)
        self.draw_interval = int(draw_interval)
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        return self._writer

    def _write(self, tag: str, step: int) -> None:
        predictions = self.model.predict_on_batch(self.images)
        grid = to_uint8(prediction_grid(np.asarray(predictions, dtype=np.float32), self.labels))
        with self.writer.as_default():
            tf.summary.image(tag, grid[np.newaxis], step=step)
        self.writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if self.draw_interval > 0 and step % self.draw_interval == 0:
            self._write("batch", step)

    def on_epoch_end(self, epoch, logs=None):
        self._write("epoch", epoch + 1)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class TrainingState(keras.callbacks.Callback):
    """Save the whole model (weights and optimizer) and the run's state after every epoch.

    Together `model_path` and `state_path` let `train()` resume exactly where an
    interrupted run stopped: the state holds the epochs done, the last logs and
    the best value of `monitor` so far (lower is better). Both are written
    atomically.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        state_path: str | os.PathLike,
        monitor: str = "val_loss",
        best: float | None = None,
        extra: dict | None = None,
    ):
        super().__init__()
        self.model_path = Path(model_path)
        self.state_path = Path(state_path)
        self.monitor = monitor
        self.best = best
        self.extra = dict(extra or {})

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        value = logs.get(self.monitor)
        if value is not None and (self.best is None or value < self.best):
            self.best = value
        tmp = self.model_path.with_name(self.model_path.stem + ".tmp.keras")
        self.model.save(tmp)
        os.replace(tmp, self.model_path)
        state = {"epochs_done": epoch + 1, "logs": logs, "monitor": self.monitor, "best": self.best, **self.extra}
        tmp_state = self.state_path.with_suffix(".tmp")
        tmp_state.write_text(json.dumps(state, indent=2))
        os.replace(tmp_state, self.state_path)


class TimeLimit(keras.callbacks.Callback):
    """Print the time spent and an estimate of the time left after each epoch; stop after `seconds`.

    Training stops cleanly at the end of the first epoch that ends after
    `seconds` (None: never). `initial_epoch` and `epochs` are those given to fit.
    """

    def __init__(self, seconds: float | None, initial_epoch: int = 0, epochs: int = 1):
        super().__init__()
        self.seconds = seconds
        self.initial_epoch = initial_epoch
        self.epochs = epochs
        self._start = None

    def on_train_begin(self, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.monotonic() - self._start
        done = epoch + 1 - self.initial_epoch
        left = elapsed / done * (self.epochs - epoch - 1)
        if self.seconds is not None:
            left = min(left, max(self.seconds - elapsed, 0.0))
        print(f"epoch {epoch + 1}/{self.epochs}: {elapsed / 60:.1f} min spent, about {left / 60:.1f} min left", flush=True)
        if self.seconds is not None and elapsed >= self.seconds:
            print(f"time limit reached ({elapsed:.0f} s >= {self.seconds:.0f} s): stopping after epoch {epoch + 1}")
            self.model.stop_training = True
