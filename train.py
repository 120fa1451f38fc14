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

import argparse
import contextlib
import dataclasses
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np

import data
import distribute
import hardware
import losses
from callbacks import (BestModel, ChallengeScores, ImageHistory, ResumableTensorBoard, StepBackup, StopOnNaN,
                       TimeLimit, TrainingState, UniformPredictionWarning, mark_session_start, save_model_atomic)
from metrics import MembraneDice, membrane_iou, pixel_difference
from model import build_unet, with_dtype_policy

PROJECT_DIR = Path(__file__).resolve().parent
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
    batch_norm: bool = False  # batch normalisation between each convolution and its ReLU (not in the original)
    crop: int = 512  # side of the square training patches, pixels (512 = whole pages)
    batch_size: int = 5
    steps_per_epoch: int = 1000
    epochs: int = 3
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine": from learning_rate down to 1 % of it over epochs x steps_per_epoch
    loss: str = "binary_crossentropy"  # or weighted_bce (U-Net paper's border weights), dice, bce_dice
    precision: str = "auto"  # see hardware.choose_precision
    data_workers: int = 0  # processes augmenting batches ahead of training (0: a thread of the training process)
    strategy: str = "default"  # or mirrored / multiworker, see distribute.py; batch_size is the global batch
    cpu_devices: int = 1  # split the CPU into this many logical devices (the mirrored strategy without GPUs)
    monitor: str = "val_loss"  # what best.keras is chosen by (the original used training loss)
    challenge_every: int = 1  # epochs between validation V_rand / V_info (0: never)
    draw_interval: int = 100  # optimizer steps between ImageHistory pictures
    histogram_freq: int = 1
    update_freq: int = 100
    time_limit: float | None = None  # seconds; stops before an epoch that would end after it (callbacks.TimeLimit)
    seed: int = 0
    deterministic: bool = False  # identical losses step by step on a rerun (TensorFlow op determinism; slower)
    backup_every: int = 100  # optimizer steps between mid-epoch backups (backup.keras) a killed run resumes from
    clear_all: bool = False  # delete the run's models and logs before starting
    resume: bool = True  # continue from run_dir/last.keras when it is there
    verbose: int = 2  # Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch
    augmentation: data.Augmentation = dataclasses.field(default_factory=data.Augmentation)
    preset: str = "original"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    "original": TrainSettings(),
    # Chosen for a 2-core CPU by measurement on AMD EPYC Zen 4 (README, Results):
    # 16 filters, 256x256 crops, batch 4, Adam 1e-3 (it beat 5e-4). Cross-entropy plus
    # the Dice of the membranes beat cross-entropy alone on every test score; a cosine
    # decay merged cells on a test page, the border-weighted loss was worse on both.
    # Batch normalisation costs 1.4x per step on this CPU (0.54 s against 0.38 s) but
    # in 25 epochs beat 40 without it on test accuracy (0.916 against 0.908) and pixel
    # difference (11.2 % against 11.5 %). 25 epochs take about 27 minutes here; the time
    # limit stops a slower CPU before an epoch that would end after 30 minutes.
    "cpu": TrainSettings(
        run_dir="runs/cpu",
        filters=16,
        batch_norm=True,
        crop=256,
        batch_size=4,
        steps_per_epoch=100,
        epochs=25,
        learning_rate=1e-3,
        loss="bce_dice",
        draw_interval=200,
        time_limit=30 * 60,
        backup_every=25,
        augmentation=data.Augmentation(vertical_flip=True, rot90=True),
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


def git_commit() -> str | None:
    """Return the project's current git commit (with '+dirty' if changed), or None outside git."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_DIR, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_DIR,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def run_paths(run_dir: str | Path) -> dict[str, Path]:
    """Return the files of a run folder: logs, best, last, state, settings."""
    run_dir = Path(run_dir)
    return {
        "run_dir": run_dir,
        "logs": run_dir / "logs",
        "best": run_dir / "best.keras",
        "last": run_dir / "last.keras",
        "state": run_dir / "state.json",
        "backup": run_dir / "backup.keras",
        "settings": run_dir / "settings.json",
        "summary": run_dir / "summary.json",
    }


def clear_run(run_dir: str | Path) -> None:
    """Delete a run's models, state and TensorBoard logs (the original's clear_all)."""
    paths = run_paths(run_dir)
    shutil.rmtree(paths["logs"], ignore_errors=True)
    for key in ("best", "last", "state", "settings", "summary", "backup"):
        paths[key].unlink(missing_ok=True)


def load_model(path: str | Path, precision: str | None = None) -> keras.Model:
    """Return a model saved by this project (with its custom metric).

    With `precision` (e.g. 'auto', see `hardware.choose_precision`) the model
    is returned for inference in that precision: recast if it was saved in
    another one, then without its optimizer.
    """
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path}: no such model file")
    try:
        model = keras.models.load_model(path, custom_objects=CUSTOM_OBJECTS)
    except Exception as err:  # Keras raises many types for files that are not its models
        raise data.DataError(f"{path}: not a Keras model this project can load ({data.error_reason(err)})") from err
    if precision is None:
        return model
    policy = hardware.choose_precision(precision)
    if model.get_layer("CNT_1_conv_1").dtype_policy.name == policy:
        return model
    return with_dtype_policy(model, policy)


def _position(steps: int, steps_per_epoch: int) -> str:
    """Return where optimizer step `steps` leaves training, as 'epoch E after batch B (optimizer step S)'."""
    epoch, batch = divmod(steps, steps_per_epoch)
    return f"epoch {epoch + 1} after batch {batch} (optimizer step {steps})"


def _resume_point(settings: TrainSettings, paths: dict) -> tuple[keras.Model | None, int, float | None]:
    """Return (model, optimizer steps done, best monitored value) of an earlier run, or (None, 0, None).

    The model is the newer of last.keras (saved at an epoch end) and
    backup.keras (saved every `backup_every` steps and when interrupted).
    """
    state = json.loads(paths["state"].read_text()) if paths["state"].is_file() else {}
    has_last = paths["last"].is_file() and bool(state)
    if not (settings.resume and (has_last or paths["backup"].is_file())):
        return None, 0, None
    saved, current = state.get("settings"), state_settings(settings)
    if saved is None and paths["settings"].is_file():  # killed before its first epoch ended
        saved = json.loads(paths["settings"].read_text())
    for key in ("filters", "batch_norm", "precision_policy", "loss"):
        if key in (saved or {}) and saved[key] != current[key]:
            raise ValueError(
                f"{paths['last']} was trained with {key}={saved[key]!r}, not {current[key]!r}; "
                "use another run_dir, or clear_all=True (--clear-all) to start afresh"
            )
    done = int(state.get("epochs_done", 0)) * settings.steps_per_epoch
    if paths["backup"].is_file():
        model = load_model(paths["backup"])
        steps = int(model.optimizer.iterations.numpy())
        same_epochs = (saved or {}).get("steps_per_epoch", settings.steps_per_epoch) == settings.steps_per_epoch
        if steps > done and same_epochs:
            print(f"resuming from {paths['backup']} in {_position(steps, settings.steps_per_epoch)}")
            return model, steps, state.get("best")
    if not has_last:
        return None, 0, None
    print(f"resuming from {paths['last']} after epoch {state['epochs_done']}")
    return load_model(paths["last"]), done, state.get("best")


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


def state_settings(settings: TrainSettings) -> dict:
    """Return the settings as saved beside a run, with the resolved precision policy."""
    return {**settings.to_dict(), "precision_policy": hardware.choose_precision(settings.precision)}


LR_SCHEDULES = ("constant", "cosine")


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


def load_data(settings: TrainSettings) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Return ({part: (images, labels)} float32 NHWC, the data report) of the data `settings` name.

    Pages of each part are brought to one shape (`data.part_shapes`):
    training pages reflect-padded up to the crop (larger ones are sampled by
    random crops), validation pages, predicted whole, cut to a multiple of 16.
    """
    pages, report = data.load_pages(settings.images, settings.labels, settings.val_images, settings.val_labels,
                                    settings.split, settings.membrane_value, settings.allow_unpaired,
                                    settings.data_dir, settings.seed)
    sizes = {part: [page.shape for page in images] for part, (images, _) in pages.items()}
    shapes = data.part_shapes(sizes["train"], sizes["validation"], settings.crop)
    shapes.update({part: shapes["validation"] for part in pages if part not in shapes})
    report["network_input"] = {part: list(shape) for part, shape in shapes.items()}
    split = {part: (data.stack_pages(x, shapes[part]), data.stack_pages(y, shapes[part]))
             for part, (x, y) in pages.items()}
    return split, report


def training_batches(
    settings: TrainSettings, split: dict, epoch: int = 0, first_index: int = 0
) -> data.AugmentedBatches:
    """Return the augmented training batches of `split['train']` as `settings` describe them, from `epoch`
    (each epoch's batches from `first_index` on)."""
    images, labels = split["train"]
    crop = None if images.shape[1:3] == (settings.crop, settings.crop) else settings.crop
    batches = data.AugmentedBatches(
        images, labels, settings.batch_size, settings.steps_per_epoch, settings.augmentation, crop, settings.seed,
        weights=weight_maps(settings, labels),
        # Worker processes augment outside the training process's GIL; each epoch starts a fresh pool
        # that sees the dataset's current epoch. Without them tf.data prefetches from a thread.
        workers=max(settings.data_workers, 1), use_multiprocessing=settings.data_workers > 0,
        max_queue_size=4 * settings.data_workers or 10, first_index=first_index,
    )
    batches.epoch = epoch
    return batches


def train(settings: TrainSettings) -> dict:
    """Train (or resume) a run; return {'history': per-epoch logs, 'best', 'last', 'logs', 'seconds'}.

    Under a multi-worker strategy every worker calls this with the same
    settings; only the chief writes to the run folder.
    """
    # First: devices and multi-worker communication are set up before any other TensorFlow work.
    strategy = distribute.make_strategy(settings.strategy, settings.cpu_devices)
    if settings.batch_size % distribute.replicas(strategy):
        raise ValueError(f"batch_size {settings.batch_size} (the global batch) does not divide evenly across "
                         f"{distribute.replicas(strategy)} replicas of strategy {settings.strategy!r}")
    chief = distribute.is_chief(strategy)
    write_dir = distribute.WriteDir(settings.run_dir, chief)
    paths = run_paths(write_dir.path)
    if settings.clear_all and chief:
        clear_run(paths["run_dir"])
    paths["run_dir"].mkdir(parents=True, exist_ok=True)
    policy = hardware.choose_precision(settings.precision)
    loss = losses.get_loss(settings.loss)  # unknown names fail here, before the data load
    rate = learning_rate(settings)
    keras.utils.set_random_seed(settings.seed)
    if settings.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()

    split, report = load_data(settings)
    print(data.format_report(report))
    if chief:
        data.write_report(report, paths["run_dir"])
    val_x, val_y = split["validation"]
    val_w = weight_maps(settings, val_y)

    with strategy.scope():
        # Every worker resumes from the run folder (shared between machines), which only the chief writes.
        resume = settings.resume and not settings.clear_all
        model, steps_done, best = _resume_point(settings, run_paths(settings.run_dir)) if resume else (None, 0, None)
        if model is None:
            model = build_unet((None, None, 1), filters=settings.filters, dtype_policy=policy,
                               batch_norm=settings.batch_norm)
            model.compile(
                optimizer=make_optimizer(rate, policy),
                loss=loss,
                metrics=["accuracy", pixel_difference, MembraneDice(), membrane_iou()],
            )
    saved = state_settings(settings)
    data.write_atomic(paths["settings"], json.dumps(saved, indent=2))
    initial_epoch, first_index = divmod(steps_done, settings.steps_per_epoch)
    if chief:
        # TensorBoard forgets what a killed run logged after the step this run resumes from.
        mark_session_start([paths["logs"] / part for part in ("train", "validation", "images")], steps_done + 1)

    whole_from = initial_epoch + bool(first_index)  # the first epoch trained from its first batch
    batches = training_batches(settings, split, whole_from)
    mode = monitor_mode(settings.monitor)
    # First: a NaN loss stops training before anything saves the broken weights.
    callbacks = [StopOnNaN(settings.steps_per_epoch, f"the checkpoints in {paths['run_dir']}")]
    if settings.challenge_every:
        # Before the checkpoints: it adds val_v_rand / val_v_info to the logs they read.
        callbacks.append(ChallengeScores(val_x, val_y, paths["logs"] / "validation", every=settings.challenge_every))
    callbacks += [
        UniformPredictionWarning(val_x),  # before TensorBoard, which logs its val_uniform
        ResumableTensorBoard(
            str(paths["logs"]),
            histogram_freq=settings.histogram_freq,
            write_graph=True,
            write_images=True,
            update_freq=settings.update_freq,
        ),
        BestModel(paths["best"], settings.monitor, mode, best),
        TrainingState(paths["last"], paths["state"], settings.monitor, best, {"settings": saved}, mode),
        ImageHistory(paths["logs"] / "images", val_x, val_y, draw_interval=settings.draw_interval),
        StepBackup(paths["backup"], settings.backup_every if chief else 0),
    ]
    callbacks.append(TimeLimit(settings.time_limit, initial_epoch, settings.epochs))

    print(
        f"starting training: preset {settings.preset}, {settings.filters} filters "
        f"({model.count_params():,} parameters), {settings.crop}x{settings.crop} crops, batch {settings.batch_size}, "
        f"{settings.epochs} epochs x {settings.steps_per_epoch} steps from epoch {initial_epoch}"
        + (f" batch {first_index}" if first_index else "") + ", "
        f"lr {settings.learning_rate}" + (f" ({settings.lr_schedule})" if settings.lr_schedule != "constant" else "")
        + f", precision {policy}"
        + (f", strategy {settings.strategy} ({distribute.replicas(strategy)} replicas"
           f"{'' if chief else ', not the chief: writing to ' + str(paths['run_dir'])})"
           if settings.strategy != "default" else "")
        + (f", time limit {settings.time_limit / 60:.0f} min" if settings.time_limit else "")
        + f"\n  on {hardware.describe()}\n  run folder {paths['run_dir']}"
    )
    start = time.monotonic()
    fit = dict(
        validation_data=distribute.replicate_pages(*((val_x, val_y) if val_w is None else (val_x, val_y, val_w)),
                                                   count=distribute.replicas(strategy)),
        validation_batch_size=distribute.replicas(strategy),
        callbacks=callbacks,
        verbose=settings.verbose,
        shuffle=False,  # each batch is random already; Keras' shuffled order would differ on a resumed run
    )
    try:
        with interrupts_raise():
            # A run stopped mid-epoch first trains the rest of that epoch, on the batches it had not seen.
            rest = {}
            if first_index and whole_from <= settings.epochs:
                rest = model.fit(training_batches(settings, split, initial_epoch, first_index), epochs=whole_from,
                                 initial_epoch=initial_epoch, **fit).history
            history = model.fit(batches, epochs=settings.epochs, initial_epoch=whole_from, **fit)
            history.history = {k: rest.get(k, []) + v for k, v in history.history.items()} if rest else history.history
    except KeyboardInterrupt as stop:
        _save_interrupted(model, paths["backup"] if chief else None, settings.steps_per_epoch, str(stop))
        raise
    finally:
        write_dir.cleanup()  # a worker's temporary folder goes, even when training fails
    seconds = time.monotonic() - start
    paths = run_paths(settings.run_dir)
    print(f"training took {seconds / 60:.1f} min; best model: {paths['best']}")
    summary = {
        "command": " ".join(sys.argv) if Path(sys.argv[0]).name == "train.py" else "train.train(settings)",
        "commit": git_commit(),
        "machine": hardware.describe(),
        "precision": policy,
        "seconds": seconds,
        "epochs_trained": len(history.history.get("loss", [])),
        "epochs_done": initial_epoch + len(history.history.get("loss", [])),
        "steps_per_epoch": settings.steps_per_epoch,
        "final_logs": {k: float(v[-1]) for k, v in history.history.items() if v},
    }
    if chief:
        data.write_atomic(paths["summary"], json.dumps(summary, indent=2))
    return {
        "history": history.history,
        "best": paths["best"],
        "last": paths["last"],
        "logs": paths["logs"],
        "seconds": seconds,
        "precision": policy,
    }


def _save_interrupted(model: keras.Model, backup: Path | None, steps_per_epoch: int, signal_name: str) -> None:
    """Save `model` to `backup` (None: not this worker's job) and say how to resume."""
    if backup is not None:
        save_model_atomic(model, backup)
    where = _position(int(model.optimizer.iterations.numpy()), steps_per_epoch)
    print(f"\ninterrupted ({signal_name or 'KeyboardInterrupt'}) in {where}" + (f"; saved {backup}" if backup is not None else "")
          + ". Run the same command again to resume from there.", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> TrainSettings:
    """Return the settings named on the command line: a preset, then any field overridden."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="auto", help="auto (default), " + ", ".join(PRESETS))
    types = {"int": int, "float": float, "float | None": float, "int | None": int}
    for field in dataclasses.fields(TrainSettings):
        if field.name in ("augmentation", "preset"):
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=types.get(field.type, str), default=None)
    augmentation = {field.name: field for field in dataclasses.fields(data.Augmentation)}
    helps = {"elastic_grid": "elastic deformation grid points per side (0: off; paper: 3)",
             "elastic_sigma": "elastic displacement standard deviation, pixels",
             "rot90": "random quarter turns (see README: the ISBI labels are not symmetric up/down)"}
    for name, field in augmentation.items():
        flag, text = "--" + name.replace("_", "-"), helps.get(name, "augmentation setting (data.Augmentation)")
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, type=types.get(field.type, float), default=None, help=text)
    args = vars(parser.parse_args(argv))
    changes = {name: args.pop(name) for name in augmentation}
    settings = preset(args.pop("preset"), **args)
    changes = {name: value for name, value in changes.items() if value is not None}
    if changes:
        settings.augmentation = dataclasses.replace(settings.augmentation, **changes)
    return settings


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        train(settings)
    except (ValueError, OSError) as err:  # data.DataError, a NaN loss, bad settings; a run folder not writable
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: train() saved a backup and said how to resume
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
