"""Keras callbacks of the project, under the original design's names. They take what they need as arguments,
never globals.

- `TensorBoard`: Keras's, with every epoch's curves whatever the epoch's
  length, and batch curves that count on from the optimizer's step on a resume.
- `ImageHistory`: the original's image history, grown into the one prediction
  of the validation pages per epoch, right after Keras's own validation pass
  (`on_test_end`, which runs before any callback's `on_epoch_end`). That one
  prediction gives the challenge scores, the uniform-prediction check and the
  epoch's picture.
- `ModelCheckpoint`: the one owner of "best" (not Keras's: it also saves what a
  rerun resumes from). It reads the monitored value from the epoch's logs, or
  from `ImageHistory` when the monitor is one of its scores, so the order of
  the callback list does not matter.
- `StopOnNaN`, `StepBackup`, `TimeLimit`: a run's safety nets.
- Where the optimizer keeps a moving average of the weights
  (`TrainSettings.ema`), `ImageHistory`'s scores and best.keras see the
  average (averaging.py); training and last.keras keep the weights as trained.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import affinities
import files
import runs
import segment
from averaging import averaged_weights
from model import inference_model
from scores import FLAT_HINT, UNIFORM_CAUSES, cell_scores, challenge_scores, flat_side, uniform_prediction

def predict_batch(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Return the model's float32 outputs for one batch of `images`, under any tf.distribute strategy.

    `predict_on_batch` is the fast path, but under a strategy with several
    replicas it feeds each of them the whole batch (and gathers across
    workers), so there the model is called directly on this process's devices.
    """
    if model.distribute_strategy.num_replicas_in_sync > 1:
        return np.asarray(model(images, training=False), dtype=np.float32)
    return np.asarray(model.predict_on_batch(images), dtype=np.float32)


def stretch_to_uint8(image: np.ndarray) -> np.ndarray:
    """Return `image` min-max stretched to uint8 0..255 (a constant image becomes all zeros)."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros(image.shape, dtype=np.uint8)
    return np.round((image - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def recording():
    """Return the context in which summaries are written whatever Keras's TensorBoard callback says: between two
    batches it records only when the last batch's step is a multiple of `update_freq` (`tf.summary.record_if`),
    and the epoch's scalars and pictures are written there (ImageHistory from within the validation pass)."""
    return tf.summary.record_if(True)


def cell_maps(outputs: np.ndarray) -> np.ndarray:
    """Return (N, H, W) cell probabilities of (N, H, W, C) model outputs: the one channel, or the cell map
    of the affinities (`affinities.cell_map`)."""
    return outputs[..., 0] if outputs.shape[-1] == 1 else affinities.cell_map(outputs)


def prediction_grid(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return one (2H, N*W, 1) image: predictions side by side on top, labels below."""
    top = np.concatenate(list(predictions), axis=1)
    bottom = np.concatenate(list(labels), axis=1)
    return np.concatenate([top, bottom], axis=0)


class SummaryCallback(keras.callbacks.Callback):
    """A callback that writes TensorBoard summaries to `log_dir` with one writer, opened lazily, closed at the end."""

    def __init__(self, log_dir: str | os.PathLike):
        super().__init__()
        self.log_dir = str(log_dir)
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        return self._writer

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ImageHistory(SummaryCallback):
    """Predict the validation pages once per epoch and draw them while the model trains (the original's image history).

    After each epoch's validation pass (or at the epoch end when `fit` has no
    validation data) it predicts `images` once and from that prediction:
    - checks whether it is (nearly) uniform (`scores.uniform_prediction`): a
      warning naming the likely causes, and 'val_uniform' 1 or 0;
    - every `challenge_every` epochs (0: never) scores it with the ISBI 2012
      challenge's V_rand and V_info (`scores.challenge_scores`, best over the
      threshold sweep, mean over the pages): 'val_v_rand', 'val_v_info',
      'val_v_rand_threshold', 'val_v_info_threshold' (1 is a perfect score);
      and with a `segmenter` the same scores of its cells (`scores.cell_scores`):
      'val_cell_v_rand', 'val_cell_v_info';
    - writes the 'epoch' picture to TensorBoard at step epoch + 1, and with a
      `segmenter` the 'cells' picture: the first page's cells in colour over it.
    These values are `scores` until the next epoch, are added to the epoch's
    logs (so Keras's History and the checkpoint see them) and are written to
    TensorBoard in `log_dir`/validation as 'epoch_v_rand' ... at step = epoch
    index, the steps Keras's TensorBoard callback uses (`TensorBoard` leaves them out).

    Every `draw_interval` optimizer steps (0: never) it also predicts the pages
    and writes a 'batch' picture at the optimizer's step (so a resumed run
    carries on its history). Pictures go to `log_dir`/images: predictions side
    by side on top, `labels` below, min-max stretched to uint8. A model with
    several output channels (affinities) is drawn, thresholded and checked by
    its cell map (`affinities.cell_map`).

    Args:
        images: float (N, H, W, 1) validation images, as the model takes them.
        labels: (N, H, W, 1) ground truth; > 0.5 = cell, else membrane.
        log_dir: the run's TensorBoard folder.
        challenge_every: epochs between two challenge scorings (due when (epoch + 1) % every == 0).
        draw_interval: optimizer steps between two 'batch' pictures.
        batch_size: images predicted at a time.
        segmenter: a function that cuts one predicted page ((H, W) or (H, W, K)) into cells (segment.py).
    """

    SCORE_KEYS = ("v_rand", "v_info", "v_rand_threshold", "v_info_threshold")
    # What it adds to the epoch's logs. It writes them to TensorBoard itself, so that they are there whatever the
    # order of the callbacks, and TensorBoard leaves them to it.
    LOG_KEYS = ("val_uniform", *(f"val_{key}" for key in SCORE_KEYS), "val_cell_v_rand", "val_cell_v_info")

    def __init__(self, images: np.ndarray, labels: np.ndarray, log_dir: str | os.PathLike, challenge_every: int = 1,
                 draw_interval: int = 100, batch_size: int = 1,
                 segmenter: Callable[[np.ndarray], np.ndarray] | None = None):
        super().__init__(Path(log_dir) / "images")
        images, labels = np.asarray(images, dtype=np.float32), np.asarray(labels, dtype=np.float32)
        if images.ndim != 4 or labels.shape[3:] != (1,) or images.shape[:3] != labels.shape[:3]:
            raise ValueError(f"images must be (N, H, W, C) and labels (N, H, W, 1) of the same pages, got "
                             f"{images.shape} and {labels.shape}")
        if len(images) == 0:
            raise ValueError("images is empty")
        if challenge_every < 0 or draw_interval < 0 or batch_size < 1:
            raise ValueError(f"challenge_every and draw_interval must be >= 0 and batch_size positive, got "
                             f"{challenge_every!r}, {draw_interval!r} and {batch_size!r}")
        self.images, self.labels, self.segmenter = images, labels, segmenter
        self.challenge_every, self.draw_interval, self.batch_size = challenge_every, draw_interval, batch_size
        self.scalar_dir = Path(log_dir) / "validation"
        self._scalar_writer = None
        self.scores: dict[str, float] = {}
        self._epoch = None  # the epoch under way
        self._done_epoch = None  # the epoch whose scores are in `scores`

    def __repr__(self):
        return (f"ImageHistory(pages={len(self.images)}, log_dir={str(self.log_dir)!r}, "
                f"draw_interval={self.draw_interval}, challenge_every={self.challenge_every}, "
                f"segmenter={self.segmenter is not None})")

    def predict(self) -> np.ndarray:
        """Return the model's (N, H, W, C) float32 outputs for the validation images."""
        predictions = np.concatenate([predict_batch(self.model, self.images[i : i + self.batch_size])
                                      for i in range(0, len(self.images), self.batch_size)])
        if predictions.shape[:3] != self.images.shape[:3]:
            raise ValueError(f"predictions are {predictions.shape} but the images {self.images.shape} "
                             "('same' padding needed)")
        return predictions

    def _picture(self, tag: str, step: int, predictions: np.ndarray) -> None:
        grid = stretch_to_uint8(prediction_grid(cell_maps(predictions)[..., np.newaxis], self.labels))
        with self.writer.as_default(), recording():
            tf.summary.image(tag, grid[np.newaxis], step=step)
        self.writer.flush()

    def _score(self, epoch: int) -> None:
        """Predict once (the averaged weights, if the optimizer keeps them) and set `scores` for `epoch`; write its
        picture and scalars."""
        with averaged_weights(self.model):
            outputs = self.predict()
        predictions = cell_maps(outputs)
        problem = uniform_prediction(predictions)
        if problem:
            print(f"warning: epoch {epoch + 1}: the validation prediction is (nearly) uniform: {problem}; "
                  f"{UNIFORM_CAUSES}", file=sys.stderr, flush=True)
        elif epoch + 1 == (self.params or {}).get("epochs") and (flat := flat_side(predictions)):
            print(f"warning: the last epoch's validation prediction: {flat}; {FLAT_HINT}", file=sys.stderr, flush=True)
        scores = {"val_uniform": float(problem is not None)}
        if self.challenge_every and (epoch + 1) % self.challenge_every == 0:
            challenge, cells = self.challenge(outputs)
            scores.update(challenge)
            if cells is not None:
                with self.writer.as_default(), recording():
                    tf.summary.image("cells", segment.overlay(self.images[0, ..., self.images.shape[-1] // 2], cells[0])[np.newaxis],
                                     step=epoch + 1)
        self.scores, self._done_epoch = scores, epoch
        self._picture("epoch", epoch + 1, outputs)
        if self._scalar_writer is None:
            self._scalar_writer = tf.summary.create_file_writer(str(self.scalar_dir))
        with self._scalar_writer.as_default(), recording():
            for key in self.LOG_KEYS:
                if key in scores:
                    tf.summary.scalar(key.replace("val_", "epoch_", 1), scores[key], step=epoch)
        self._scalar_writer.flush()

    def challenge(self, outputs: np.ndarray) -> tuple[dict, list[np.ndarray] | None]:
        """Return (the mean challenge scores 'val_v_rand', ... of (N, H, W, C) outputs against the labels, and with
        a segmenter also 'val_cell_v_rand' and 'val_cell_v_info'; the cells of each page, or None)."""
        labels = self.labels[..., 0] > 0.5
        per_page = [challenge_scores(p, y) for p, y in zip(cell_maps(outputs), labels)]
        scores = {f"val_{key}": float(np.mean([page[key] for page in per_page])) for key in self.SCORE_KEYS}
        if self.segmenter is None:
            return scores, None
        with warnings.catch_warnings():  # an untrained network's uniform output is reported by _score
            warnings.simplefilter("ignore", UserWarning)
            cells = [self.segmenter(page[..., 0] if page.shape[-1] == 1 else page) for page in outputs]
        found = [cell_scores(page, y) for page, y in zip(cells, labels)]
        scores.update({f"val_cell_{key}": float(np.mean([page[key] for page in found])) for key in ("v_rand", "v_info")})
        return scores, cells

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self.scores = {}

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if self.draw_interval and step % self.draw_interval == 0:
            self._picture("batch", step, self.predict())

    def on_test_end(self, logs=None):
        if self._epoch is not None and self._done_epoch != self._epoch:  # in fit's validation pass only
            self._score(self._epoch)

    def on_epoch_end(self, epoch, logs=None):
        if self._done_epoch != epoch:  # fit without validation data
            self._score(epoch)
        if logs is not None:
            logs.update(self.scores)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        if self._scalar_writer is not None:
            self._scalar_writer.close()
            self._scalar_writer = None
        self._epoch = None


class ModelCheckpoint(keras.callbacks.Callback):
    """Save a run's models and state after every epoch; the one owner of "best".

    Not Keras's ModelCheckpoint: it monitors a validation score (the original
    monitored the training loss), also saves what a rerun resumes from, and
    writes every file atomically.

    - best.keras: the model for inference (`model.inference_model`: layers
      only, it loads anywhere) whenever `monitor` beats the best so far
      (`mode` 'min' or 'max'; `best` is the value to beat, None: the first
      epoch is saved). An epoch where `monitor` is missing or not finite is
      skipped with a warning.
    - last.keras: the whole model, optimizer included, what a rerun resumes from.
    - state.json: epochs done, the epoch's logs, `monitor` and the best value,
      and `extra` (e.g. the settings).
    Every file is written atomically. `monitor` is read from the epoch's logs,
    else from `validation`'s scores, whatever the order of the callbacks.
    """

    def __init__(self, run: runs.RunFolder, monitor: str = "val_loss", mode: str = "min", best: float | None = None,
                 extra: dict | None = None, validation: ImageHistory | None = None):
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.run, self.monitor, self.mode, self.best = run, monitor, mode, best
        self.extra = dict(extra or {})
        self.validation = validation

    def __repr__(self):
        return (f"ModelCheckpoint(run={str(self.run.path)!r}, monitor={self.monitor!r}, mode={self.mode!r}, "
                f"best={self.best!r})")

    def improved(self, value: float) -> bool:
        """Return whether `value` beats the best so far."""
        return self.best is None or (value < self.best if self.mode == "min" else value > self.best)

    def on_epoch_end(self, epoch, logs=None):
        logs = {**(self.validation.scores if self.validation is not None else {}), **(logs or {})}
        logs = {key: float(value) for key, value in logs.items()}
        value = logs.get(self.monitor)
        if value is None or not np.isfinite(value):
            found = "missing from the logs" if value is None else f"{value}"
            print(f"warning: epoch {epoch + 1}: {self.monitor} is {found}; {self.run.best} not updated",
                  file=sys.stderr)
        elif self.improved(value):
            shown = "none" if self.best is None else f"{self.best:.5f}"
            print(f"\nEpoch {epoch + 1}: {self.monitor} improved from {shown} to {value:.5f}, saving {self.run.best}")
            self.best = value
            with averaged_weights(self.model):
                files.write_atomic(self.run.best, inference_model(self.model).save)
        files.write_atomic(self.run.last, self.model.save)
        state = {"epochs_done": epoch + 1, "logs": logs, "monitor": self.monitor, "best": self.best, **self.extra}
        self.run.write_json(self.run.state, state)


class TimeLimit(keras.callbacks.Callback):
    """Print the time spent and an estimate of the time left after each epoch; keep training within `seconds`.

    After each epoch, training stops cleanly if another epoch, at the mean
    epoch time so far, would end after `seconds` (None: never), so a run
    stays within its budget on a slower or busier machine. `initial_epoch`
    and `epochs` are those given to fit; `clock` returns seconds.
    """

    def __init__(self, seconds: float | None, initial_epoch: int = 0, epochs: int = 1, clock=time.monotonic):
        super().__init__()
        self.seconds = seconds
        self.initial_epoch = initial_epoch
        self.epochs = epochs
        self.clock = clock
        self._start = None

    def __repr__(self):
        return f"TimeLimit(seconds={self.seconds!r}, epochs={self.epochs})"

    def on_train_begin(self, logs=None):
        self._start = self.clock()

    def on_epoch_end(self, epoch, logs=None):
        elapsed = self.clock() - self._start
        done = epoch + 1 - self.initial_epoch
        per_epoch = elapsed / done
        stop = self.seconds is not None and epoch + 1 < self.epochs and elapsed + per_epoch > self.seconds
        left = 0.0 if stop else per_epoch * (self.epochs - epoch - 1)
        print(f"epoch {epoch + 1}/{self.epochs}: {elapsed / 60:.1f} min spent, about {left / 60:.1f} min left", flush=True)
        if stop:
            print(f"time limit: another epoch would end after {self.seconds / 60:.1f} min "
                  f"({elapsed / 60:.1f} min spent, {per_epoch / 60:.1f} min per epoch): stopping after epoch {epoch + 1}")
            self.model.stop_training = True


# ---------------------------------------------------------------- surviving interruptions and faults

class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; raised by `StopOnNaN`."""


class StopOnNaN(keras.callbacks.Callback):
    """Stop training by raising `TrainingDiverged` at the first batch whose loss is NaN or infinite.

    Unlike Keras' TerminateOnNaN it raises, so that the epoch-end callbacks do
    not run and no checkpoint is overwritten with the broken weights. Place it
    first in the callback list, before anything that saves at batch end.
    """

    def __init__(self, steps_per_epoch: int, checkpoints: str = "the earlier checkpoints"):
        super().__init__()
        self.steps_per_epoch = int(steps_per_epoch)
        self.checkpoints = checkpoints

    def __repr__(self):
        return f"StopOnNaN(steps_per_epoch={self.steps_per_epoch})"

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or np.isfinite(float(loss)):
            return
        step = int(self.model.optimizer.iterations.numpy())
        raise TrainingDiverged(
            f"the loss became {float(loss)} in {runs.position(step, self.steps_per_epoch)}; training "
            f"stopped and {self.checkpoints} were kept as they were. Lower the learning rate, or check the data "
            "for NaN values"
        )


class StepBackup(keras.callbacks.Callback):
    """Save the whole model (weights, optimizer, its step count) to `path` every `every` optimizer steps.

    The optimizer's step count says where in which epoch the backup was taken,
    so `train()` can resume in the middle of an epoch. 0 saves nothing (but
    `train()` still saves a backup when interrupted). Steps that end an epoch of
    `steps_per_epoch` (if given) are left to `ModelCheckpoint`, which saves last.keras
    a validation later, and a signal in between saves a backup anyway.
    """

    def __init__(self, path: str | os.PathLike, every: int, steps_per_epoch: int | None = None):
        super().__init__()
        if every < 0:
            raise ValueError(f"every must be 0 (never) or a positive number of steps, got {every}")
        self.path = Path(path)
        self.every = int(every)
        self.steps_per_epoch = steps_per_epoch

    def __repr__(self):
        return f"StepBackup(path={str(self.path)!r}, every={self.every})"

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if self.every and step % self.every == 0 and not (self.steps_per_epoch and step % self.steps_per_epoch == 0):
            files.write_atomic(self.path, self.model.save)


class TensorBoard(keras.callbacks.TensorBoard):
    """Keras's TensorBoard callback, with every epoch's curves and with batch curves that count on from the optimizer's
    step.

    Keras's own writes the epoch's scalars and weight histograms within the
    `tf.summary.record_if` it set for the last batch (record at steps that are
    multiples of `update_freq`), so they are lost unless an epoch ends on such
    a step; here they are written at every epoch end (`recording()`), and so
    are the evaluation scalars at the end of each validation pass. The scores
    that ImageHistory adds to the logs it writes itself. Keras's own
    also starts its batch counter at 0 in every `fit`, so a resumed run would
    draw its batch curves over the first run's; and it flushes only now and
    then, so a killed run would leave a gap before its last backup.
    It sets private members of Keras's TensorBoard (PRIVATE_MEMBERS); a test
    fails when a Keras release renames them.
    """

    PRIVATE_MEMBERS = ("_writers", "_global_train_batch", "_pop_writer", "_push_writer", "_train_writer",
                       "_val_writer")

    def __repr__(self):
        return (f"TensorBoard(log_dir={self.log_dir!r}, update_freq={self.update_freq!r}, "
                f"histogram_freq={self.histogram_freq!r}, write_images={self.write_images!r})")

    def on_train_begin(self, logs=None):
        self._writers = {}  # those of an earlier fit with this callback were closed at its end
        super().on_train_begin(logs)
        self._global_train_batch = int(self.model.optimizer.iterations.numpy())
        self._pop_writer()
        self._push_writer(self._train_writer, self._global_train_batch)

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        # Flushed as written, so that a killed run loses none of the steps its backup holds.
        if isinstance(self.update_freq, int) and self._global_train_batch % self.update_freq == 0:
            self._train_writer.flush()

    def on_test_end(self, logs=None):
        # Keras writes then pops the writer it pushed for the last validation batch: pushed again at step 0, it records.
        self._pop_writer()
        self._push_writer(self._val_writer, 0)
        super().on_test_end(logs)

    def on_epoch_end(self, epoch, logs=None):
        logs = {key: value for key, value in (logs or {}).items() if key not in ImageHistory.LOG_KEYS}
        with recording():
            super().on_epoch_end(epoch, logs)
        for writer in self._writers.values():  # a killed run keeps the curves of the epochs it saved
            writer.flush()
