"""Where an epoch of train.py goes: its train steps, the wait for batches, Keras's validation, each callback.

    .venv/bin/python bench/epoch_overhead.py [--preset cpu] [--epochs 3] [--steps N] [--out bench/epoch.json]

Trains a throwaway run (a temporary folder) of the preset with its callbacks, as `train.py` would, and
charges every moment of each epoch to one part: a callback's hooks (by class), the train steps (Keras's
batch-begin to batch-end hooks), the wait for the next batch (Keras takes it from its iterator before the
batch-begin hooks), Keras's validation (test-begin to test-end), and Keras's own time between them. The
augmentation, done in a thread while the steps run, is timed too. The first epoch (tracing) is left out
of the means. The bare train step (`train_on_batch` on one batch, no callbacks, nothing else running) is
measured on the same model after training. Prints a table and the machine; writes JSON with --out.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402

cli.quiet_native_logs()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import augment  # noqa: E402
import hardware  # noqa: E402
import train  # noqa: E402

HOOKS = ("on_epoch_begin", "on_epoch_end", "on_train_batch_begin", "on_train_batch_end", "on_test_begin",
         "on_test_end", "on_test_batch_begin", "on_test_batch_end", "on_train_begin", "on_train_end")


class Ledger:
    """Charges every moment of an epoch to exactly one thing: a callback's hooks, the train steps, Keras's
    validation, or one of Keras's own gaps between them. `seconds[name][epoch]` sums what each was charged."""

    def __init__(self):
        self.seconds = collections.defaultdict(lambda: collections.defaultdict(float))
        self.epoch, self.phase, self.cursor = 0, "before training", time.perf_counter()

    def charge(self, name: str, then: str | None = None) -> None:
        """Charge the time since the last charge to `name`; what follows is charged to phase `then` (if given)."""
        now = time.perf_counter()
        self.seconds[name][self.epoch] += now - self.cursor
        self.cursor = now
        self.phase = then or self.phase


class Marks(keras.callbacks.Callback):
    """Moves the ledger from one phase of the epoch to the next. Keras calls the callbacks in list order, so
    `first` (before all others) sees a step and a validation end before any other hook, and `last` sees them
    begin after every other hook and the epoch end after every other epoch-end hook."""

    def __init__(self, ledger: Ledger, first: bool):
        super().__init__()
        self.ledger, self.first = ledger, first

    def on_epoch_begin(self, epoch, logs=None):
        if self.first:
            # What Keras does between epochs (its data pipeline's restart) is charged to the epoch it begins.
            self.ledger.epoch = epoch
            self.ledger.charge(self.ledger.phase, "Keras: before the first step")

    def on_train_batch_begin(self, batch, logs=None):
        if not self.first:
            self.ledger.charge(self.ledger.phase, "steps")

    def on_train_batch_end(self, batch, logs=None):
        if self.first:
            last = batch + 1 == self.params.get("steps")
            self.ledger.charge("steps", "Keras: after the last step" if last else "Keras: between steps")
            self.ledger.seconds["step_count"][self.ledger.epoch] += 1

    def on_test_begin(self, logs=None):
        if not self.first:
            self.ledger.charge(self.ledger.phase, "keras validation")

    def on_test_end(self, logs=None):
        if self.first:
            self.ledger.charge("keras validation", "Keras: after validation")

    def on_epoch_end(self, epoch, logs=None):
        if not self.first:
            self.ledger.charge(self.ledger.phase, "Keras: between epochs")


def timed(callback: keras.callbacks.Callback, ledger: Ledger) -> keras.callbacks.Callback:
    """Wrap the hooks `callback` defines so that their time is charged to its class name."""
    name = type(callback).__name__
    for hook in HOOKS:
        if getattr(type(callback), hook) is getattr(keras.callbacks.Callback, hook):
            continue
        method = getattr(callback, hook)

        def wrapper(*args, _method=method, **kwargs):
            ledger.charge(ledger.phase)
            try:
                return _method(*args, **kwargs)
            finally:
                ledger.charge(name)

        setattr(callback, hook, wrapper)
    return callback


def measure(preset: str, epochs: int, steps: int | None, data_dir: str | None = None) -> dict:
    """Return the per-epoch seconds of each part of `epochs` epochs of `preset` (see the module's docstring)."""
    ledger = Ledger()
    augmenting = collections.defaultdict(float)
    original_callbacks, original_getitem = train.make_callbacks, augment.AugmentedBatches.__getitem__

    def make_callbacks(*args, **kwargs):
        made = [timed(callback, ledger) for callback in original_callbacks(*args, **kwargs)]
        return [Marks(ledger, first=True)] + made + [Marks(ledger, first=False)]

    def getitem(self, index):
        began = time.perf_counter()
        try:
            return original_getitem(self, index)
        finally:
            augmenting[ledger.epoch] += time.perf_counter() - began

    # Keras's loop takes the next batch from its epoch iterator before the batch-begin hooks: that wait for
    # the augmentation thread (or the first batch of an epoch) would otherwise look like Keras's own time.
    from keras.src.backend.tensorflow.trainer import TFEpochIterator

    original_next = TFEpochIterator.__next__

    def next_batch(self):
        ledger.charge(ledger.phase)
        try:
            return original_next(self)
        finally:
            ledger.charge("waiting for the next batch")

    train.make_callbacks, augment.AugmentedBatches.__getitem__ = make_callbacks, getitem
    TFEpochIterator.__next__ = next_batch
    try:
        with tempfile.TemporaryDirectory() as folder:
            # No budget (the epochs keep the preset's steps) and no time limit (every epoch runs).
            settings = dataclasses.replace(
                train.preset(preset, data_dir=data_dir, run_dir=folder, epochs=epochs, steps_per_epoch=steps,
                             verbose=0, clear_all=True), budget=None, time_limit=None)
            result = train.train(settings)
            model = train.load_checkpoint(result["last"])
            split, _ = train.load_data(settings)
            batch = train.training_batches(settings, split)[0]
            for _ in range(2):
                model.train_on_batch(*batch[:2])
            bare = []
            for _ in range(10):
                began = time.perf_counter()
                model.train_on_batch(*batch[:2])
                bare.append(time.perf_counter() - began)
    finally:
        train.make_callbacks, augment.AugmentedBatches.__getitem__ = original_callbacks, original_getitem
        TFEpochIterator.__next__ = original_next
    kept = list(range(1, epochs))  # the first epoch traces the step functions

    def mean(per_epoch: dict) -> float:
        return float(np.mean([per_epoch[e] for e in kept]))

    parts = {name: mean(per_epoch) for name, per_epoch in ledger.seconds.items()
             if name not in ("step_count", "before training")}
    return {"machine": hardware.describe(), "precision": result["precision"], "preset": preset, "epochs": epochs,
            "steps_per_epoch": mean(ledger.seconds["step_count"]), "bare_step": float(np.median(bare)),
            "seconds_per_epoch": parts, "augmentation_in_its_thread": mean(augmenting)}


def table(found: dict) -> str:
    """Return the measurement as text: each part's seconds per epoch and its share of the epoch."""
    parts = found["seconds_per_epoch"]
    wall, bare = sum(parts.values()), found["bare_step"] * found["steps_per_epoch"]
    lines = [f"{found['preset']} preset, {found['steps_per_epoch']:.0f} steps per epoch, {found['precision']}, "
             f"on {found['machine']}; means of epochs 2-{found['epochs']}",
             f"{'part':>36} {'s per epoch':>12} {'of the epoch':>13}"]
    for name, seconds in sorted(parts.items(), key=lambda item: -item[1]):
        lines.append(f"{name:>36} {seconds:>12.2f} {seconds / wall:>12.1%}")
    lines.append(f"{'the epoch':>36} {wall:>12.2f}")
    lines.append(f"{'augmentation (its thread, overlaps)':>36} {found['augmentation_in_its_thread']:>12.2f}")
    lines.append(f"{'bare train steps (train_on_batch)':>36} {bare:>12.2f} {bare / wall:>12.1%}")
    lines.append(f"epoch / train steps in fit: {wall / parts['steps']:.3f}x; epoch / bare train steps: "
                 f"{wall / bare:.3f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu", choices=[p for p in train.PRESETS if p != "original"])
    parser.add_argument("--epochs", type=int, default=3, help="at least 2: the first is left out")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default: the preset's)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is left out")
    found = measure(args.preset, args.epochs, args.steps)
    print(table(found))
    if args.out:
        Path(args.out).write_text(json.dumps(found, indent=2) + "\n")


if __name__ == "__main__":
    main()
