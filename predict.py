"""Predict cell probabilities for EM images of any size with a trained U-Net.

    python predict.py test-volume.tif                        # writes test-volume-prediction.tif beside it
    python predict.py images/ page.png --model runs/cpu/best.keras --out predictions/
    python predict.py big.tif --tile 256 --overlap 64 --tta --uint8
    python predict.py --challenge --out submission/test-volume-prediction.tif   # the challenge's submission
    python predict.py page.png --png                         # also page-prediction.png, a 0/255 mask
    python predict.py stack.tif --mask-tiff                  # also stack-prediction-mask.tif, 0/255 masks
    python predict.py big.zarr --block 1024 --workers 4      # block by block into big-prediction.zarr (blocks.py)

Images are cut into overlapping tiles as in the U-Net paper (Ronneberger et
al. 2015, Fig. 2): the borders are extrapolated by mirroring, each tile is
predicted on its own, and the tile predictions are blended with a smooth
window so that no seams show. The output is a multipage TIFF of float32
probabilities of "cell" (1) against membrane (0), the size of the input.
A .zarr input or output (larger than memory, resumable, optionally on a Dask
cluster) is predicted block by block into a zarr array: see blocks.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

import data
import runtimes

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = PROJECT_DIR / "models" / "unet-isbi-cpu.keras"
DEFAULT_TILE = 576  # pixels; a 512x512 page and its mirrored border (overlap / 2 each side) fit in one tile
DEFAULT_OVERLAP = 64  # pixels shared by neighbouring tiles; half of it is the mirrored border
DEFAULT_BATCH_SIZE = 4  # tiles per model call
SIZE_MULTIPLE = 16  # the U-Net pools four times, so tile sides must divide by 2**4
PREDICTION_SUFFIX = "-prediction"
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = TIFF_SUFFIXES + (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
ZARR_SUFFIX = ".zarr"

PathLike = str | os.PathLike


# ---------------------------------------------------------------- tile geometry

@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one image lie; the one place that defines the tile geometry.

    The image is mirror-padded by `pad` ((top, bottom), (left, right)) to
    `padded_shape`; tiles of `tile` (height, width) pixels start at `origins`
    (top, left) in the padded image, overlap by at least the requested
    overlap, and together cover every pixel.
    """

    shape: tuple[int, int]
    tile: tuple[int, int]
    overlap: int
    pad: tuple[tuple[int, int], tuple[int, int]]
    origins: tuple[tuple[int, int], ...]

    @property
    def padded_shape(self) -> tuple[int, int]:
        return tuple(size + sum(pad) for size, pad in zip(self.shape, self.pad))


def _round_up(size: int, multiple: int = SIZE_MULTIPLE) -> int:
    return -(-size // multiple) * multiple


def _axis_layout(size: int, tile: int, overlap: int, fit: bool) -> tuple[int, tuple[int, int], list[int]]:
    """Return (tile side, (pad before, pad after), tile starts) along one axis of `size` pixels."""
    before, after = overlap // 2, overlap - overlap // 2
    padded = size + overlap
    if fit:  # a small image gets one tile just large enough, not a whole `tile`
        tile = min(tile, _round_up(padded))
    if padded < tile:
        extra = tile - padded
        before, after, padded = before + extra // 2, after + extra - extra // 2, tile
    count = 1 if padded == tile else math.ceil((padded - tile) / (tile - overlap)) + 1
    # Spread the tiles evenly from one end to the other: overlaps are never below `overlap`.
    starts = [0] if count == 1 else [round(i * (padded - tile) / (count - 1)) for i in range(count)]
    return tile, (before, after), starts


def tile_grid(
    shape: tuple[int, int], tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, fit: bool = True
) -> TileGrid:
    """Return the tiles that cover an image of `shape` (height, width).

    Each side is mirror-padded by `overlap` / 2, so that border pixels have
    context and lie as far inside a tile as pixels between two tiles. An image
    of n * (tile - overlap) pixels along a side takes exactly n tiles along it.
    With `fit`, a side that needs less than one `tile` gets a single tile of the
    next multiple of 16 (for models that take any size); without it, tiles
    are always `tile` pixels (for models built for one input size).
    """
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (height, width) of at least one pixel, got {shape}")
    if tile < SIZE_MULTIPLE or tile % SIZE_MULTIPLE:
        raise ValueError(f"tile must be a positive multiple of {SIZE_MULTIPLE}, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be at least 0 and smaller than the tile ({tile}), got {overlap}")
    (tile_h, pad_h, rows), (tile_w, pad_w, cols) = (_axis_layout(size, tile, overlap, fit) for size in shape)
    origins = tuple((y, x) for y in rows for x in cols)
    return TileGrid(tuple(shape), (tile_h, tile_w), overlap, (pad_h, pad_w), origins)


def blend_window(tile: tuple[int, int], overlap: int) -> np.ndarray:
    """Return the (height, width) float32 weights of a tile's prediction when tiles are blended.

    Separable: 1 in the middle, rising as sin^2 over the outer `overlap`
    pixels of each edge, never exactly 0. Two tiles that overlap by exactly
    `overlap` get weights that sum to 1 there (sin^2 + cos^2), a smooth
    cross-fade; any other overlap is normalised by the summed weights.
    """

    def ramp(side: int) -> np.ndarray:
        if overlap == 0:
            return np.ones(side)
        distance = np.minimum(np.arange(side), np.arange(side)[::-1]) + 0.5  # to the nearer edge
        return np.sin(np.pi / 2 * np.clip(distance / overlap, 0, 1)) ** 2

    return np.outer(ramp(tile[0]), ramp(tile[1])).astype(np.float32)


# ---------------------------------------------------------------- predicting

def _dihedral(batch: np.ndarray, k: int) -> np.ndarray:
    """Return (N, H, W, C) `batch` under the k-th of the 8 flips/rotations (k in 0..7)."""
    batch = np.rot90(batch, k % 4, axes=(1, 2))
    return batch[:, :, ::-1] if k >= 4 else batch


def _undo_dihedral(batch: np.ndarray, k: int) -> np.ndarray:
    """Return `batch` mapped back from the k-th flip/rotation: the inverse of `_dihedral`."""
    if k >= 4:
        batch = batch[:, :, ::-1]
    return np.rot90(batch, -(k % 4), axes=(1, 2))


def _fixed_input_size(model) -> tuple[int, int] | None:
    """Return the model's (height, width) if it only takes one input size, else None."""
    height, width = model.input_shape[1:3]
    return (height, width) if height is not None and width is not None else None


def _predict_tiles(model, tiles: np.ndarray, tta: bool) -> np.ndarray:
    """Return the model's (N, H, W) probabilities for (N, H, W, 1) tiles, averaged over the 8 flips if `tta`."""
    transforms = range(8) if tta else (0,)
    total = np.zeros(tiles.shape[:3], np.float32)
    for k in transforms:
        moved = np.ascontiguousarray(_dihedral(tiles, k))
        out = np.asarray(model.predict_on_batch(moved), dtype=np.float32)
        if out.shape[:3] != moved.shape[:3] or out.ndim != 4 or out.shape[3] != 1:
            raise ValueError(
                f"the model turned tiles of shape {moved.shape} into {out.shape}; tiled prediction needs one "
                "output channel of the input's size (a U-Net with padding='same')"
            )
        total += _undo_dihedral(out, k)[..., 0]
    return total / len(transforms)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Return the image indices (int64) of positions start..stop-1 along an axis of `size` pixels,
    mirrored at the edges as ``np.pad(mode="reflect")`` does, also for pads larger than the image."""
    positions = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(positions)
    period = 2 * (size - 1)  # reflecting without repeating the edge pixel repeats with this period
    positions = np.mod(positions, period)
    return np.where(positions < size, positions, period - positions)


def predict_region(
    model,
    page,
    region: tuple[tuple[int, int], tuple[int, int]],
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tta: bool = False,
    progress=None,
) -> np.ndarray:
    """Return the probabilities of "cell" in `region` of one grey page, float32 (bottom - top, right - left).

    The tiles are those of the whole page (`tile_grid(page.shape)`), so a
    region gets the values that `predict_image` gives the whole page there:
    predicting a page region by region gives the same result for any region
    size. Only the pixels that the tiles touching the region need are read.

    Args:
        model, tile, overlap, batch_size, tta, progress: as for `predict_image`.
        page: a (height, width) array, or anything with `shape` and
            ``page[rows, cols]`` slicing (e.g. a lazily read page of a zarr array).
        region: ((top, bottom), (left, right)) in page pixels, ends exclusive.
    """
    if len(page.shape) != 2 or min(page.shape) < 1:
        raise ValueError(f"expected one grey page of shape (height, width), got shape {tuple(page.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    fixed = _fixed_input_size(model)
    if fixed is not None and fixed != (tile, tile):
        raise ValueError(f"the model only takes {fixed[0]}x{fixed[1]} inputs; use tile={fixed[0]}")
    height, width = page.shape
    (y0, y1), (x0, x1) = region
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise ValueError(f"region {region} is empty or not inside the page of {height}x{width} pixels")
    grid = tile_grid((height, width), tile, overlap, fit=fixed is None)
    (top, _), (left, _) = grid.pad
    tile_h, tile_w = grid.tile

    # The tiles that touch the region and the box they span, in padded-image coordinates.
    origins = [
        (y, x) for y, x in grid.origins
        if y < y1 + top and y0 + top < y + tile_h and x < x1 + left and x0 + left < x + tile_w
    ]
    box_y0, box_x0 = min(y for y, _ in origins), min(x for _, x in origins)
    box_y1, box_x1 = max(y for y, _ in origins) + tile_h, max(x for _, x in origins) + tile_w
    rows = reflect_indices(box_y0 - top, box_y1 - top, height)
    cols = reflect_indices(box_x0 - left, box_x1 - left, width)
    read = np.asarray(page[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1])
    padded = data.normalize_images(read)[np.ix_(rows - rows.min(), cols - cols.min())]

    window = blend_window(grid.tile, overlap)
    total = np.zeros(padded.shape, np.float32)
    weight = np.zeros(padded.shape, np.float32)
    for batch in _batches(origins, batch_size):
        boxes = [(y - box_y0, x - box_x0) for y, x in batch]
        tiles = np.stack([padded[y : y + tile_h, x : x + tile_w] for y, x in boxes])[..., np.newaxis]
        for (y, x), probabilities in zip(boxes, _predict_tiles(model, tiles, tta)):
            total[y : y + tile_h, x : x + tile_w] += window * probabilities
            weight[y : y + tile_h, x : x + tile_w] += window
        if progress is not None:
            progress.update(len(batch))
    rows_out = slice(y0 + top - box_y0, y1 + top - box_y0)
    cols_out = slice(x0 + left - box_x0, x1 + left - box_x0)
    return total[rows_out, cols_out] / weight[rows_out, cols_out]


def predict_image(
    model,
    image: np.ndarray,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tta: bool = False,
    progress=None,
) -> np.ndarray:
    """Return the model's probability of "cell" for every pixel of one grey image, float32 (H, W).

    Args:
        model: a Keras model mapping (N, H, W, 1) images in [0, 1] to (N, H, W, 1)
            probabilities, for H and W multiples of 16 (as `model.build_unet` makes).
        image: (H, W) or (H, W, 1), any size, any integer or float dtype; it is
            normalised as for training (`data.normalize_images`).
        tile: side of the square tiles in pixels, a multiple of 16. Must equal the
            model's input size if it takes only one.
        overlap: pixels shared by neighbouring tiles (and twice the mirrored border).
        batch_size: tiles per model call.
        tta: average the predictions of the 8 flips and quarter turns of each tile.
        progress: a tqdm bar (or anything with `update(n)`) advanced by the tiles done.

    Example: ``predict_image(train.load_model("runs/cpu/best.keras"), page, tile=256)``.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"expected one grey image of shape (height, width), got shape {image.shape}")
    whole = ((0, image.shape[0]), (0, image.shape[1]))
    return predict_region(model, image, whole, tile, overlap, batch_size, tta, progress)


def predict_stack(
    model,
    stack: np.ndarray,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tta: bool = False,
    desc: str | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Return `predict_image` of each page of a (pages, H, W) stack, float32 (pages, H, W); shows a progress bar over tiles."""
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise ValueError(f"expected a stack of grey pages (pages, height, width), got shape {stack.shape}")
    fixed = _fixed_input_size(model)
    tiles = len(tile_grid(stack.shape[1:], tile, overlap, fit=fixed is None).origins) * len(stack)
    with tqdm(total=tiles, desc=desc, unit="tile", disable=not progress) as bar:
        return np.stack([predict_image(model, page, tile, overlap, batch_size, tta, bar) for page in stack])


# ---------------------------------------------------------------- reading and writing

def read_image(path: PathLike) -> np.ndarray:
    """Return the grey pages of one image file (multipage TIFF, PNG, ...) as (pages, H, W) in the file's dtype."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path}: file not found")
    pages = data.read_stack(path) if path.suffix.lower() in TIFF_SUFFIXES else data.read_picture(path)
    data.check_float_range(pages, str(path))
    return pages


def image_files(paths: Sequence[PathLike]) -> list[Path]:
    """Return the image files named by `paths`: files as given, folders as their images sorted by name.

    Files in a folder whose name ends in "-prediction" (this script's
    outputs) are left out, so that a second run does not predict predictions.
    """
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                and not p.stem.endswith((PREDICTION_SUFFIX, PREDICTION_SUFFIX + "-mask"))
            )
            if not found:
                raise data.DataError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise data.DataError(f"{path}: no such file or folder")
    return files


def read_images(paths: Sequence[PathLike]) -> list[tuple[str, np.ndarray]]:
    """Return (file name, pages) for every image named by `paths` (files or folders); pages are (N, H, W)."""
    return [(str(path), read_image(path)) for path in image_files(paths)]


def to_uint8(probabilities: np.ndarray) -> np.ndarray:
    """Return probabilities in [0, 1] as uint8 0-255, rounded."""
    return np.round(np.clip(probabilities, 0, 1) * 255).astype(np.uint8)


def write_prediction(path: PathLike, probabilities: np.ndarray, uint8: bool = False) -> Path:
    """Write (H, W) or (pages, H, W) probabilities to a multipage TIFF atomically; return its path.

    float32 by default; with `uint8`, rounded to 0-255 (a quarter of the size).
    """
    path = Path(path)
    pages = np.asarray(probabilities, dtype=np.float32)
    if pages.ndim not in (2, 3):
        raise ValueError(f"expected (height, width) or (pages, height, width) probabilities, got shape {pages.shape}")
    if uint8:
        pages = to_uint8(pages)
    # A fresh name in the same folder, created by tifffile (so with the usual permissions), renamed into place.
    return data.write_atomic(path, lambda part: tifffile.imwrite(part, pages, photometric="minisblack"))


def write_masks(target: PathLike, probabilities: np.ndarray, threshold: float = 0.5) -> list[Path]:
    """Write each page's mask (255 = cell where probability > threshold, 0 = membrane) as a PNG
    beside `target` (name-N.png for several pages); return the paths."""
    from PIL import Image

    target = Path(target)
    paths = []
    for i, page in enumerate(probabilities):
        suffix = f"-{i}" if len(probabilities) > 1 else ""
        path = target.with_name(f"{target.stem}{suffix}.png")
        mask = Image.fromarray(np.where(page > threshold, 255, 0).astype(np.uint8))
        paths.append(data.write_atomic(path, lambda part: mask.save(part, format="PNG")))
    return paths


def write_mask_tiff(target: PathLike, probabilities: np.ndarray, threshold: float = 0.5) -> Path:
    """Write the pages' masks (255 = cell where probability > threshold, 0 = membrane) as one uint8 TIFF
    `<target stem>-mask.tif` beside `target`, atomically; return its path."""
    target = Path(target)
    path = target.with_name(f"{target.stem}-mask.tif")
    pages = np.where(np.asarray(probabilities) > threshold, 255, 0).astype(np.uint8)
    return data.write_atomic(path, lambda part: tifffile.imwrite(part, pages, photometric="minisblack"))


def warn_if_uniform(name: str, probabilities: np.ndarray) -> str | None:
    """Print a warning naming the likely causes if a prediction is empty or uniform; return the warning or None."""
    import metrics

    problem = metrics.uniform_prediction(probabilities)
    if problem is None:
        return None
    warning = f"warning: {name}: the prediction is (nearly) uniform: {problem}; {metrics.UNIFORM_CAUSES}"
    print(warning, file=sys.stderr)
    return warning


def output_path(input_path: PathLike, out: PathLike | None = None, suffix: str = ".tif") -> Path:
    """Return where the prediction of `input_path` goes: `<stem>-prediction<suffix>` beside it, or in folder `out`."""
    input_path = Path(input_path)
    name = input_path.stem + PREDICTION_SUFFIX + suffix
    return (Path(out) if out is not None else input_path.parent) / name


def is_zarr(path: PathLike) -> bool:
    """Return whether `path` names a zarr store: it, or a folder above it, ends in .zarr."""
    return any(part.lower().endswith(ZARR_SUFFIX) for part in Path(path).parts)


def resolve_model(path: PathLike | None = None) -> Path:
    """Return the model to use: `path` (.keras, .onnx, bioimage.io .zip or SavedModel folder), else DEFAULT_MODEL;
    FileNotFoundError saying what to do if missing."""
    if path is not None:
        if not Path(path).is_file() and not (Path(path) / runtimes.SAVEDMODEL_FILE).is_file():
            raise FileNotFoundError(f"{path}: no such model file (train one with `python train.py`)")
        return Path(path)
    if not DEFAULT_MODEL.is_file():
        raise FileNotFoundError(
            f"no model given and the default {DEFAULT_MODEL} is not there; train one with "
            "`python train.py` and pass --model runs/<run>/best.keras"
        )
    return DEFAULT_MODEL


# ---------------------------------------------------------------- the job

def _refuse_shared_outputs(targets: list[Path], what: str) -> None:
    """Raise ValueError if two inputs would be written to the same output `what` (file, array)."""
    repeated = {str(t) for t in targets if targets.count(t) > 1}
    if repeated:
        raise ValueError(f"two inputs would write the same {what} ({', '.join(sorted(repeated))}); predict them apart")


def predict_files(
    inputs: Sequence[PathLike],
    model_path: PathLike | None = None,
    out: PathLike | None = None,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tta: bool = False,
    uint8: bool = False,
    png: bool = False,
    mask_tiff: bool = False,
) -> list[Path]:
    """Predict every image named by `inputs` (files or folders) and write one TIFF each; return their paths.

    With `png` / `mask_tiff` also the 0/255 masks (threshold 0.5) as PNGs /
    one `-mask.tif` beside each prediction. A prediction that is (nearly)
    uniform gets a warning naming the likely causes.

    `out` is a folder for the predictions (default: beside each input), or a
    .tif/.tiff file name when there is exactly one input image.
    """
    model_path = resolve_model(model_path)
    tile_grid((1, 1), tile, overlap)  # check the settings before the slow part
    images = read_images(inputs)
    if out is not None and Path(out).suffix.lower() in TIFF_SUFFIXES:
        if len(images) != 1:
            raise ValueError(f"--out {out} is a file name, but there are {len(images)} input images; give a folder")
        targets = [Path(out)]
    else:
        targets = [output_path(name, out) for name, _ in images]
    _refuse_shared_outputs(targets, "file")

    from runtimes import load_model  # TensorFlow (or onnxruntime) loads here, after the cheap checks

    model = load_model(model_path, precision="auto")
    print(f"predicting {len(images)} image(s) with {model_path}: tiles {tile}, overlap {overlap}, "
          f"batch {batch_size}" + (", 8-fold test-time augmentation" if tta else ""))
    for (name, pages), target in zip(images, targets):
        probabilities = predict_stack(model, pages, tile, overlap, batch_size, tta, desc=Path(name).name)
        pages_out = probabilities if len(probabilities) > 1 else probabilities[0]  # one page: a 2-D TIFF
        write_prediction(target, pages_out, uint8)
        warn_if_uniform(name, probabilities)
        if png:
            for path in write_masks(target, probabilities):
                print(f"wrote {path}")
        if mask_tiff:
            print(f"wrote {write_mask_tiff(target, pages_out)}")
        print(f"wrote {target} ({len(pages)} page(s) of {pages.shape[1]}x{pages.shape[2]}, "
              f"{'uint8 0-255' if uint8 else 'float32 probabilities'})")
    return targets


def predict_volumes(
    inputs: Sequence[PathLike],
    model_path: PathLike | None = None,
    out: PathLike | None = None,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tta: bool = False,
    uint8: bool = False,
    block: int | None = None,
    workers: int | None = None,
    dask: str | None = None,
) -> list[Path]:
    """Predict each .zarr or TIFF input block by block into a zarr array (`blocks.predict_volume`); return their paths.

    `out` is a folder (default: beside each input, as `<stem>-prediction.zarr`),
    or a .zarr name when there is one input. With `workers` (a local cluster of
    that many processes) or `dask` (a scheduler's address) the blocks run on Dask.
    """
    import blocks

    model_path = resolve_model(model_path)
    block = blocks.DEFAULT_BLOCK if block is None else block
    if block < 1:
        raise ValueError(f"--block must be a positive number of pixels, got {block}")
    tile_grid((1, 1), tile, overlap)  # check the settings before the slow part
    for path in map(Path, inputs):
        if not (is_zarr(path) or path.suffix.lower() in TIFF_SUFFIXES):
            raise data.DataError(f"{path}: zarr output needs .zarr or TIFF inputs; predict other images to TIFF")
        blocks.open_volume(path)  # readable, grey
    if out is not None and is_zarr(out):
        if len(inputs) != 1:
            raise ValueError(f"--out {out} is one zarr array, but there are {len(inputs)} inputs; give a folder")
        targets = [Path(out)]
    else:
        targets = [output_path(path, out, ZARR_SUFFIX) for path in inputs]
    _refuse_shared_outputs(targets, "array")
    print(f"predicting {len(inputs)} volume(s) with {model_path}: blocks {block}, tiles {tile}, overlap {overlap}, "
          f"batch {batch_size}" + (", 8-fold test-time augmentation" if tta else ""))
    with blocks.dask_client(workers, dask) as client:
        for source, target in zip(inputs, targets):
            target.parent.mkdir(parents=True, exist_ok=True)
            stats = blocks.predict_volume(model_path, str(source), target, block, tile, overlap, batch_size, tta,
                                          uint8, client=client)
            print(f"wrote {target}: {stats['computed']} blocks computed, {stats['skipped']} skipped, "
                  f"{stats['seconds']:.1f} s")
    return targets


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("inputs", nargs="*", metavar="INPUT", help="image files (TIFF, PNG, ...) or folders of them")
    add("--challenge", action="store_true",
        help=f"predict the challenge's {data.TEST_FILE} (found as the training data are) for submission")
    add("--data-dir", help="with --challenge: the folder holding the ISBI stacks")
    add("--model", help=f"a .keras file saved by train.py, or an export of one (.onnx, bioimage.io .zip, SavedModel "
                       f"folder; see export.py) (default: {DEFAULT_MODEL.relative_to(PROJECT_DIR)})")
    add("--out", help="folder for the predictions (default: beside each input), or a .tif file name")
    add("--tile", type=int, default=DEFAULT_TILE, help="tile side in pixels, a multiple of 16 (default %(default)s)")
    add("--overlap", type=int, default=DEFAULT_OVERLAP, help="pixels shared by neighbouring tiles (default %(default)s)")
    add("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="tiles per model call (default %(default)s)")
    add("--tta", action="store_true", help="average over the 8 flips and quarter turns of each tile (8x slower)")
    add("--uint8", action="store_true", help="write 0-255 uint8 instead of float32 probabilities")
    add("--png", action="store_true", help="also write a 0/255 PNG mask per page (threshold 0.5)")
    add("--mask-tiff", action="store_true", help="also write the 0/255 masks (threshold 0.5) as <name>-mask.tif")
    volumes = parser.add_argument_group("zarr output, block by block (a .zarr input or --out NAME.zarr)")
    volumes.add_argument("--block", type=int, help="block side in pixels, also the output's chunks (default 1024)")
    volumes.add_argument("--workers", type=int, metavar="N",
                         help="predict the blocks on a local Dask cluster of N processes")
    volumes.add_argument("--dask", metavar="ADDRESS",
                         help="predict the blocks on the Dask scheduler at this address (its scheduler and workers "
                              "need this project on PYTHONPATH, see blocks.py)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    try:
        if args.challenge:
            args.inputs = [*args.inputs, data.find_data_dir(args.data_dir) / data.TEST_FILE]
        if not args.inputs:
            raise ValueError("no input: name image files or folders, or use --challenge")
        if any(is_zarr(path) for path in [*args.inputs, args.out or ""]):
            if args.png or args.mask_tiff:
                raise ValueError("--png and --mask-tiff are for TIFF output; a zarr output can be thresholded later")
            predict_volumes(args.inputs, args.model, args.out, args.tile, args.overlap, args.batch_size, args.tta,
                            args.uint8, args.block, args.workers, args.dask)
            return 0
        for flag in ("block", "workers", "dask"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} is for zarr output: give a .zarr input or --out NAME.zarr")
        if args.out and Path(args.out).suffix.lower() in TIFF_SUFFIXES:
            data.prepare_output(args.out)
        predict_files(args.inputs, args.model, args.out, args.tile, args.overlap, args.batch_size, args.tta, args.uint8,
                      args.png, args.mask_tiff)
    except (ValueError, OSError) as err:  # data.DataError is a ValueError; OSError: files, Dask connections
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
