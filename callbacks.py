"""Keras callbacks of the project. They take what they need as arguments, never globals."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import keras
import tensorflow as tf

import metrics


def predict_batch(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Return the model's float32 outputs for one batch of `images`, under any tf.distribute strategy.

    `predict_on_batch` is the fast path, but under a strategy with several
    replicas it feeds each of them the whole batch (and gathers across
    workers), so there the model is called directly on this process's devices.
    """
    if model.distribute_strategy.num_replicas_in_sync > 1:
        return np.asarray(model(images, training=False), dtype=np.float32)
    return np.asarray(model.predict_on_batch(images), dtype=np.float32)


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
        super().__init__(log_dir)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = np.asarray(images, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.float32)
        self.draw_interval = int(draw_interval)

    def _write(self, tag: str, step: int) -> None:
        grid = to_uint8(prediction_grid(predict_batch(self.model, self.images), self.labels))
        with self.writer.as_default():
            tf.summary.image(tag, grid[np.newaxis], step=step)
        self.writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if self.draw_interval > 0 and step % self.draw_interval == 0:
            self._write("batch", step)

    def on_epoch_end(self, epoch, logs=None):
        self._write("epoch", epoch + 1)



class TrainingState(keras.callbacks.Callback):
    """Save the whole model (weights and optimizer) and the run's state after every epoch.

    Together `model_path` and `state_path` let `train()` resume exactly where an
    interrupted run stopped: the state holds the epochs done, the last logs and
    the best value of `monitor` so far (`mode` 'min' or 'max' says which is better). Both are written
    atomically.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        state_path: str | os.PathLike,
        monitor: str = "val_loss",
        best: float | None = None,
        extra: dict | None = None,
        mode: str = "min",
    ):
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.mode = mode
        self.model_path = Path(model_path)
        self.state_path = Path(state_path)
        self.monitor = monitor
        self.best = best
        self.extra = dict(extra or {})

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        value = logs.get(self.monitor)
        better = (lambda a, b: a < b) if self.mode == "min" else (lambda a, b: a > b)
        if value is not None and (self.best is None or better(value, self.best)):
            self.best = value
        save_model_atomic(self.model, self.model_path)
        state = {"epochs_done": epoch + 1, "logs": logs, "monitor": self.monitor, "best": self.best, **self.extra}
        tmp_state = self.state_path.with_suffix(".tmp")
        tmp_state.write_text(json.dumps(state, indent=2))
        os.replace(tmp_state, self.state_path)


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


class ChallengeScores(SummaryCallback):
    """Score the validation images with the ISBI 2012 challenge's V_rand and V_info after each epoch.

    Every `every` epochs it predicts `images` (`predict_on_batch`, `batch_size`
    images at a time), scores each image with `metrics.challenge_scores` (best
    over the threshold sweep) and adds the means over the images to the epoch's
    logs as 'val_v_rand', 'val_v_info', 'val_v_rand_threshold' and
    'val_v_info_threshold' (1 is a perfect score). It also writes the two scores
    to TensorBoard in `log_dir` as 'epoch_v_rand' and 'epoch_v_info' at step =
    epoch index (0-based), the steps Keras' TensorBoard callback uses, so the
    curves line up with its 'epoch_loss'.

    Keras passes one logs dict to the callbacks in list order, so place this
    callback BEFORE those that read the scores, e.g.
    `[ChallengeScores(...), ModelCheckpoint(monitor="val_v_rand", mode="max"), EarlyStopping(...)]`.
    With `every` > 1 the keys are missing on the other epochs and those
    callbacks warn and skip them.

    Args:
        images: float (N, H, W, 1) validation images, as the model takes them.
        labels: (N, H, W, 1) binary ground truth; > 0.5 = cell, else membrane.
        log_dir: folder of the TensorBoard event files written.
        every: epochs between two evaluations (due when (epoch + 1) % every == 0).
        batch_size: images predicted at a time.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        log_dir: str | os.PathLike,
        every: int = 1,
        batch_size: int = 1,
    ):
        super().__init__(log_dir)
        images, labels = np.asarray(images, dtype=np.float32), np.asarray(labels)
        if images.ndim != 4 or images.shape[-1] != 1 or images.shape != labels.shape:
            raise ValueError(f"images and labels must both be (N, H, W, 1), got {images.shape} and {labels.shape}")
        if len(images) == 0:
            raise ValueError("images is empty")
        if every < 1 or batch_size < 1:
            raise ValueError(f"every and batch_size must be positive integers, got {every!r} and {batch_size!r}")
        self.images = images
        self.labels = labels[..., 0] > 0.5
        self.every = int(every)
        self.batch_size = int(batch_size)

    def predict(self) -> np.ndarray:
        """Return the model's (N, H, W) probabilities of `images`."""
        batches = [
            predict_batch(self.model, self.images[start : start + self.batch_size])
            for start in range(0, len(self.images), self.batch_size)
        ]
        predictions = np.concatenate(batches)[..., 0]
        if predictions.shape != self.labels.shape:
            raise ValueError(f"predictions are {predictions.shape} but labels {self.labels.shape} ('same' padding needed)")
        return predictions

    def scores(self) -> dict[str, float]:
        """Return the mean over the images of the challenge scores, keyed as in the logs."""
        per_image = [metrics.challenge_scores(p, label) for p, label in zip(self.predict(), self.labels)]
        keys = ("v_rand", "v_info", "v_rand_threshold", "v_info_threshold")
        return {f"val_{key}": float(np.mean([image[key] for image in per_image])) for key in keys}

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        scores = self.scores()
        if logs is not None:
            logs.update(scores)  # the same dict object the later callbacks receive
        with self.writer.as_default():
            tf.summary.scalar("epoch_v_rand", scores["val_v_rand"], step=epoch)
            tf.summary.scalar("epoch_v_info", scores["val_v_info"], step=epoch)
        self.writer.flush()



# ---------------------------------------------------------------- surviving interruptions and faults

def save_model_atomic(model: keras.Model, path: str | os.PathLike) -> Path:
    """Save `model` (weights and optimizer) to `path` through a temporary name in its folder; return the path.

    Keras writes .keras files in place, so a kill during its write would leave
    half a zip file; here the previous file stays until the new one is whole.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; raised by `StopOnNaN`."""


def training_position(iterations: int, steps_per_epoch: int) -> tuple[int, int]:
    """Return (epoch, batch), both counted from 1, of optimizer step `iterations` (>= 1)."""
    return (iterations - 1) // steps_per_epoch + 1, (iterations - 1) % steps_per_epoch + 1


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

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or np.isfinite(float(loss)):
            return
        step = int(self.model.optimizer.iterations.numpy())
        epoch, index = training_position(step, self.steps_per_epoch)
        raise TrainingDiverged(
            f"the loss became {float(loss)} at epoch {epoch}, batch {index} (optimizer step {step}); training "
            f"stopped and {self.checkpoints} were kept as they were. Lower the learning rate, or check the data "
            "for NaN values"
        )


class StepBackup(keras.callbacks.Callback):
    """Save the whole model (weights, optimizer, its step count) to `path` every `every` optimizer steps.

    The optimizer's step count says where in which epoch the backup was taken,
    so `train()` can resume in the middle of an epoch. 0 saves nothing (but
    `train()` still calls `save_model_atomic` when interrupted).
    """

    def __init__(self, path: str | os.PathLike, every: int):
        super().__init__()
        if every < 0:
            raise ValueError(f"every must be 0 (never) or a positive number of steps, got {every}")
        self.path = Path(path)
        self.every = int(every)

    def on_train_batch_end(self, batch, logs=None):
        if self.every and int(self.model.optimizer.iterations.numpy()) % self.every == 0:
            save_model_atomic(self.model, self.path)


class ResumableTensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback whose batch-level curves count on from the optimizer's step.

    Keras' own starts its batch counter at 0 in every `fit`, so a resumed run
    would draw its batch curves over the first run's; and it flushes only now
    and then, so a killed run would leave a gap before its last backup.
    """

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


def mark_session_start(log_dirs, step: int) -> None:
    """Write a TensorBoard session-start event at `step` into each folder of `log_dirs`.

    TensorBoard drops the events at `step` and later that a run logged before a
    restart marked this way, so the steps a killed run logged after its last
    backup are not drawn twice when they are trained again. Call it at every
    start of training with the first step it will log (TensorBoard takes the
    first mark of a folder as the start of the run, not as a restart).
    """
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    now = time.time()
    events = [event_pb2.Event(wall_time=now, file_version="brain.Event:2"),
              event_pb2.Event(wall_time=now, step=int(step),
                              session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))]
    for log_dir in log_dirs:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        # TensorBoard reads a folder's event files in name order: "!" sorts this one before the files that
        # TensorFlow opens in the same second (events.out.tfevents.<seconds>.<host>...), after older ones.
        path = Path(log_dir) / f"events.out.tfevents.{int(now):010d}.!restart"
        with open(path, "ab") as out:
            writer = RecordWriter(out)
            for event in events:
                writer.write(event.SerializeToString())


def inference_model(model: keras.Model) -> keras.Model:
    """Return `model`'s layers (shared, same weights) as a model with no optimizer and no compile config.

    Saved, it holds Keras layers only, so it loads with plain
    `keras.models.load_model(path)` in a process that never imported this
    project (Keras 3 does not import the module of a custom loss or metric
    named in a compile config; it fails instead).
    """
    return keras.Model(model.inputs, model.outputs, name=model.name)


class BestModel(keras.callbacks.Callback):
    """Save the model for inference (`inference_model`) to `path`, atomically, at each epoch end where
    `monitor` beats the best so far.

    Like Keras' ModelCheckpoint(save_best_only=True), but the file loads
    anywhere and a kill during the write leaves the previous one. `mode` 'min'
    or 'max' says which is better; `best` is the value to beat (None: the
    first epoch is saved; a resumed run's best). Epochs whose logs lack
    `monitor`, or where it is not finite, are skipped with a warning.
    """

    def __init__(self, path: str | os.PathLike, monitor: str = "val_loss", mode: str = "min",
                 best: float | None = None):
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.path = Path(path)
        self.monitor = monitor
        self.mode = mode
        self.best = best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not np.isfinite(float(value)):
            found = "missing from the logs" if value is None else f"{value}"
            print(f"warning: epoch {epoch + 1}: {self.monitor} is {found}; {self.path} not updated", file=sys.stderr)
            return
        value = float(value)
        if self.best is not None and not (value < self.best if self.mode == "min" else value > self.best):
            return
        shown = "none" if self.best is None else f"{self.best:.5f}"
        print(f"\nEpoch {epoch + 1}: {self.monitor} improved from {shown} to {value:.5f}, saving {self.path}")
        self.best = value
        save_model_atomic(inference_model(self.model), self.path)


class UniformPredictionWarning(keras.callbacks.Callback):
    """Warn when the prediction of the validation `images` is (nearly) uniform after an epoch.

    All cell, all membrane or one grey value (`metrics.uniform_prediction`):
    what a model that learned nothing returns while its accuracy can look
    fine. The warning names the likely causes. Adds 'val_uniform' (1 when
    uniform, else 0) to the epoch's logs, so place it before TensorBoard.
    """

    def __init__(self, images: np.ndarray, batch_size: int = 1):
        super().__init__()
        self.images = np.asarray(images, dtype=np.float32)
        if self.images.ndim != 4 or len(self.images) == 0:
            raise ValueError(f"images must be a non-empty (N, H, W, 1) array, got shape {self.images.shape}")
        self.batch_size = int(batch_size)

    def on_epoch_end(self, epoch, logs=None):
        probabilities = np.concatenate([predict_batch(self.model, self.images[i : i + self.batch_size])
                                        for i in range(0, len(self.images), self.batch_size)])
        problem = metrics.uniform_prediction(probabilities)
        if problem:
            print(f"warning: epoch {epoch + 1}: the validation prediction is (nearly) uniform: {problem}; "
                  f"{metrics.UNIFORM_CAUSES}", file=sys.stderr, flush=True)
        if logs is not None:
            logs["val_uniform"] = float(problem is not None)
