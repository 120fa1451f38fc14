"""Train the U-Net: settings, presets, and `train(settings)`, shared by the notebook and the command line.

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
import math
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
import runs
import segment
from callbacks import ImageHistory, ModelCheckpoint, StepBackup, StopOnNaN, TensorBoard, TimeLimit
from metrics import MembraneDice, membrane_iou, pixel_difference
from model import SIZE_MULTIPLE, build_unet, load_model

CUSTOM_OBJECTS = {"pixel_difference": pixel_difference, "MembraneDice": MembraneDice, **losses.CUSTOM_OBJECTS}
HIGHER_IS_BETTER = ("accuracy", "v_rand", "v_info", "dice", "iou")


def monitor_mode(monitor: str) -> str:
    """Return 'max' for scores where higher is better (accuracy, V_rand, V_info), else 'min'."""
    return "max" if monitor.endswith(HIGHER_IS_BETTER) else "min"


@dataclasses.dataclass
class TrainSettings:
    """Everything a training run depends on; defaults are the original notebook's."""

    data_dir: str | None = None
    # Your own data (see data.load_pages): images and labels are two multipage TIFFs or two folders of
    # PNG/TIFF pages paired by name; None trains on the ISBI stacks in data_dir.
    images: str | None = None
    labels: str | None = None
    val_images: str | None = None  # separate validation pages (then `split` is not used)
    val_labels: str | None = None
    split: str | None = None  # validation page indices '3,7', a fraction '0.2' (seeded), or 'isbi' (ISBI's default)
    membrane_value: int | None = None  # the mask value of membranes (default: the lower of the two)
    allow_unpaired: bool = False  # skip (and list) images without masks and masks without images
    run_dir: str = "runs/original"
    filters: int = 64
    head_filters: int | None = None  # ReLU filters before the output layer (None: the original's 2 per output)
    batch_norm: bool = False  # batch normalisation between each convolution and its ReLU (not in the original)
    crop: int = 512  # side of the square training patches, pixels (512 = whole pages)
    batch_size: int = 5
    steps_per_epoch: int = 1000
    epochs: int = 3
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine": from learning_rate down to 1 % of it over epochs x steps_per_epoch
    loss: str = "binary_crossentropy"  # or weighted_bce (U-Net paper's border weights), dice, bce_dice
    target: str = "membranes"  # what the network predicts: the original's membrane map, or affinities (affinities.py)
    offsets: str = "1,3,9,27"  # affinity distances in pixels, each taken in y and in x (target affinities only)
    precision: str = "auto"  # see hardware.choose_precision
    data_workers: int = 0  # processes augmenting batches ahead of training (0: a thread of the training process)
    strategy: str = "default"  # or mirrored / multiworker, see distribute.py; batch_size is the global batch
    cpu_devices: int = 1  # split the CPU into this many logical devices (the mirrored strategy without GPUs)
    monitor: str = "val_loss"  # what best.keras is chosen by (the original used training loss)
    challenge_every: int = 1  # epochs between validation V_rand / V_info (0: never)
    draw_interval: int = 100  # optimizer steps between validation pictures (callbacks.ImageHistory)
    # epochs between TensorBoard's weight histograms (0: none, so that it opens on the curves and the image history)
    histogram_freq: int = 0
    weight_images: bool = False  # TensorBoard pictures of every kernel and bias (the original's write_images=True)
    update_freq: int = 100
    time_limit: float | None = None  # seconds; stops before an epoch that would end after it (callbacks.TimeLimit)
    budget: float | None = None  # seconds for the whole run: steps_per_epoch is sized to this machine to fit it
    seed: int = 0
    deterministic: bool = False  # identical losses step by step on a rerun (TensorFlow op determinism; slower)
    backup_every: int = 100  # optimizer steps between mid-epoch backups (backup.keras) a killed run resumes from
    clear_all: bool = False  # delete the run's models and logs before starting
    resume: bool = True  # continue from run_dir/last.keras when it is there
    verbose: int = 2  # Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch
    augmentation: augment.Augmentation = dataclasses.field(default_factory=augment.Augmentation)
    preset: str = "original"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    "original": TrainSettings(),
    # Chosen for a 2-core CPU by measurement on AMD EPYC Zen 4 (docs/EXPERIMENTS.md):
    # 16 filters, 256x256 crops, batch 4, Adam 1e-3 (it beat 5e-4). Cross-entropy plus
    # the Dice of the membranes beat cross-entropy alone on every test score; the border-weighted
    # loss was worse on both. 16 filters before the output (the original's 2 let a run train both
    # onto one side of the membrane: 2 of 3 seeds, flat at 0.43 or 0.88) with a cosine decay of the
    # rate: seeds 1-3 in bench/seeds-head16-cosine.json (docs/EXPERIMENTS.md).
    # Batch normalisation costs 1.4x per step on this CPU (0.54 s against 0.38 s) but
    # in 25 epochs beat 40 without it on test accuracy (0.916 against 0.908) and pixel
    # difference (11.2 % against 11.5 %). With the fused normalisation 25 epochs take 13 minutes
    # on Intel Sapphire Rapids; the budget shortens the epochs of a slower CPU to fit 30 minutes.
    # Backups every 100 steps (at most one epoch, 30 s of training, at risk; none falls on an epoch end,
    # where last.keras is saved). Weight histograms are off, as by default (--histogram-freq 5 draws them
    # every 5 epochs, at 25 and 1 they cost about 2 s each of a 32 s epoch: docs/PERFORMANCE.md).
    "cpu": TrainSettings(
        run_dir="runs/cpu",
        filters=16,
        head_filters=16,
        batch_norm=True,
        crop=256,
        batch_size=4,
        steps_per_epoch=100,
        epochs=25,
        learning_rate=1e-3,
        lr_schedule="cosine",
        loss="bce_dice",
        draw_interval=200,
        time_limit=30 * 60,
        budget=30 * 60,
        backup_every=100,
        augmentation=augment.Augmentation(vertical_flip=True, rot90=True),
        preset="cpu",
    ),
    # For tests and the headless notebook check: seconds, not minutes.
    "tiny": TrainSettings(
        run_dir="runs/tiny",
        filters=4,
        crop=64,
        batch_size=2,
        steps_per_epoch=3,
        epochs=2,
        learning_rate=1e-3,
        draw_interval=2,
        histogram_freq=0,
        update_freq=1,
        challenge_every=0,
        verbose=0,
        preset="tiny",
    ),
}


def preset(name: str = "auto", **overrides) -> TrainSettings:
    """Return the settings of preset `name` ('auto' = 'original' on a GPU, else 'cpu') with overrides.

    Overrides that are None are ignored, so that unset command-line flags and
    notebook parameters keep the preset's value.
    """
    if name == "auto":
        name = "original" if hardware.gpu_names() else "cpu"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from auto, {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


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


BUDGET_MARGIN = 0.93  # of the budget planned for: the estimate's error, checkpoints, TensorBoard and the data report
VALIDATION_SHARE = 0.25  # of the budget at most for the epochs' validation, when the recipe does not fit


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


def size_to_budget(settings: TrainSettings, split: dict, policy: str, previous: dict | None,
                   spent: float = 0.0) -> tuple[TrainSettings, dict]:
    """Return (settings with epochs and steps_per_epoch sized so that the run ends within `budget` seconds on
    this machine, what was measured and chosen). A recipe that fits is kept whole. Otherwise the epochs are
    shortened; where validating every epoch would take more than VALIDATION_SHARE of the budget, there are
    fewer, longer epochs (never more steps than the recipe's in all). A resumed run keeps the sizing it
    started with (`previous`: its saved settings). `spent`: seconds already gone (the data load)."""
    recipe = {"recipe_epochs": settings.epochs, "recipe_steps_per_epoch": settings.steps_per_epoch}
    if previous and all(previous.get("sizing", {}).get(key) == value for key, value in recipe.items()) and \
            previous.get("budget") == settings.budget:
        sizing = {**previous["sizing"], "resumed": True}
        return dataclasses.replace(settings, epochs=sizing["epochs"], steps_per_epoch=sizing["steps_per_epoch"]), sizing
    began = time.perf_counter()
    speed = measure_speed(settings, split, policy)
    left = BUDGET_MARGIN * settings.budget - spent - (time.perf_counter() - began)
    epochs, steps = settings.epochs, settings.steps_per_epoch
    if epochs * (steps * speed["step"] + speed["validation"]) > left:
        total = epochs * steps
        epochs = int(min(epochs, max(1, VALIDATION_SHARE * left // max(speed["validation"], 1e-9))))
        steps = int(max(1, min(math.ceil(total / epochs), (left / epochs - speed["validation"]) // speed["step"])))
    sizing = {"seconds_per_step": round(speed["step"], 4), "validation_seconds": round(speed["validation"], 2),
              **recipe, "epochs": epochs, "steps_per_epoch": steps,
              "planned_minutes": round((epochs * (steps * speed["step"] + speed["validation"])) / 60, 1)}
    return dataclasses.replace(settings, epochs=epochs, steps_per_epoch=steps), sizing


def sizing_line(settings: TrainSettings, sizing: dict) -> str:
    """Return the line that says how the run was sized to the machine, and why."""
    if sizing.get("resumed"):
        return (f"sized when this run started: {settings.epochs} epochs x {sizing['steps_per_epoch']} steps "
                f"({sizing['seconds_per_step']:.2f} s per step then)")
    epochs, recipe = sizing["recipe_epochs"], sizing["recipe_steps_per_epoch"]
    whole = epochs * (recipe * sizing["seconds_per_step"] + sizing["validation_seconds"]) / 60
    if (sizing["epochs"], sizing["steps_per_epoch"]) == (epochs, recipe):
        verdict = f"the whole recipe, {epochs} x {recipe} steps, fits"
    elif sizing["epochs"] == epochs:
        verdict = (f"the recipe's {recipe} steps per epoch would take {whole:.0f} min, so "
                   f"{sizing['steps_per_epoch']} steps per epoch (all {epochs} epochs)")
    else:
        verdict = (f"the recipe, {epochs} x {recipe} steps, would take {whole:.0f} min, and its {epochs} "
                   f"validations more than {VALIDATION_SHARE:.0%} of the budget, so {sizing['epochs']} epochs "
                   f"x {sizing['steps_per_epoch']} steps")
    return (f"sized to this machine: {sizing['seconds_per_step']:.2f} s per train step and "
            f"{sizing['validation_seconds']:.1f} s of validation per epoch, measured; {verdict}; about "
            f"{sizing['planned_minutes']:.0f} of the {settings.budget / 60:.0f}-minute budget")


LR_SCHEDULES = ("constant", "cosine")
TARGETS = ("membranes", "affinities")


def target_offsets(settings: TrainSettings) -> tuple | None:
    """Return the affinity offsets the network predicts, or None for the membrane map."""
    if settings.target not in TARGETS:
        raise ValueError(f"unknown target {settings.target!r}; choose from {', '.join(TARGETS)}")
    if settings.target != "membranes" and losses.needs_weight_map(settings.loss):
        raise ValueError(f"loss {settings.loss!r} weighs membrane pixels; with target {settings.target!r} use "
                         "binary_crossentropy, dice or bce_dice")
    return affinities.parse_offsets(settings.offsets) if settings.target == "affinities" else None


def label_target(settings: TrainSettings) -> Callable[[np.ndarray], np.ndarray] | None:
    """Return the function that turns one (H, W) label page into the network's (H, W, K) targets, or None
    when the label itself is the target."""
    offsets = target_offsets(settings)
    return None if offsets is None else functools.partial(affinities.label_affinities, offsets=offsets)


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


def make_optimizer(rate, policy: str) -> keras.optimizers.Optimizer:
    """Return Adam at `rate`, wrapped in dynamic loss scaling under mixed float16 (whose gradients underflow)."""
    optimizer = keras.optimizers.Adam(rate)
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
                                    settings.data_dir, settings.seed)
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
        f"lr {settings.learning_rate}{schedule}",
        f"precision {policy}",
    ]
    if settings.target != "membranes":
        parts.insert(2, f"target {settings.target} (offsets {settings.offsets})")
    if settings.strategy != "default":
        writer = "" if chief else f", not the chief: writing to {run.path}"
        parts.append(f"strategy {settings.strategy} ({distribute.replicas(strategy)} replicas{writer})")
    if settings.time_limit:
        parts.append(f"time limit {settings.time_limit / 60:.0f} min")
    return f"starting training: {', '.join(parts)}\n  on {hardware.describe()}\n  run folder {settings.run_dir}"


def build_model(settings: TrainSettings, policy: str) -> keras.Model:
    """Return a new U-Net for `settings`, compiled with its optimizer, loss and metrics."""
    offsets = target_offsets(settings)
    model = build_unet((None, None, 1), filters=settings.filters, dtype_policy=policy, batch_norm=settings.batch_norm,
                       out_channels=1 if offsets is None else len(offsets), head_filters=settings.head_filters)
    model.compile(
        optimizer=make_optimizer(learning_rate(settings), policy),
        loss=losses.get_loss(settings.loss),
        metrics=["accuracy", pixel_difference, MembraneDice(), membrane_iou()],
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
        with interrupts_raise():
            history = _fit_epochs(model, settings, prepared.split, prepared.start, list(callbacks), prepared.replicas)
    except KeyboardInterrupt as stop:
        backup = prepared.run.backup if prepared.chief else None
        raise _save_interrupted(model, backup, settings.steps_per_epoch, str(stop)) from stop
    finally:
        prepared.write_dir.cleanup()  # a worker's temporary folder goes, even when training fails
    seconds = time.monotonic() - began
    say(f"training took {seconds / 60:.1f} min; best model: {shared.best}")
    if prepared.chief:
        shared.write_json(shared.summary, run_summary(settings, prepared.policy, seconds, prepared.start, history))
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
        history = model.fit(rest, epochs=whole_from, initial_epoch=initial_epoch, steps_per_epoch=steps - first_index,
                            **kwargs).history
    later = model.fit(training_batches(settings, split, whole_from * steps), epochs=settings.epochs,
                      initial_epoch=whole_from, steps_per_epoch=steps, **kwargs).history
    return {key: history.get(key, []) + values for key, values in later.items()}


def run_summary(settings: TrainSettings, policy: str, seconds: float, start: runs.ResumePoint, history: dict) -> dict:
    """Return what summary.json records of a finished run."""
    epochs = len(history.get("loss", []))
    return {
        "command": " ".join(sys.argv) if Path(sys.argv[0]).name == "train.py" else "train.train(settings)",
        "commit": runs.git_commit(),
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
    setup_began = time.monotonic()
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
    losses.get_loss(settings.loss)  # unknown names fail here, before the data load
    target_offsets(settings)  # and unknown targets or offsets
    learning_rate(settings)  # and unknown schedules
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
        settings, sizing = size_to_budget(settings, split, policy, previous, time.monotonic() - setup_began)
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
    return Prepared(settings, split, model, start, policy, strategy, replicas, chief, write_dir, run, shared, saved)


def _save_interrupted(model: keras.Model, backup: Path | None, steps_per_epoch: int,
                      signal_name: str) -> cli.Interrupted:
    """Save `model` to `backup` (None: not this worker's job); return the interruption, saying how to resume."""
    if backup is not None:
        files.write_atomic(backup, model.save)
    where = runs.position(int(model.optimizer.iterations.numpy()), steps_per_epoch)
    return cli.Interrupted(f"interrupted ({signal_name or 'KeyboardInterrupt'}) in {where}"
                           + (f"; saved {backup}" if backup is not None else "")
                           + ". Run the same command again to resume from there.")


AUGMENTATION_HELP = {
    "elastic_grid": "elastic deformation grid points per side (0: off; paper: 3)",
    "elastic_sigma": "elastic displacement standard deviation, pixels",
    "rot90": "random quarter turns (see docs/EXPERIMENTS.md: the ISBI labels are not symmetric up/down)",
}


def _add_fields(parser: argparse.ArgumentParser, fields, helps: dict[str, str], default_type=str) -> None:
    """Add one flag per dataclass field: --name-with-dashes, booleans as --x / --no-x, unset = None."""
    types = {"int": int, "float": float, "float | None": float, "int | None": int}
    for field in fields:
        flag, text = "--" + field.name.replace("_", "-"), helps.get(field.name)
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, type=types.get(field.type, default_type), default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
    """Return the command line: --preset, then one flag per field of TrainSettings and of augment.Augmentation."""
    parser = cli.parser(__doc__)
    parser.add_argument("--preset", default="auto", help="auto (default), " + ", ".join(PRESETS))
    _add_fields(parser, [f for f in dataclasses.fields(TrainSettings) if f.name not in ("augmentation", "preset")], {})
    _add_fields(parser, dataclasses.fields(augment.Augmentation),
                {f.name: AUGMENTATION_HELP.get(f.name, "augmentation setting (augment.Augmentation)")
                 for f in dataclasses.fields(augment.Augmentation)}, float)
    return parser


def settings_from(args: argparse.Namespace) -> TrainSettings:
    """Return the settings the parsed command line names: the preset's, with every flag given overriding it."""
    values = {k: v for k, v in vars(args).items() if k != "tf_logs"}
    changes = {f.name: values.pop(f.name) for f in dataclasses.fields(augment.Augmentation)}
    settings = preset(values.pop("preset"), **values)
    changes = {name: value for name, value in changes.items() if value is not None}
    if changes:
        settings.augmentation = dataclasses.replace(settings.augmentation, **changes)
    return settings


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
