"""Pictures of a run for the notebook and the README: curves and snapshots from TensorBoard logs, result grids.

    python figures.py runs/cpu/logs              # writes runs/cpu/images/loss.png, acc.png, pixel_difference.png,
                                                 # labels.png and step{N}.png
    python figures.py runs/cpu/logs --out images # the README's pictures (make figures RUN=runs/cpu)
    python figures.py runs/cpu/logs --out /tmp/pictures --steps 200 400 4200

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`,
saved through the Agg canvas), never pyplot, so importing this module does not
change the notebook's inline backend and leaves no figure open. Files are
written atomically.
"""

from __future__ import annotations

import cli

if __name__ == "__main__":
    cli.quiet_native_logs()  # before TensorFlow loads

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

import cards
import files
import runs
import scores
import segment
from shapes import DEPTH

# metric -> (file name, title, y-axis label); the file names are the original write-up's.
CURVES = {
    "loss": ("loss.png", "Loss", "binary cross-entropy per pixel (nats)"),
    "accuracy": ("acc.png", "Accuracy", "pixels classified correctly (fraction)"),
    "pixel_difference": ("pixel_difference.png", "Pixel difference", "mean |label - prediction| (%)"),
}
SNAPSHOT_COUNT = 5
DPI = 100


# ---------------------------------------------------------------- reading the logs

def _read_event_files(folder: Path, plugin: str) -> list[dict[str, list[tuple[float, int, np.ndarray]]]]:
    """Return, per event file of `folder`, {tag: [(wall_time, step, value)]} for the tags of one plugin."""
    found = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"tensors": 0})
        events.Reload()
        tags = {}
        for tag in events.Tags()["tensors"]:
            if events.SummaryMetadata(tag).plugin_data.plugin_name == plugin:
                tags[tag] = [(e.wall_time, e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)]
        found.append(tags)
    return found


def _merge(event_files: list[dict[str, list[tuple[float, int, object]]]]) -> dict[str, list[tuple[int, object]]]:
    """Return {tag: [(step, value)]} sorted by step; where files share a step the later wall_time wins."""
    latest: dict[str, dict[int, tuple[float, object]]] = {}
    for tags in event_files:
        for tag, events in tags.items():
            steps = latest.setdefault(tag, {})
            for wall_time, step, value in events:
                if step not in steps or wall_time >= steps[step][0]:
                    steps[step] = (wall_time, value)
    return {tag: [(step, steps[step][1]) for step in sorted(steps)] for tag, steps in latest.items()}


def _first_epoch_end(tags: dict) -> tuple[int, float] | None:
    """Return (epoch, wall_time) of the first 'epoch_*' event of one file, or None."""
    ends = [(step, wall) for tag, events in tags.items() if tag.startswith("epoch_") for wall, step, _ in events]
    return min(ends, key=lambda end: end[1]) if ends else None


def steps_per_epoch(log_dir: str | os.PathLike, train_files: list | None = None) -> int | None:
    """Return the run's optimizer steps per epoch: from its settings.json, else estimated from the logs."""
    log_dir = Path(log_dir)
    run = runs.RunFolder(log_dir.parent)
    if run.logs == log_dir and run.settings.is_file():
        return int(run.read_json(run.settings)["steps_per_epoch"])
    # Estimate: the last per-batch step logged before the first epoch of a run that starts at epoch 0.
    for tags in train_files if train_files is not None else _read_event_files(log_dir / "train", "scalars"):
        end = _first_epoch_end(tags)
        if end is not None and end[0] == 0:
            before = [step for tag, events in tags.items() if tag.startswith("batch_")
                      for wall, step, _ in events if wall <= end[1]]
            if before:
                return max(before)
    return None


def _global_batch_steps(event_files: list[dict], per_epoch: int | None) -> list[dict]:
    """Return the files with the 'batch_*' steps of resumed runs moved to optimizer steps.

    Keras' TensorBoard counts 'batch_*' steps from 1 at every fit(), so a run
    resumed at epoch e0 would write over the first run's steps; its steps are
    moved on by e0 * steps per epoch (files already counting globally are kept).
    """
    chronological = sorted(event_files, key=lambda tags: min((e[0] for ev in tags.values() for e in ev), default=0.0))
    epochs_done = 0
    moved = []
    for tags in chronological:
        end = _first_epoch_end(tags)
        first_epoch = end[0] if end is not None else epochs_done
        batch_steps = [step for tag, events in tags.items() if tag.startswith("batch_") for _, step, _ in events]
        if per_epoch and first_epoch > 0 and batch_steps and min(batch_steps) <= first_epoch * per_epoch:
            shift = first_epoch * per_epoch
            tags = {tag: [(w, s + shift if tag.startswith("batch_") else s, v) for w, s, v in events]
                    for tag, events in tags.items()}
        epoch_steps = [step for tag, events in tags.items() if tag.startswith("epoch_") for _, step, _ in events]
        epochs_done = max([epochs_done, *(s + 1 for s in epoch_steps)])
        moved.append(tags)
    return moved


def _read_scalars(log_dir: Path) -> tuple[dict[str, dict[str, list[tuple[int, float]]]], int | None]:
    """Return (read_scalars(log_dir), steps per epoch)."""
    train_files = _read_event_files(log_dir / "train", "scalars")
    per_epoch = steps_per_epoch(log_dir, train_files)
    scalars = {}
    for part, event_files in (("train", train_files), ("validation", _read_event_files(log_dir / "validation", "scalars"))):
        if part == "train":
            event_files = _global_batch_steps(event_files, per_epoch)
        if event_files:
            merged = _merge(event_files)
            scalars[part] = {tag: [(step, float(value)) for step, value in events] for tag, events in merged.items()}
    return scalars, per_epoch


def read_scalars(log_dir: str | os.PathLike) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Return {'train'|'validation': {tag: [(step, value)]}} from Keras' TensorBoard logs, resumed runs merged.

    Tags are Keras' own: 'epoch_loss' (step = epoch, from 0), 'batch_loss'
    (step = optimizer step, from 1; the mean of the epoch so far), ...
    """
    return _read_scalars(Path(log_dir))[0]


def _decode_image(value: np.ndarray) -> np.ndarray:
    """Return the first picture of a tf.summary.image tensor [width, height, png, ...] as uint8 (H, W)."""
    width, height = int(value[0]), int(value[1])
    image = np.asarray(Image.open(io.BytesIO(value[2])).convert("L"))
    if image.shape != (height, width):
        raise ValueError(f"image summary says {width}x{height} (width x height) but holds {image.shape[::-1]}")
    return image


def read_images(log_dir: str | os.PathLike) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Return {tag: [(step, uint8 (H, W) image)]} of the pictures `callbacks.ImageHistory` drew in `log_dir`/images."""
    merged = _merge(_read_event_files(Path(log_dir) / "images", "images"))
    return {tag: [(step, _decode_image(value)) for step, value in events] for tag, events in merged.items()}


# ---------------------------------------------------------------- writing files

def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write `figure` as a PNG at `path`; return the path."""
    return files.write_atomic(path, lambda part: figure.savefig(part, format="png", dpi=DPI))


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 (H, W) array as a grey PNG at `path`, pixel for pixel; return the path."""
    return files.write_atomic(path, lambda part: Image.fromarray(image).save(part, format="PNG"))


# ---------------------------------------------------------------- curves

def curve_figures(log_dir: str | os.PathLike) -> dict[str, Figure]:
    """Return {metric: Figure} of the training curves in `log_dir`, for each metric of CURVES logged there.

    Per-epoch training and validation values are drawn at the epoch's end;
    the per-batch training values (the mean of the epoch so far) faintly behind.
    """
    scalars, per_epoch = _read_scalars(Path(log_dir))
    figures = {}
    for metric, (_, title, unit) in CURVES.items():
        if f"epoch_{metric}" not in scalars.get("train", {}):
            continue
        figure = Figure(figsize=(7, 4), layout="constrained")
        ax = figure.subplots()
        batch = scalars["train"].get(f"batch_{metric}", [])
        if batch and per_epoch:
            steps, values = zip(*batch)
            ax.plot(np.array(steps) / per_epoch, values, color="C0", alpha=0.3, lw=1, label="training, per batch")
        for part, name, color in (("train", "training", "C0"), ("validation", "validation", "C1")):
            events = scalars.get(part, {}).get(f"epoch_{metric}", [])
            if events:
                epochs, values = zip(*events)
                ax.plot(np.array(epochs) + 1, values, "o-", color=color, ms=3, label=f"{name}, per epoch")
        ax.set_title(title)
        ax.set_xlabel(f"epoch ({per_epoch} optimizer steps each)" if per_epoch else "epoch")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend()
        figures[metric] = figure
    return figures


def plot_curves(log_dir: str | os.PathLike, out_dir: str | os.PathLike = "images") -> list[Path]:
    """Write loss.png, acc.png and pixel_difference.png of the run in `log_dir` to `out_dir`; return the paths."""
    return [save_figure(figure, Path(out_dir) / CURVES[metric][0]) for metric, figure in curve_figures(log_dir).items()]


# ---------------------------------------------------------------- snapshots of the validation pictures

def snapshot_steps(available: Sequence[int], count: int = SNAPSHOT_COUNT) -> list[int]:
    """Return about `count` of the `available` steps, spaced geometrically: dense early, where most changes."""
    available = sorted(available)
    if not available:
        return []
    positions = np.geomspace(1, len(available), count)
    return [available[i] for i in sorted({int(round(p)) - 1 for p in positions})]


def _rows(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the (predictions, labels) rows of a validation picture."""
    half = grid.shape[0] // 2
    return grid[:half], grid[half:]


def _chosen_snapshots(log_dir, steps: Sequence[int] | None) -> list[tuple[int, np.ndarray]]:
    """Return [(step, picture)] of the 'batch' pictures at `steps` (default: snapshot_steps of all)."""
    pictures = dict(read_images(log_dir).get("batch", []))
    if not pictures:
        raise ValueError(f"no 'batch' pictures in {Path(log_dir) / 'images'}; was it trained with a draw_interval?")
    steps = snapshot_steps(list(pictures)) if steps is None else list(steps)
    missing = [step for step in steps if step not in pictures]
    if missing:
        raise ValueError(f"no 'batch' picture at steps {missing}; there are {sorted(pictures)}")
    return [(step, pictures[step]) for step in steps]


def save_snapshots(log_dir: str | os.PathLike, out_dir: str | os.PathLike = "images", steps=None) -> list[Path]:
    """Write labels.png (the label row) and step{N}.png (the prediction row at step N) to `out_dir`; return the paths.

    The pictures are those `callbacks.ImageHistory` draws: the validation pages side by side, pixel
    for pixel. Only the top (prediction) row is kept for each step since the
    labels, the same at every step, are written once.
    """
    chosen = _chosen_snapshots(log_dir, steps)
    out_dir = Path(out_dir)
    paths = [save_png(_rows(chosen[-1][1])[1], out_dir / "labels.png")]
    return paths + [save_png(_rows(picture)[0], out_dir / f"step{step}.png") for step, picture in chosen]


def snapshots_figure(log_dir: str | os.PathLike, steps=None) -> Figure:
    """Return a figure of the labels row and the prediction rows at `steps` (default: snapshot_steps)."""
    chosen = _chosen_snapshots(log_dir, steps)
    rows = [("labels", _rows(chosen[-1][1])[1])] + [(f"step {step}", _rows(picture)[0]) for step, picture in chosen]
    height, width = rows[0][1].shape
    figure = Figure(figsize=(9, 9 * height / width * len(rows) + 0.3), layout="constrained")
    for ax, (name, row) in zip(figure.subplots(len(rows), 1, squeeze=False)[:, 0], rows):
        ax.imshow(row, cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name)
    figure.suptitle("Validation predictions during training")
    return figure


# ---------------------------------------------------------------- image grids

def _pages(stack: np.ndarray) -> np.ndarray:
    """Return an (N, H, W) or (N, H, W, 1) stack as (N, H, W)."""
    stack = np.asarray(stack)
    if stack.ndim == 4 and stack.shape[-1] == 1:
        stack = stack[..., 0]
    if stack.ndim != 3:
        raise ValueError(f"expected a stack of grey pages (N, H, W) or (N, H, W, 1), got shape {stack.shape}")
    return stack


def image_grid(rows: Sequence[np.ndarray], row_names: Sequence[str], titles=None, size: float = 3.0) -> Figure:
    """Return a figure of len(rows) x N images: grey, values 0 (black) to 1 (white), or RGB uint8 (N, H, W, 3);
    titles per cell or per column."""
    rows = [row if np.ndim(row) == 4 and np.shape(row)[-1] == 3 else _pages(row) for row in rows]
    n = len(rows[0])
    if any(len(row) != n for row in rows):
        raise ValueError(f"every row needs the same number of images, got {[len(row) for row in rows]}")
    figure = Figure(figsize=(size * n, size * len(rows) + 0.2), layout="constrained")
    axes = figure.subplots(len(rows), n, squeeze=False)
    for r, (row, name) in enumerate(zip(rows, row_names)):
        for c, image in enumerate(row):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
            if titles is not None and titles[r] is not None:
                ax.set_title(titles[r][c], fontsize=10)
    return figure


def batch_grid(images: np.ndarray, labels: np.ndarray) -> Figure:
    """Return a 2 x N figure of a training batch: augmented images on top, their labels below."""
    return image_grid([images, labels], ["augmented image", "label"])


def pixel_differences(labels: np.ndarray, predictions: np.ndarray) -> list[float]:
    """Return the pixel difference (%) of each prediction against its label."""
    return [scores.pixel_difference_np(label, prediction) for label, prediction in zip(labels, predictions)]


def results_grid(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, titles=None,
                 cells: np.ndarray | None = None) -> Figure:
    """Return a 3 x N figure: test images, their labels, the predicted masks titled with their pixel difference;
    with `cells` (N, H, W labels) a fourth row of the cells in colour over the image, titled with their V_rand."""
    if not len(images) == len(labels) == len(predictions):
        raise ValueError(f"got {len(images)} images, {len(labels)} labels and {len(predictions)} predictions")
    titles = titles or [f"image {i}" for i in range(len(images))]
    differences = [f"pixel difference {d:.1f}%" for d in pixel_differences(labels, predictions)]
    rows, names, row_titles = [images, labels, predictions], ["image", "label", "prediction"], [titles, None, differences]
    if cells is not None:
        pages, truths = _pages(images), _pages(labels)
        rows.append(np.stack([segment.overlay(image, page) for image, page in zip(pages, cells)]))
        names.append("cells")
        found = [scores.cell_scores(page, truth > 0.5) for page, truth in zip(cells, truths)]
        row_titles.append([f"{s['cells']} cells ({s['true_cells']} true), V_rand {s['v_rand']:.3f}" for s in found])
    return image_grid(rows, names, row_titles)


def save_results_grid(images, labels, predictions, path: str | os.PathLike, titles=None,
                      cells: np.ndarray | None = None) -> Path:
    """Write results_grid(...) as a PNG at `path` (the README's images/unet_results.png); return the path."""
    return save_figure(results_grid(images, labels, predictions, titles, cells), path)


def masks_grid(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, titles=None) -> Figure:
    """Return an N x 3 figure, one row per page: the image, its mask (white = cell), and the predicted mask
    (probability > 0.5) titled with the Dice of its membranes; `titles` name the rows."""
    if not len(images) == len(labels) == len(probabilities):
        raise ValueError(f"got {len(images)} images, {len(labels)} labels and {len(probabilities)} predictions")
    images, labels, probabilities = _pages(images), _pages(labels), _pages(probabilities)
    rows = [np.stack([image, label, (p > 0.5).astype(np.float32)])
            for image, label, p in zip(images, labels, probabilities)]
    cells = [["image", "mask", f"predicted mask, membrane Dice {scores.membrane_dice_np(label, p):.3f}"]
             for label, p in zip(labels, probabilities)]
    return image_grid(rows, titles or [f"page {i}" for i in range(len(images))], cells, size=4.0)


def save_masks_grid(images, labels, probabilities, path: str | os.PathLike, titles=None) -> Path:
    """Write masks_grid(...) as a PNG at `path` (the README's images/own_data_example.png); return the path."""
    return save_figure(masks_grid(images, labels, probabilities, titles), path)


def architecture_figure(filters: int = 64, depth: int = DEPTH, size: int = 512, out_channels: int = 1,
                        batch_norm: bool = False) -> Figure:
    """Return a diagram of `model.build_unet`'s U: a box per block with its width (filters) and side (pixels),
    the pooling and upsampling steps, and the skip connections; the counterpart of the U-Net paper's Fig. 1."""
    from matplotlib.patches import FancyBboxPatch

    figure = Figure(figsize=(11, 5.6), layout="constrained")
    ax = figure.subplots()
    ax.set_axis_off()
    width, height = 1.5, 0.62
    conv = "2 x (3x3 conv" + (", BN" if batch_norm else "") + ", ReLU)"

    def box(x, y, title, colour, wide=1.0):
        ax.add_patch(FancyBboxPatch((x - wide * width / 2, y - height / 2), wide * width, height, boxstyle="round,pad=0.04",
                                    facecolor=colour, edgecolor="0.25"))
        ax.text(x, y, title, ha="center", va="center", fontsize=8.5)

    def arrow(start, end, style="-|>", colour="0.2", dashed=False):
        ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle=style, color=colour, lw=1.3,
                                                              linestyle="--" if dashed else "-"))

    for level in range(depth + 1):
        side, width_k = size // 2**level, filters * 2**level
        x, y = level * 1.05, -level * 1.1
        box(x, y, f"CNT_{level + 1}: {width_k} filters\n{side} x {side}", "#cfe3f7")
        if level < depth:
            arrow((x + 0.25, y - height / 2 - 0.05), (x + 0.8, y - 1.1 + height / 2 + 0.05))
            ax.text(x + 0.42, y - 0.58, "2x2 max-pool", fontsize=7.5, color="0.3", ha="right")
    for step, level in enumerate(reversed(range(depth))):
        side, width_k = size // 2**level, filters * 2**level
        x, y = (2 * depth - level) * 1.05, -level * 1.1
        box(x, y, f"EXP_{step + 1}: {width_k} filters\n{side} x {side}", "#d8efd2")
        arrow((x - 0.8, y - 1.1 + height / 2 + 0.05), (x - 0.25, y - height / 2 - 0.05))
        ax.text(x - 0.42, y - 0.58, "up x2, 2x2 conv", fontsize=7.5, color="0.3", ha="left")
        arrow((level * 1.05 + width / 2 + 0.05, y), (x - width / 2 - 0.05, y), colour="#7a7a7a", dashed=True)
    out_x = 2 * depth * 1.05 + 2.1
    box(out_x, 0, f"OUT: 3x3 conv, 1x1 conv,\nsigmoid, {out_channels} channel" + ("s" if out_channels > 1 else ""),
        "#f7dccf", wide=1.35)
    arrow((2 * depth * 1.05 + width / 2 + 0.05, 0), (out_x - 1.35 * width / 2 - 0.05, 0))
    ax.text(depth * 1.05, 0.55, f"every block: {conv}; dashed: copy and concatenate; 'same' padding keeps the "
            "size", ha="center", fontsize=8.5)
    ax.set_xlim(-1.0, out_x + 1.1)
    ax.set_ylim(-depth * 1.1 - 0.6, 0.9)
    return figure


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """Return figures.py's command line."""
    parser = cli.parser(__doc__)
    parser.add_argument("log_dir", help="a run's TensorBoard folder, e.g. runs/cpu/logs")
    parser.add_argument("--out", help="folder for the pictures (default: the run's images/, beside its logs)")
    parser.add_argument("--steps", type=int, nargs="+", help="'batch' steps to snapshot (default: about 5)")
    return parser


def run(args: argparse.Namespace) -> None:
    """Draw the pictures of the run the parsed command line names; print their paths."""
    if not (Path(args.log_dir) / "train").is_dir():
        raise ValueError(f"{args.log_dir} holds no train/ folder of TensorBoard logs")
    out = args.out if args.out is not None else Path(args.log_dir).resolve().parent / "images"
    for path in plot_curves(args.log_dir, out) + save_snapshots(args.log_dir, out, args.steps):
        print(path)
    print(save_figure(run_architecture(Path(args.log_dir).resolve().parent), Path(out) / "architecture.png"))


def run_architecture(run_dir: str | os.PathLike) -> Figure:
    """Return `architecture_figure` of the network a run trained (its settings.json and its model's outputs,
    `cards.model_io`; the original's without them)."""
    run = runs.RunFolder(run_dir)
    settings = run.read_json(run.settings) if run.settings.is_file() else {}
    return architecture_figure(settings.get("filters", 64), out_channels=cards.model_io(run.best).channels,
                               batch_norm=settings.get("batch_norm", False))


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
