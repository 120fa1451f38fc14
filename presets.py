"""What a training run is made of: the settings (`TrainSettings`), the presets, and their command-line flags.

A `TrainSettings` checks itself when it is made (and `dataclasses.replace` makes a new one), so that a bad
setting is refused with one clear message before any data is read or model built. Each field's help text
(its metadata) is the help of its train.py flag.
"""

from __future__ import annotations

import argparse
import dataclasses

import affinities
import augment
import data
import cli
import distribute
import hardware
import losses
from shapes import SIZE_MULTIPLE

HIGHER_IS_BETTER = ("accuracy", "v_rand", "v_info", "dice", "iou")
LR_SCHEDULES = ("constant", "cosine")
TARGETS = ("membranes", "affinities")


def monitor_mode(monitor: str) -> str:
    """Return 'max' for scores where higher is better (accuracy, V_rand, V_info), else 'min'."""
    return "max" if monitor.endswith(HIGHER_IS_BETTER) else "min"


def setting(default, text: str):
    """Return a dataclass field with `default` and `text`, the help of its command-line flag."""
    return dataclasses.field(default=default, metadata={"help": text})


@dataclasses.dataclass
class TrainSettings:
    """Everything a training run depends on; defaults are the original notebook's."""

    data_dir: str | None = setting(None, "folder of the ISBI 2012 stacks (default: $ISBI_DATA_DIR, else data/)")
    # Your own data (see data.load_pages): images and labels are two multipage TIFFs or two folders of
    # PNG/TIFF pages paired by name; None trains on the ISBI stacks in data_dir.
    images: str | None = setting(None, "your own training images: a multipage TIFF or a folder of PNG/TIFF pages")
    labels: str | None = setting(None, "their masks: a multipage TIFF or a folder of pages paired by name")
    val_images: str | None = setting(None, "separate validation pages (then --split is not used)")
    val_labels: str | None = setting(None, "the masks of the validation pages")
    split: str | None = setting(None, "validation page indices '3,7', a fraction '0.2' (seeded), or 'isbi' "
                                      "(ISBI's default)")
    membrane_value: int | None = setting(None, "the mask value of membranes (default: the lower of the two)")
    allow_unpaired: bool = setting(False, "skip (and list) images without masks and masks without images")
    run_dir: str = setting("runs/original", "the run folder: models, logs, settings, what a rerun resumes from")
    context: int = setting(1, "sections the network sees at once: the page and its neighbours as input channels "
                              "(1, 3, 5; the stack's ends mirrored, data.with_context)")
    filters: int = setting(64, "filters of the first convolutions (doubled at each of the 4 poolings)")
    fallback_filters: int | None = setting(None, "with a budget: train this many filters instead where the budget "
                                                 "gives `filters` less than half the recipe's steps (sizing.py)")
    head_filters: int | None = setting(None, "ReLU filters before the output layer (default: the original's 2 "
                                             "per output)")
    batch_norm: bool = setting(False, "batch normalisation between each convolution and its ReLU (not in the "
                                      "original)")
    crop: int = setting(512, f"side of the square training patches, pixels, a multiple of {SIZE_MULTIPLE} "
                             "(512 = whole pages)")
    batch_size: int = setting(5, "pages per optimizer step (the global batch under a distribution strategy)")
    steps_per_epoch: int = setting(1000, "optimizer steps per epoch")
    epochs: int = setting(3, "epochs to train (a rerun continues up to this many)")
    learning_rate: float = setting(1e-4, "Adam's learning rate (the start of a schedule)")
    lr_schedule: str = setting("constant", f"{' or '.join(LR_SCHEDULES)} (cosine: from learning_rate down to 1 %% "
                                           "of it over epochs x steps_per_epoch)")
    loss: str = setting("binary_crossentropy", f"{', '.join(losses.LOSSES)} (weighted_bce: the U-Net paper's "
                                               "border weights; losses.py)")
    target: str = setting("membranes", f"what the network predicts: {' or '.join(TARGETS)} (the original's "
                                       "membrane map, or affinities.py's)")
    offsets: str = setting("field", "affinity distances in pixels, each taken in y and in x, or 'field' (the "
                                       "mutex watershed's ISBI set: 1, then 9 and 27 and radius-9 diagonals; "
                                       "target affinities only)")
    precision: str = setting("auto", f"{', '.join(hardware.PRECISIONS)} (auto: the fastest correct one here, "
                                     "hardware.choose_precision)")
    data_workers: int = setting(0, "processes augmenting batches ahead of training (0: a thread of the training "
                                   "process)")
    strategy: str = setting("default", f"{', '.join(distribute.STRATEGIES)} (distribute.py); batch_size is the "
                                       "global batch")
    cpu_devices: int = setting(1, "split the CPU into this many logical devices (the mirrored strategy without "
                                  "GPUs)")
    ema: float | None = setting(None, "momentum of an exponential moving average of the weights (e.g. 0.99: about "
                                      "the last 100 steps), which is validated and saved as best.keras "
                                      "(default: none, the weights as trained)")
    monitor: str = setting("val_loss", "what best.keras is chosen by, e.g. val_loss, val_v_rand (the original "
                                       "used training loss)")
    challenge_every: int = setting(1, "epochs between validation V_rand / V_info (0: never)")
    draw_interval: int = setting(100, "optimizer steps between validation pictures (callbacks.ImageHistory)")
    histogram_freq: int = setting(0, "epochs between TensorBoard's weight histograms (0: none, so that it opens "
                                     "on the curves and the image history)")
    weight_images: bool = setting(False, "TensorBoard pictures of every kernel and bias (the original's "
                                         "write_images=True)")
    update_freq: int = setting(100, "optimizer steps between TensorBoard's training curve points")
    time_limit: float | None = setting(None, "seconds; stops before an epoch that would end after it "
                                             "(callbacks.TimeLimit)")
    budget: float | None = setting(None, "seconds for the whole run: steps_per_epoch is sized to this machine "
                                         "to fit it")
    seed: int = setting(0, "seed of the weights, the augmentation and a fractional split")
    deterministic: bool = setting(False, "identical losses step by step on a rerun (TensorFlow op determinism; "
                                         "slower)")
    backup_every: int = setting(100, "optimizer steps between mid-epoch backups (backup.keras) a killed run "
                                     "resumes from (0: none)")
    clear_all: bool = setting(False, "delete the run's models and logs before starting")
    resume: bool = setting(True, "continue from run_dir/last.keras when it is there")
    verbose: int = setting(2, "Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch")
    augmentation: augment.Augmentation = dataclasses.field(default_factory=augment.Augmentation)
    preset: str = setting("original", "the preset these settings started from")

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot train (called when the settings are made)."""
        losses.get_loss(self.loss)  # unknown loss names
        target_offsets(self)  # unknown targets, bad offsets, a weighted loss with affinities
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose from {', '.join(LR_SCHEDULES)}")
        if self.precision not in hardware.PRECISIONS:
            raise ValueError(f"precision must be one of {hardware.PRECISIONS}, got {self.precision!r}")
        if self.strategy not in distribute.STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {', '.join(distribute.STRATEGIES)}")
        for name in ("filters", "crop", "batch_size", "steps_per_epoch", "epochs", "cpu_devices", "update_freq"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive whole number, got {getattr(self, name)!r}")
        data.check_context(self.context)
        for name in ("head_filters", "fallback_filters"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive whole number or None, got {getattr(self, name)!r}")
        if self.crop % SIZE_MULTIPLE:
            raise ValueError(f"crop must be a multiple of {SIZE_MULTIPLE} pixels (the U-Net pools 4 times), "
                             f"got {self.crop}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        for name in ("data_workers", "challenge_every", "draw_interval", "histogram_freq", "backup_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)!r}")
        for name in ("time_limit", "budget"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds (or unset), got {getattr(self, name)!r}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema must lie between 0 and 1 (a momentum, e.g. 0.99) or be unset, got {self.ema!r}")
        if self.verbose not in (0, 1, 2):
            raise ValueError(f"verbose must be 0, 1 or 2, got {self.verbose!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def target_offsets(settings: TrainSettings) -> tuple | None:
    """Return the affinity offsets the network predicts, or None for the membrane map."""
    if settings.target not in TARGETS:
        raise ValueError(f"unknown target {settings.target!r}; choose from {', '.join(TARGETS)}")
    if settings.target != "membranes" and losses.needs_weight_map(settings.loss):
        raise ValueError(f"loss {settings.loss!r} weighs membrane pixels; with target {settings.target!r} use "
                         "binary_crossentropy, dice or bce_dice")
    return affinities.parse_offsets(settings.offsets) if settings.target == "affinities" else None


PRESETS = {
    "original": TrainSettings(),
    # Chosen for a 2-core CPU by measurement on AMD EPYC Zen 4 (docs/EXPERIMENTS.md):
    # 256x256 crops, batch 4, Adam 1e-3 (it beat 5e-4). 32 filters sized to the budget (25 x 58-63 steps on
    # Zen 4) beat 16 filters' whole 25 x 100 steps on validation and test over seeds 1-3
    # (bench/seeds-filters32.json); where the budget leaves 32 filters less than half the recipe's steps
    # (float32 CPUs), 16 filters train instead, as before. Cross-entropy plus the Dice of the membranes
    # beat cross-entropy alone on every test score; the border-weighted loss was worse on both. 16 filters
    # before the output (the original's 2 let a run train both onto one side of the membrane: 2 of 3 seeds,
    # flat at 0.43 or 0.88) with a cosine decay of the rate: bench/seeds-head16-cosine.json.
    # Batch normalisation costs 1.4x per step on this CPU (0.54 s against 0.38 s) but
    # in 25 epochs beat 40 without it on test accuracy (0.916 against 0.908) and pixel
    # difference (11.2 % against 11.5 %). The budget shortens the epochs of a slower CPU to fit 30 minutes.
    # Backups every 100 steps (at most one epoch, 30 s of training, at risk; none falls on an epoch end,
    # where last.keras is saved). Weight histograms are off, as by default (--histogram-freq 5 draws them
    # every 5 epochs, at 25 and 1 they cost about 2 s each of a 32 s epoch: docs/PERFORMANCE.md).
    "cpu": TrainSettings(
        run_dir="runs/cpu",
        filters=32,
        fallback_filters=16,
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
        # intensity changes: the stack's first half is blurred and its pages differ in brightness; without them a
        # faint membrane on test page 20 merged cells in nearly every run (docs/EXPERIMENTS.md, bench/seeds-intensity.json)
        augmentation=augment.Augmentation(vertical_flip=True, rot90=True, contrast=0.2, brightness=0.1, blur=1.0,
                                          noise=0.03),
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


# What `target='affinities'` brings to a membrane preset unless given otherwise: the field's offsets (the mutex
# watershed's ISBI experiments, torch-em's ISBI affinities). The pairs that leave a crop are masked out of the
# loss whatever the loss (affinities.label_targets). The field's loss, the Dice of the cut class alone
# (`--loss dice`), is not the default: on seed 1 (Zen 4) its affinities came out saturated (2 % of the
# nearest-neighbour values between 0.05 and 0.95, against 8 % with bce_dice) and the mutex watershed split
# cells (validation cells 0.870 against 0.966; docs/EXPERIMENTS.md).
AFFINITY_DEFAULTS = {"offsets": "field"}


def preset(name: str = "auto", **overrides) -> TrainSettings:
    """Return the settings of preset `name` ('auto' = 'original' on a GPU, else 'cpu') with overrides.

    Overrides that are None are ignored, so that unset command-line flags and
    notebook parameters keep the preset's value. Switching a preset to the affinity target brings
    AFFINITY_DEFAULTS for the settings not given.
    """
    if name == "auto":
        name = "original" if hardware.gpu_names() else "cpu"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from auto, {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("target") == "affinities" != PRESETS[name].target:
        overrides = {**AFFINITY_DEFAULTS, **overrides}
    return dataclasses.replace(PRESETS[name], **overrides)


AUGMENTATION_HELP = {
    "rotation_range": "random rotation up to this many degrees either way",
    "width_shift_range": "random horizontal shift up to this fraction of the width",
    "height_shift_range": "random vertical shift up to this fraction of the height",
    "shear_range": "random shear up to this many degrees either way",
    "zoom_range": "random zoom between 1 - this and 1 + this",
    "horizontal_flip": "random left-right flips",
    "vertical_flip": "random up-down flips",
    "rot90": "random quarter turns (see docs/EXPERIMENTS.md: the ISBI labels are not symmetric up/down)",
    "elastic_grid": "elastic deformation grid points per side (0: off; paper: 3)",
    "elastic_sigma": "elastic displacement standard deviation, pixels",
    "contrast": "random contrast: the image scaled about its mean by a factor within 1 +- this (0: off)",
    "brightness": "random brightness: up to this much added or taken, in units of the [0, 1] image (0: off)",
    "blur": "random Gaussian blur of up to this many pixels (0: off)",
    "noise": "random Gaussian noise of up to this standard deviation, [0, 1] image units (0: off)",
}


def _add_fields(parser: argparse.ArgumentParser, fields, helps: dict[str, str], default_type=str) -> None:
    """Add one flag per dataclass field: --name-with-dashes, booleans as --x / --no-x, unset = None."""
    types = {"int": int, "float": float, "float | None": float, "int | None": int}
    for field in fields:
        flag, text = "--" + field.name.replace("_", "-"), helps[field.name]
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, type=types.get(field.type, default_type), default=None, help=text)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Return the command line: --preset, then one flag per field of TrainSettings and of augment.Augmentation,
    each with its help; `description` heads --help (train.py's docstring)."""
    parser = cli.parser(description)
    parser.add_argument("--preset", default="auto",
                        help="the settings to start from: auto (default: original on a GPU, else cpu), "
                             + ", ".join(PRESETS) + "; every other flag overrides one of them")
    fields = [f for f in dataclasses.fields(TrainSettings) if f.name not in ("augmentation", "preset")]
    _add_fields(parser, fields, {f.name: f.metadata["help"] for f in fields})
    _add_fields(parser, dataclasses.fields(augment.Augmentation), AUGMENTATION_HELP, float)
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


def parse_args(argv: list[str] | None = None, description: str | None = None) -> TrainSettings:
    """Return the settings named on the command line `argv`."""
    return settings_from(build_parser(description).parse_args(argv))
