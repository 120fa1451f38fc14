"""Train the U-Net: `train(settings)`, shared by the notebook and the command line (settings and presets: presets.py).

    python train.py                     # preset 'auto': 'original' on a GPU, 'cpu' otherwise
    python train.py --preset original   # 512x512, batch 5, 3 x 1000 steps, 64 filters
    python train.py --preset cpu --epochs 5 --run-dir runs/try

A run lives in one folder (`run_dir`): TensorBoard logs in logs/, the best
model by the monitored validation score in best.keras, the last epoch's model
with its optimizer in last.keras (what a rerun resumes from), the settings and
the data report (data_report.json / .txt). best.keras holds Keras layers only,
so it loads anywhere with plain keras.models.load_model.

    python train.py --images my_data/images --labels my_data/masks --split 0.2   # your own data (README)
"""

from __future__ import annotations

import cli

if __name__ == "__main__":
    cli.quiet_native_logs()  # before TensorFlow loads

import argparse
import contextlib
import dataclasses
import functools
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np

import affinities
import augment
import data
import distribute
import files
import hardware
import losses
import presets
import runs
import segment
from averaging import AveragedValidation, trained_weights_kept
from callbacks import ImageHistory, ModelCheckpoint, StepBackup, StopOnNaN, TensorBoard, TimeLimit
from metrics import MembraneDice, MembraneIoU, accuracy, membrane_iou, pair_accuracy, pixel_difference
from model import SIZE_MULTIPLE, build_unet, load_model
from presets import (  # noqa: F401 (train.X names: the notebook, tests, bench/ and tools use them)
    HIGHER_IS_BETTER, LR_SCHEDULES, PRESETS, TARGETS, TrainSettings, monitor_mode, preset,
    settings_from, target_offsets)
from sizing import BUDGET_MARGIN, VALIDATION_SHARE, size_to_budget, sizing_line  # noqa: F401

CUSTOM_OBJECTS = {"pixel_difference": pixel_difference, "pair_accuracy": pair_accuracy, "MembraneDice": MembraneDice,
                  "MembraneIoU": MembraneIoU, **losses.CUSTOM_OBJECTS}


@contextlib.contextmanager
def interrupts_raise():
    """Within the block, SIGINT (Ctrl-C) and SIGTERM raise KeyboardInterrupt (in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def state_settings(settings: TrainSettings, sizing: dict | None = None) -> dict:
    """Return the settings as saved beside a run, with the resolved precision policy (and the sizing, if any)."""
    saved = {**settings.to_dict(), "precision_policy": hardware.choose_precision(settings.precision)}
    return {**saved, "sizing": sizing} if sizing else saved


def measure_speed(settings: TrainSettings, split: dict, policy: str, steps: int = 3) -> dict:
    """Return {'step': seconds per train step, 'validation': seconds per epoch's validation} on this machine,
    measured on a throwaway model after one warm-up step: `steps` train steps on the run's own batches, each
    augmented as it is timed, and the validation pages predicted twice (Keras's pass and ImageHistory's)
    and scored once.

    Augmenting in the same thread overstates a step a little (in `fit` a thread prepares the next batch
    while the cores train); on 2 cores that thread competes with training, so the sum is the safer estimate."""
    model = build_model(settings, policy)
    batches = training_batches(settings, split)

    def train_step(index: int) -> None:
        batch = batches[index]
        model.train_on_batch(*batch[:2], sample_weight=batch[2] if len(batch) > 2 else None)

    train_step(0)
    began = time.perf_counter()
    for index in range(1, steps + 1):
        train_step(index)
    step = (time.perf_counter() - began) / steps
    val_x, val_y = split["validation"]
    model.predict_on_batch(val_x[:1])
    began = time.perf_counter()
    outputs = np.concatenate([model.predict_on_batch(val_x[i : i + 1]) for i in range(len(val_x))])
    predicting = time.perf_counter() - began
    began = time.perf_counter()
    if settings.challenge_every:  # what ImageHistory computes from its prediction; nothing is written
        pages = ImageHistory(val_x, val_y, "unused", segmenter=cell_segmenter(settings))
        pages.challenge(np.asarray(outputs, np.float32))
    scoring = (time.perf_counter() - began) / max(settings.challenge_every, 1)
    return {"step": step, "validation": 2 * predicting + scoring}


def label_target(settings: TrainSettings) -> Callable[[np.ndarray], np.ndarray] | None:
    """Return the function that turns one (H, W) label crop into the network's (H, W, 2K) targets (K affinities,
    K masks of the pairs inside the crop: `affinities.label_targets`), or None when the label is the target."""
    offsets = target_offsets(settings)
    return None if offsets is None else functools.partial(affinities.label_targets, offsets=offsets)


def cell_segmenter(settings: TrainSettings) -> Callable[[np.ndarray], np.ndarray]:
    """Return the function that cuts one predicted validation page into cells: the mutex watershed on
    affinities, the multicut on a membrane map (segment.py, default parameters)."""
    offsets = target_offsets(settings)
    method = "multicut" if offsets is None else "mws"
    return functools.partial(segment.segment, method=method, offsets=offsets)


def validation_targets(settings: TrainSettings, labels: np.ndarray) -> np.ndarray:
    """Return what the network is scored against on (N, H, W, 1) validation labels: themselves, or their affinities."""
    target = label_target(settings)
    return labels if target is None else np.stack([target(label[..., 0]) for label in labels])


def learning_rate(settings: TrainSettings):
    """Return Adam's learning rate: the number `settings.learning_rate`, or a schedule of it per optimizer step."""
    if settings.lr_schedule == "constant":
        return settings.learning_rate
    if settings.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            settings.learning_rate, decay_steps=settings.epochs * settings.steps_per_epoch, alpha=0.01)
    raise ValueError(f"unknown lr_schedule {settings.lr_schedule!r}; choose from {', '.join(LR_SCHEDULES)}")


def make_optimizer(rate, policy: str, ema: float | None = None) -> keras.optimizers.Optimizer:
    """Return Adam at `rate`, keeping a moving average of the weights at momentum `ema` if given, wrapped in
    dynamic loss scaling under mixed float16 (whose gradients underflow)."""
    optimizer = keras.optimizers.Adam(rate, use_ema=ema is not None, ema_momentum=0.99 if ema is None else ema)
    return keras.optimizers.LossScaleOptimizer(optimizer) if policy == "mixed_float16" else optimizer


def weight_maps(settings: TrainSettings, labels: np.ndarray) -> np.ndarray | None:
    """Return the border weight maps (N, H, W) of (N, H, W, 1) labels if the loss needs them, else None."""
    if not losses.needs_weight_map(settings.loss):
        return None
    return np.stack([losses.border_weight_map(label[..., 0]) for label in labels])


def load_data(settings: TrainSettings, fetch: bool = False) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Return ({part: (images, labels)} float32 NHWC, the data report) of the data `settings` name.

    Pages of each part are brought to one shape (`data.part_shapes`):
    training pages reflect-padded up to the crop (larger ones are sampled by
    random crops), validation pages, predicted whole, cut to a multiple of SIZE_MULTIPLE.
    With `fetch`, missing ISBI stacks are downloaded first (`data.ensure_data`).
    """
    if fetch and settings.images is None:
        data.ensure_data(settings.data_dir)
    pages, report = data.load_pages(settings.images, settings.labels, settings.val_images, settings.val_labels,
                                    settings.split, settings.membrane_value, settings.allow_unpaired,
                                    settings.data_dir, settings.seed, settings.context)
    sizes = {part: [page.shape for page in images] for part, (images, _) in pages.items()}
    shapes = data.part_shapes(sizes["train"], sizes["validation"], settings.crop, SIZE_MULTIPLE)
    shapes.update({part: shapes["validation"] for part in pages if part not in shapes})
    report["network_input"] = {part: list(shape) for part, shape in shapes.items()}
    split = {part: (data.stack_pages(x, shapes[part]), data.stack_pages(y, shapes[part]))
             for part, (x, y) in pages.items()}
    return split, report


def training_batches(settings: TrainSettings, split: dict, first_step: int = 0) -> augment.AugmentedBatches:
    """Return the endless augmented training batches of `split['train']` as `settings` describe them, the first
    being optimizer step `first_step`'s."""
    images, labels = split["train"]
    crop = None if images.shape[1:3] == (settings.crop, settings.crop) else settings.crop
    return augment.AugmentedBatches(
        images, labels, settings.batch_size, settings.steps_per_epoch, settings.augmentation, crop, settings.seed,
        weights=weight_maps(settings, labels),
        # Worker processes augment outside the training process's GIL. Without them tf.data prefetches
        # from a thread.
        workers=max(settings.data_workers, 1), use_multiprocessing=settings.data_workers > 0,
        max_queue_size=4 * settings.data_workers or 10, first_step=first_step, target=label_target(settings),
    )


def load_checkpoint(path: str | Path) -> keras.Model:
    """Return a model saved while training (last.keras, backup.keras) whole: optimizer, loss and metrics."""
    return load_model(path, custom_objects=CUSTOM_OBJECTS)


def banner(settings: TrainSettings, model: keras.Model, policy: str, start: runs.ResumePoint, strategy,
           run: runs.RunFolder, chief: bool) -> str:
    """Return the lines that say what a run is about to do, and where and on what."""
    epoch, batch = divmod(start.steps, settings.steps_per_epoch)
    schedule = f" ({settings.lr_schedule})" if settings.lr_schedule != "constant" else ""
    parts = [
        f"preset {settings.preset}",
        f"{settings.filters} filters ({model.count_params():,} parameters)",
        f"{settings.crop}x{settings.crop} crops, batch {settings.batch_size}",
        f"{settings.epochs} epochs x {settings.steps_per_epoch} steps from epoch {epoch}"
        + (f" batch {batch}" if batch else ""),
        f"lr {settings.learning_rate}{schedule}" + (f", weights averaged (momentum {settings.ema})" if settings.ema else ""),
        f"precision {policy}",
    ]
    if settings.target != "membranes":
        parts.insert(2, f"target {settings.target} (offsets {settings.offsets})")
    if settings.context > 1:
        parts.insert(2, f"context {settings.context} sections")
    if settings.strategy != "default":
        writer = "" if chief else f", not the chief: writing to {run.path}"
        parts.append(f"strategy {settings.strategy} ({distribute.replicas(strategy)} replicas{writer})")
    if settings.time_limit:
        parts.append(f"time limit {settings.time_limit / 60:.0f} min")
    return f"starting training: {', '.join(parts)}\n  on {hardware.describe()}\n  run folder {settings.run_dir}"


def build_model(settings: TrainSettings, policy: str) -> keras.Model:
    """Return a new U-Net for `settings`, compiled with its optimizer, loss and metrics."""
    offsets = target_offsets(settings)
    model = build_unet((None, None, settings.context), filters=settings.filters, dtype_policy=policy, batch_norm=settings.batch_norm,
                       out_channels=1 if offsets is None else len(offsets), head_filters=settings.head_filters)
    model.compile(
        optimizer=make_optimizer(learning_rate(settings), policy, settings.ema),
        loss=losses.get_loss(settings.loss, pair_mask=offsets is not None),
        metrics=[accuracy(pair_mask=offsets is not None), pixel_difference, MembraneDice(), membrane_iou()],
    )
    # Its variables made now, the optimizer does not make TensorFlow trace the first train step twice.
    model.optimizer.build(model.trainable_variables)
    return model


def describe_compiled(model: keras.Model) -> str:
    """Return one line naming what `model` is compiled with: its loss, metrics, optimizer and learning rate."""
    config = model.get_compile_config()
    optimizer = model.optimizer
    scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    optimizer = optimizer.inner_optimizer if scaling else optimizer
    rate = optimizer.get_config()["learning_rate"]
    rate = rate["class_name"] if isinstance(rate, dict) else f"{rate:g}"
    metrics = ", ".join(_compiled_name(metric) for metric in config["metrics"])
    return (f"compiled with loss {_compiled_name(config['loss'])}; metrics {metrics}; optimizer "
            f"{type(optimizer).__name__}{' (dynamic loss scaling)' if scaling else ''}, learning rate {rate}")


def _compiled_name(item) -> str:
    """Return the name of one loss or metric of a compile config: its string, or its serialized name."""
    if isinstance(item, str):
        return item
    config = item.get("config")
    return config["name"] if isinstance(config, dict) else str(config).rsplit(">", 1)[-1]


class RunCallbacks(NamedTuple):
    """A run's callbacks by name; a tuple, as Keras's fit takes them. Their order does not matter (callbacks.py)."""

    stop_on_nan: StopOnNaN  # first: a NaN loss raises before anything saves the broken weights
    tensorboard: TensorBoard
    model_checkpoint: ModelCheckpoint
    image_history: ImageHistory
    step_backup: StepBackup
    time_limit: TimeLimit
    averaged_validation: AveragedValidation  # inert unless settings.ema


def make_callbacks(prepared: Prepared) -> RunCallbacks:
    """Return the callbacks of the prepared run."""
    settings, run, start = prepared.settings, prepared.run, prepared.start
    val_x, val_y = prepared.split["validation"]
    image_history = ImageHistory(val_x, val_y, run.logs, challenge_every=settings.challenge_every,
                                 draw_interval=settings.draw_interval, segmenter=cell_segmenter(settings))
    return RunCallbacks(
        stop_on_nan=StopOnNaN(settings.steps_per_epoch, f"the checkpoints in {run.path}"),
        # The weight pictures are off by default: a hundred cards of bars that bury the image history in
        # TensorBoard's Images tab; the histograms show the weights already.
        tensorboard=TensorBoard(str(run.logs), histogram_freq=settings.histogram_freq, write_graph=True,
                                write_images=settings.weight_images, update_freq=settings.update_freq),
        model_checkpoint=ModelCheckpoint(run, settings.monitor, monitor_mode(settings.monitor), start.best,
                                         {"settings": prepared.saved}, image_history),
        image_history=image_history,
        step_backup=StepBackup(run.backup, settings.backup_every if prepared.chief else 0, settings.steps_per_epoch),
        time_limit=TimeLimit(settings.time_limit, start.steps // settings.steps_per_epoch, settings.epochs),
        averaged_validation=AveragedValidation(),
    )


def fit(prepared: Prepared, callbacks, say: Callable[[str], None] | None = None) -> dict:
    """Train the prepared model from its start to the last epoch with `callbacks`, and write the run's summary.json;
    return {'history': per-epoch logs (Keras's History), 'best', 'last', 'logs', 'seconds', 'precision'}.

    `say` receives the closing line. Ctrl-C or SIGTERM save a backup and
    raise `cli.Interrupted`, which says how to resume.
    """
    say = say or (lambda line: None)
    model, settings, shared = prepared.model, prepared.settings, prepared.shared
    began = time.monotonic()
    try:
        workers = augment.workers_from_a_fork_server() if settings.data_workers else contextlib.nullcontext()
        with interrupts_raise(), workers:
            history = _fit_epochs(model, settings, prepared.split, prepared.start, list(callbacks), prepared.replicas)
    except KeyboardInterrupt as stop:
        backup = prepared.run.backup if prepared.chief else None
        raise _save_interrupted(model, backup, settings.steps_per_epoch, str(stop)) from stop
    finally:
        prepared.write_dir.cleanup()  # a worker's temporary folder goes, even when training fails
    seconds = time.monotonic() - began
    say(f"training took {seconds / 60:.1f} min; best model: {shared.best}")
    if prepared.chief:
        shared.write_json(shared.summary, run_summary(settings, prepared.policy, seconds, prepared.start, history,
                                                           prepared.commit))
    return {"history": history, "best": shared.best, "last": shared.last, "logs": shared.logs, "seconds": seconds,
            "precision": prepared.policy}


def _fit_epochs(model: keras.Model, settings: TrainSettings, split: dict, start: runs.ResumePoint, callbacks: list,
                replicas: int) -> dict:
    """Train `model` from `start` to the last epoch; return the per-epoch logs (Keras's History)."""
    val_x, val_y = split["validation"]
    val_w = weight_maps(settings, val_y)
    val_y = validation_targets(settings, val_y)
    arrays = (val_x, val_y) if val_w is None else (val_x, val_y, val_w)
    kwargs = dict(
        validation_data=distribute.replicate_pages(*arrays, count=replicas),
        validation_batch_size=replicas,
        callbacks=callbacks,
        verbose=settings.verbose,
        shuffle=False,  # each batch is random already; Keras' shuffled order would differ on a resumed run
    )
    steps = settings.steps_per_epoch
    initial_epoch, first_index = divmod(start.steps, steps)
    whole_from = initial_epoch + bool(first_index)  # the first epoch trained from its first batch
    history = {}
    if first_index and whole_from <= settings.epochs:
        # A run stopped mid-epoch first trains the rest of that epoch, on the batches it had not seen.
        rest = training_batches(settings, split, start.steps)
        with trained_weights_kept(model):
            history = model.fit(rest, epochs=whole_from, initial_epoch=initial_epoch,
                                steps_per_epoch=steps - first_index, **kwargs).history
    later = model.fit(training_batches(settings, split, whole_from * steps), epochs=settings.epochs,
                      initial_epoch=whole_from, steps_per_epoch=steps, **kwargs).history
    return {key: history.get(key, []) + values for key, values in later.items()}


def run_summary(settings: TrainSettings, policy: str, seconds: float, start: runs.ResumePoint, history: dict,
                commit: str | None) -> dict:
    """Return what summary.json records of a finished run (`commit`: the checkout's when training started)."""
    epochs = len(history.get("loss", []))
    return {
        "command": " ".join(sys.argv) if Path(sys.argv[0]).name == "train.py" else "train.train(settings)",
        "commit": commit,
        "machine": hardware.describe(),
        "precision": policy,
        "seconds": seconds,
        "epochs_trained": epochs,
        "epochs_done": start.steps // settings.steps_per_epoch + epochs,
        "steps_per_epoch": settings.steps_per_epoch,
        "final_logs": {key: float(values[-1]) for key, values in history.items() if values},
    }


def train(settings: TrainSettings, loaded: tuple[dict, dict] | None = None,
          say: Callable[[str], None] | None = None) -> dict:
    """Train (or resume) a run: `prepare`, `make_callbacks`, `fit`; return what `fit` returns.

    `loaded` and `say` are `prepare`'s. Under a multi-worker strategy every
    worker calls this with the same settings; only the chief writes to the run
    folder. Ctrl-C or SIGTERM save a backup and raise `cli.Interrupted`, which
    says how to resume.
    """
    prepared = prepare(settings, loaded, say)
    return fit(prepared, make_callbacks(prepared), say)


@dataclasses.dataclass
class Prepared:
    """A run made ready to train by `prepare`."""

    settings: TrainSettings  # sized to the budget
    split: dict  # {part: (images, labels)}, as load_data returns them
    model: keras.Model  # built and compiled, or resumed with its optimizer
    start: runs.ResumePoint
    policy: str  # the precision policy
    strategy: object  # the tf.distribute strategy
    replicas: int
    chief: bool  # whether this process writes the run folder
    write_dir: distribute.WriteDir
    run: runs.RunFolder  # where this process writes: the run folder, or a worker's temporary one
    shared: runs.RunFolder  # the run folder
    saved: dict  # the settings as saved beside the run (state_settings)
    commit: str | None  # the checkout's commit when the run was prepared: what it trains (runs.git_commit)


def prepare(settings: TrainSettings, loaded: tuple[dict, dict] | None = None,
            say: Callable[[str], None] | None = None) -> Prepared:
    """Return the run `settings` describe made ready to train: the devices set up, the data loaded and reported,
    the epochs sized to the budget, the model built and compiled or resumed from the run folder, its
    settings.json written.

    `loaded` is (split, report) from `load_data(settings)` when the caller has
    them already (the notebook); `say` receives the lines that tell what
    happens.
    """
    say = say or (lambda line: None)
    setup_began, commit = time.monotonic(), runs.git_commit()
    # First: devices and multi-worker communication are set up before any other TensorFlow work.
    strategy = distribute.make_strategy(settings.strategy, settings.cpu_devices)
    replicas = distribute.replicas(strategy)
    if settings.batch_size % replicas:
        raise ValueError(f"batch_size {settings.batch_size} (the global batch) does not divide evenly across "
                         f"{replicas} replicas of strategy {settings.strategy!r}")
    chief = distribute.is_chief(strategy)
    write_dir = distribute.WriteDir(settings.run_dir, chief)
    run, shared = runs.RunFolder(write_dir.path), runs.RunFolder(settings.run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    policy = hardware.choose_precision(settings.precision)
    settings.check()  # made valid, but perhaps changed since: refused here, before the data load
    keras.utils.set_random_seed(settings.seed)
    if settings.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()

    split, report = loaded if loaded is not None else load_data(settings)
    if loaded is None:
        say(data.format_report(report))
    if chief:
        data.write_report(report, run.path)
    sizing = None
    if settings.budget:
        previous = shared.saved_settings() if settings.resume and not settings.clear_all else None
        measure = functools.partial(measure_speed, split=split, policy=policy)
        settings, sizing = size_to_budget(settings, measure, previous, time.monotonic() - setup_began)
        say(sizing_line(settings, sizing))
    saved = state_settings(settings, sizing)
    with strategy.scope():
        # Every worker resumes from the run folder (shared between machines), which only the chief writes.
        start = runs.ResumePoint()
        if settings.resume and not settings.clear_all:
            start = runs.resume_point(shared, saved, load_checkpoint)
        if start.model is not None:
            say(start.describe(settings.steps_per_epoch))
        model = start.model if start.model is not None else build_model(settings, policy)
    if settings.clear_all and chief:  # last: every setting and the data were checked, the model built
        run.clear()
    run.write_json(run.settings, saved)
    if chief:
        # TensorBoard forgets what a killed run logged after the step this run resumes from.
        runs.mark_session_start([run.logs / part for part in runs.TENSORBOARD_PARTS], start.steps + 1)
    say(banner(settings, model, policy, start, strategy, run, chief))
    return Prepared(settings, split, model, start, policy, strategy, replicas, chief, write_dir, run, shared, saved,
                    commit)


def _save_interrupted(model: keras.Model, backup: Path | None, steps_per_epoch: int,
                      signal_name: str) -> cli.Interrupted:
    """Save `model` to `backup` (None: not this worker's job); return the interruption, saying how to resume."""
    if backup is not None:
        files.write_atomic(backup, model.save)
    where = runs.position(int(model.optimizer.iterations.numpy()), steps_per_epoch)
    return cli.Interrupted(f"interrupted ({signal_name or 'KeyboardInterrupt'}) in {where}"
                           + (f"; saved {backup}" if backup is not None else "")
                           + ". Run the same command again to resume from there.")


def build_parser() -> argparse.ArgumentParser:
    """Return train.py's command line (presets.build_parser, headed by this module's docstring)."""
    return presets.build_parser(__doc__)


def parse_args(argv: list[str] | None = None) -> TrainSettings:
    """Return the settings named on the command line `argv`."""
    return settings_from(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> None:
    """Train the run the parsed command line names, saying what happens."""
    train(settings_from(args), say=print)


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C or SIGTERM: train() saves a backup and says how to resume (exit code 130, cli.run).
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
