"""ISBI 2012 data: find, read and validate the stacks, normalise, split, augment.

Knows nothing of models. Everything the training loop eats comes from here as
float32 NHWC arrays in [0, 1]; labels are exactly 0 (membrane) or 1 (cell).

Command line: ``python data.py download [--dest DIR]`` fetches the stacks,
``python data.py check [DIR]`` validates what is there and prints the data
report, ``python data.py check --images A --labels B`` does the same for your
own data (see `load_pages`), ``python data.py example DEST`` writes the
README's example folder pair.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

import keras
import numpy as np
import tifffile
from scipy import interpolate, ndimage

DATA_ENV = "ISBI_DATA_DIR"
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"
IMAGES_FILE = "train-volume.tif"
LABELS_FILE = "train-labels.tif"
TEST_FILE = "test-volume.tif"
FILES = (IMAGES_FILE, LABELS_FILE, TEST_FILE)
# Public mirror of the challenge files (the challenge site itself is gone).
DOWNLOAD_URL = "https://github.com/alexklibisz/isbi-2012/raw/master/data/"

# The original notebook's split by page index; everything else trains.
VALIDATION_PAGES = (5, 15, 25)
TEST_PAGES = (0, 10, 20)

HOW_TO_GET = (
    f"Put {IMAGES_FILE} and {LABELS_FILE} in the data/ folder of this project, "
    f"or point ${DATA_ENV} at the folder that holds them, "
    "or run `python data.py download` to fetch them."
)


# Pixels a TIFF may claim beyond 64 times its size (compressed data expand) before it counts as corrupt.
MAX_EXPANSION_BYTES = 1 << 30


class DataError(ValueError):
    """A data file is missing or not what the project expects."""


def error_reason(err: BaseException) -> str:
    """Return the first line of a library's error message (at most 200 characters), or its type's name."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


# ---------------------------------------------------------------- writing

def write_atomic(path: str | os.PathLike, content) -> Path:
    """Write `content` to `path` through a temporary name in the same folder, renamed into place; return the path.

    `content` is text, bytes, or a function that writes the file it is given
    (a temporary path with the same suffix). A kill or an error during the
    write leaves the previous file (or none) at `path`, never half a file.
    Raises OSError naming `path` when the folder cannot be written.
    """
    path = prepare_output(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.part{path.suffix}")
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, f"{path}: cannot write it ({err.strerror or err})") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def prepare_output(path: str | os.PathLike) -> Path:
    """Return `path` after creating its folder; OSError naming `path` if that folder cannot be made."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"{path}: cannot write it ({err.strerror or err})") from err
    if path.is_dir():
        raise IsADirectoryError(f"{path}: cannot write it (it is a folder)")
    return path


# ---------------------------------------------------------------- finding

def find_data_dir(path: str | os.PathLike | None = None) -> Path:
    """Return the folder holding the ISBI stacks: `path`, else $ISBI_DATA_DIR, else data/."""
    if path is not None:
        candidates = [("the path given", Path(path))]
    elif os.environ.get(DATA_ENV):
        candidates = [(f"${DATA_ENV}", Path(os.environ[DATA_ENV]))]
    else:
        candidates = [("the project's data/ folder", DEFAULT_DATA_DIR)]
    for _, folder in candidates:
        if (folder / IMAGES_FILE).is_file() and (folder / LABELS_FILE).is_file():
            return folder
    where = "; ".join(f"{name}: {folder}" for name, folder in candidates)
    raise DataError(f"ISBI 2012 data not found (looked in {where}). {HOW_TO_GET}")


# ---------------------------------------------------------------- reading

def read_stack(path: str | os.PathLike) -> np.ndarray:
    """Return the grey pages of a TIFF (or its single 2-D page) as an array (pages, height, width)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, photometric = series.axes, series.keyframe.photometric
            if series.nbytes > max(64 * path.stat().st_size, MAX_EXPANSION_BYTES):
                raise DataError(f"{path}: the file claims {series.nbytes:,} bytes of pixels in {path.stat().st_size:,} "
                                "bytes; it is truncated or corrupt")
            stack = series.asarray()
    except DataError:
        raise
    except Exception as err:  # tifffile raises several types for non-TIFF input
        raise DataError(f"{path}: not a readable TIFF file ({error_reason(err)})") from err
    if "S" in axes or "C" in axes or photometric == tifffile.PHOTOMETRIC.PALETTE or stack.ndim not in (2, 3):
        raise DataError(
            f"{path}: expected 2-D grey pages, got an array of shape {stack.shape} (axes {axes}, "
            f"{getattr(photometric, 'name', f'photometric {photometric}')}); colour or multi-channel pages "
            "are not supported, convert to greyscale first"
        )
    stack = stack[np.newaxis] if stack.ndim == 2 else stack
    check_pages(stack, str(path))
    return stack


def check_pages(stack: np.ndarray, name: str) -> None:
    """Raise DataError unless `stack` holds pages of at least one pixel with usable values:
    booleans, unsigned integers, signed integers without negative values, or finite floats."""
    if stack.size == 0:
        raise DataError(f"{name}: no pixels (pages of shape {stack.shape[1:]}, {len(stack)} pages)")
    kind = stack.dtype.kind
    if kind not in "buif":
        raise DataError(f"{name}: pixels of type {stack.dtype} are not supported; save grey integers or floats")
    if kind == "i" and stack.min() < 0:
        raise DataError(f"{name}: negative pixel values (type {stack.dtype}, minimum {stack.min()}); "
                        "save unsigned integers or floats in [0, 1]")
    if kind == "f" and not np.isfinite(stack).all():
        raise DataError(f"{name}: {np.count_nonzero(~np.isfinite(stack)):,} pixels are NaN or infinite")


def check_float_range(images: np.ndarray, name: str) -> None:
    """Raise DataError if float `images` (taken as they are, not scaled) lie outside [0, 1]."""
    if images.dtype.kind == "f" and (images.min() < 0 or images.max() > 1):
        raise DataError(f"{name}: float pixels must lie in [0, 1], found {images.min():g} to {images.max():g}; "
                        "scale them, or save them as 8- or 16-bit integers")


def check_labels(labels: np.ndarray, name: str = "labels") -> None:
    """Raise DataError unless `labels` holds exactly two distinct values."""
    values = np.unique(labels)
    if len(values) != 2:
        shown = ", ".join(str(v) for v in values[:6]) + (" ..." if len(values) > 6 else "")
        raise DataError(
            f"{name}: labels must be two-valued (membrane / cell), "
            f"found {len(values)} distinct values: {shown}"
        )


def load_isbi(data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return the raw (images, labels) stacks, validated, as read from disk (uint8, N x H x W)."""
    folder = find_data_dir(data_dir)
    images = read_stack(folder / IMAGES_FILE)
    check_float_range(images, str(folder / IMAGES_FILE))
    labels = read_stack(folder / LABELS_FILE)
    if images.shape != labels.shape:
        raise DataError(
            f"{folder / IMAGES_FILE} has shape {images.shape} but "
            f"{folder / LABELS_FILE} has shape {labels.shape}; they must match page for page"
        )
    check_labels(labels, str(folder / LABELS_FILE))
    return images, labels


# ---------------------------------------------------------------- normalising

def normalize_images(images: np.ndarray) -> np.ndarray:
    """Return images as float32 in [0, 1]: integers divided by their dtype's maximum."""
    images = np.asarray(images)
    if np.issubdtype(images.dtype, np.integer):
        return (images / np.iinfo(images.dtype).max).astype(np.float32)
    return images.astype(np.float32)


def binarize_labels(labels: np.ndarray) -> np.ndarray:
    """Return labels as float32 {0, 1}: 1 where above the midpoint of the value range (cell)."""
    labels = np.asarray(labels, dtype=np.float32)
    midpoint = (labels.min() + labels.max()) / 2
    return (labels > midpoint).astype(np.float32)


def add_channel(stack: np.ndarray) -> np.ndarray:
    """Return an (N, H, W) stack as (N, H, W, 1)."""
    return stack[..., np.newaxis]


# ---------------------------------------------------------------- splitting

def split_indices(n_pages: int = 30) -> dict[str, list[int]]:
    """Return the page indices of the 'train', 'validation' and 'test' parts."""
    held = set(VALIDATION_PAGES) | set(TEST_PAGES)
    if n_pages <= max(held):
        raise DataError(f"the original split needs at least {max(held) + 1} pages, got {n_pages}")
    return {
        "train": [i for i in range(n_pages) if i not in held],
        "validation": list(VALIDATION_PAGES),
        "test": list(TEST_PAGES),
    }


def load_split(data_dir: str | os.PathLike | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return {'train'|'validation'|'test': (images, labels)}, float32 NHWC, normalised."""
    images, labels = load_isbi(data_dir)
    x = add_channel(normalize_images(images))
    y = add_channel(binarize_labels(labels))
    return {part: (x[idx], y[idx]) for part, idx in split_indices(len(x)).items()}


# ---------------------------------------------------------------- augmenting

@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Random transform settings; defaults are the original notebook's ImageDataGenerator.

    Angles are in degrees, shifts in fractions of the image size, zoom is the
    half-width of the uniform range around 1.

    Elastic deformation (Ronneberger et al. 2015, section 3.1) is off by
    default. `elastic_grid` is the number of points per side of a coarse grid
    spanning the output (0 = off; the U-Net paper used 3, and at least 2 are
    needed); each point gets a random displacement in both axes, drawn from a
    Gaussian with standard deviation `elastic_sigma` pixels of the input image
    (the paper used 10). Per-pixel displacements are interpolated from the grid
    by cubic splines and added to the affine transform, so each pair is still
    resampled only once.
    """

    rotation_range: float = 0.2
    width_shift_range: float = 0.05
    height_shift_range: float = 0.05
    shear_range: float = 0.05
    zoom_range: float = 0.05
    horizontal_flip: bool = True
    vertical_flip: bool = False
    rot90: bool = False
    elastic_grid: int = 0
    elastic_sigma: float = 10.0

    def __post_init__(self):
        if self.elastic_grid < 0 or self.elastic_grid == 1:
            raise ValueError(f"elastic_grid must be 0 (off) or at least 2 points per side, got {self.elastic_grid}")
        if self.elastic_sigma < 0:
            raise ValueError(f"elastic_sigma must be >= 0 pixels, got {self.elastic_sigma}")

    @property
    def elastic(self) -> bool:
        """Whether the settings deform elastically (a grid and a non-zero sigma)."""
        return self.elastic_grid > 0 and self.elastic_sigma > 0

    @classmethod
    def none(cls) -> "Augmentation":
        """Return settings that leave images unchanged."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, False, False, False)


def random_affine(shape: tuple[int, int], aug: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """Return a 3x3 homogeneous matrix mapping output (row, col) to input (row, col)."""
    h, w = shape
    theta = np.deg2rad(rng.uniform(-aug.rotation_range, aug.rotation_range))
    shear = np.deg2rad(rng.uniform(-aug.shear_range, aug.shear_range))
    zy, zx = rng.uniform(1 - aug.zoom_range, 1 + aug.zoom_range, size=2)
    ty = rng.uniform(-aug.height_shift_range, aug.height_shift_range) * h
    tx = rng.uniform(-aug.width_shift_range, aug.width_shift_range) * w
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    shearing = np.array([[1, 0, 0], [-np.sin(shear), np.cos(shear), 0], [0, 0, 1]])
    zoom = np.diag([zy, zx, 1.0])
    shift = np.array([[1, 0, ty], [0, 1, tx], [0, 0, 1]])
    center = np.array([[1, 0, (h - 1) / 2], [0, 1, (w - 1) / 2], [0, 0, 1]])
    uncenter = np.array([[1, 0, -(h - 1) / 2], [0, 1, -(w - 1) / 2], [0, 0, 1]])
    matrix = shift @ center @ rotation @ shearing @ zoom @ uncenter
    if aug.horizontal_flip and rng.random() < 0.5:
        matrix = matrix @ np.array([[1, 0, 0], [0, -1, w - 1], [0, 0, 1]])
    if aug.vertical_flip and rng.random() < 0.5:
        matrix = matrix @ np.array([[-1, 0, h - 1], [0, 1, 0], [0, 0, 1]])
    return matrix


@functools.lru_cache(maxsize=32)
def _interpolation_matrix(size: int, grid: int) -> np.ndarray:
    """Return the (size, grid) weights that interpolate `grid` evenly spaced values to `size` pixels.

    The grid points sit at pixels linspace(0, size - 1, grid), corners included;
    between them the weights are those of a not-a-knot cubic spline (a line for
    2 points, a parabola for 3). Rows sum to 1. Read-only, as it is shared.
    """
    positions = np.linspace(0, size - 1, grid)
    matrix = interpolate.CubicSpline(positions, np.eye(grid), axis=0)(np.arange(size))
    matrix.setflags(write=False)
    return matrix


def _elastic_displacement(shape: tuple[int, int], grid: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Return a smooth random (2, H, W) field of (row, col) displacements in pixels.

    Gaussian displacements on a grid x grid lattice are interpolated to every
    pixel as A @ G @ B.T (separable cubic interpolation, one matrix product).
    """
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
    rows, cols = _interpolation_matrix(shape[0], grid), _interpolation_matrix(shape[1], grid)
    # B.T copied to C order: numpy's matmul takes ~20x longer with the transposed view.
    return rows @ coarse @ np.ascontiguousarray(cols.T)


def _resample(
    arrays: tuple[tuple[np.ndarray, int], ...],
    matrix: np.ndarray,
    output_shape: tuple[int, int],
    displacement: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Return each (array, spline order) sampled at input = matrix @ output (+ displacement), one pass each.

    Borders repeat the nearest pixel.
    """
    if displacement is None:
        kwargs = dict(matrix=matrix, output_shape=output_shape, mode="nearest")
        return [ndimage.affine_transform(array, order=order, **kwargs) for array, order in arrays]
    r = np.arange(output_shape[0], dtype=np.float64)[:, np.newaxis]
    c = np.arange(output_shape[1], dtype=np.float64)[np.newaxis, :]
    coords = np.empty((2, *output_shape))
    for axis in range(2):
        coords[axis] = matrix[axis, 0] * r + matrix[axis, 1] * c + matrix[axis, 2] + displacement[axis]
    return [ndimage.map_coordinates(array, coords, order=order, mode="nearest") for array, order in arrays]


def augment_pair(
    image: np.ndarray,
    label: np.ndarray,
    aug: Augmentation,
    rng: np.random.Generator,
    crop: int | None = None,
    weight: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """Return one randomly transformed (image, label) pair of (H, W) arrays, optionally a random crop;
    (image, label, weight) when a per-pixel `weight` map is given to move along.

    The same transform moves all; the image is interpolated bilinearly, the
    label (and weight) by nearest neighbour so that the label stays binary and
    the weights stay on the pixels they were computed for. Borders are filled by
    repeating the nearest pixel, as Keras' fill_mode='nearest'. An elastic
    deformation, when `aug` asks for one, is composed with the affine transform
    and the crop, so that the image is interpolated only once.
    """
    h, w = image.shape
    out_h, out_w = (crop, crop) if crop else (h, w)
    if out_h > h or out_w > w:
        raise ValueError(f"crop {crop} is larger than the image {image.shape}")
    matrix = random_affine((h, w), aug, rng)
    # Shift so that the output window is a random crop of the transformed image.
    oy, ox = rng.integers(0, h - out_h + 1), rng.integers(0, w - out_w + 1)
    matrix = matrix @ np.array([[1, 0, oy], [0, 1, ox], [0, 0, 1]])
    displacement = None
    if aug.elastic:
        displacement = _elastic_displacement((out_h, out_w), aug.elastic_grid, aug.elastic_sigma, rng)
    arrays = ((image, 1), (label, 0)) + (((weight, 0),) if weight is not None else ())
    outputs = _resample(arrays, matrix, (out_h, out_w), displacement)
    if aug.rot90:
        # Quarter turns keep the shape only for square outputs; otherwise half turns.
        k = int(rng.integers(4)) if out_h == out_w else 2 * int(rng.integers(2))
        outputs = [np.rot90(array, k) for array in outputs]
    return tuple(outputs)


class AugmentedBatches(keras.utils.PyDataset):
    """Keras dataset of augmented training batches: (images, labels), float32 NHWC.

    Each index draws `batch_size` random pages, transforms each pair with its
    own random transform and crops it to `crop` pixels. With `weights` (per-pixel
    loss weights of each page, N x H x W) it yields (images, labels, weights),
    the weights moved with their labels, which Keras applies as sample weights.
    The random stream is a function of (seed, epoch, index) only, so a resumed
    run sees the batches it would have seen; `first_index` > 0 leaves out the
    first batches of every epoch (those trained before an interruption).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int = 5,
        steps_per_epoch: int = 1000,
        augmentation: Augmentation | None = None,
        crop: int | None = None,
        seed: int = 0,
        weights: np.ndarray | None = None,
        first_index: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0 <= first_index < steps_per_epoch:
            raise ValueError(f"first_index must lie in 0..{steps_per_epoch - 1}, got {first_index}")
        if images.shape != labels.shape:
            raise DataError(f"images {images.shape} and labels {labels.shape} differ in shape")
        if weights is not None and weights.shape != labels.shape[:3]:
            raise DataError(f"weights {weights.shape} do not match the labels {labels.shape[:3]}")
        self.images = images[..., 0]
        self.labels = labels[..., 0]
        self.weights = weights
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.augmentation = augmentation if augmentation is not None else Augmentation()
        self.crop = crop
        self.seed = seed
        self.first_index = first_index
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps_per_epoch - self.first_index

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        rng = np.random.default_rng([self.seed, self.epoch, index + self.first_index])
        pages = rng.integers(0, len(self.images), size=self.batch_size)
        samples = [
            augment_pair(self.images[p], self.labels[p], self.augmentation, rng, self.crop,
                         None if self.weights is None else self.weights[p])
            for p in pages
        ]
        x, y, *w = (np.stack(parts).astype(np.float32) for parts in zip(*samples))
        return (x[..., np.newaxis], y[..., np.newaxis], *w)

    def on_epoch_end(self) -> None:
        self.epoch += 1


# ---------------------------------------------------------------- a lab's own data

PICTURE_SUFFIXES = (".tif", ".tiff", ".png")
DEFAULT_VALIDATION_FRACTION = 0.2


GREY_PIL_MODES = ("1", "L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def read_picture(path: str | os.PathLike) -> np.ndarray:
    """Return the frames of a grey image that PIL reads (PNG, JPEG, BMP, ...) as (frames, H, W) in its dtype."""
    from PIL import Image, ImageSequence

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as image:
            frames = []
            for frame in ImageSequence.Iterator(image):
                if frame.mode not in GREY_PIL_MODES:
                    raise DataError(f"{path}: {frame.mode} image; grey pages are needed, convert it to greyscale "
                                    "first (e.g. PIL's Image.convert('L'))")
                frames.append(np.array(frame))
    except DataError:
        raise
    except Exception as err:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError, bombs)
        raise DataError(f"{path}: not a readable image file ({error_reason(err)})") from err
    if len({frame.shape for frame in frames}) > 1:
        raise DataError(f"{path}: its frames differ in size ({', '.join(str(f.shape) for f in frames[:4])})")
    pages = np.stack(frames)
    if pages.dtype == np.int32 and pages.size and pages.min() >= 0 and pages.max() <= 65535:
        pages = pages.astype(np.uint16)  # PIL opens some 16-bit PNGs as 32-bit integers
    check_pages(pages, str(path))
    return pages


def read_pages(path: str | os.PathLike) -> list[np.ndarray]:
    """Return the grey pages of one image file (multipage TIFF, or a PNG) as a list of (H, W) arrays in its dtype."""
    path = Path(path)
    return list(read_stack(path) if path.suffix.lower() in (".tif", ".tiff") else read_picture(path))


def pair_folders(
    images_dir: str | os.PathLike, labels_dir: str | os.PathLike, allow_unpaired: bool = False
) -> list[tuple[Path, Path]]:
    """Return the (image, mask) files of two folders paired by file stem, sorted by stem.

    Every image without a mask and every mask without an image is named in
    one DataError, unless `allow_unpaired`: then they are printed and skipped.
    """
    def pictures(folder: Path) -> dict[str, Path]:
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder")
        files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES]
        if not files:
            raise DataError(f"{folder}: no image files ({', '.join(PICTURE_SUFFIXES)}) in this folder")
        found = {p.stem: p for p in files}
        if len(found) < len(files):
            shared = sorted(p.name for p in files if found[p.stem] != p)
            raise DataError(f"{folder}: several files share a name apart from the suffix ({', '.join(shared)} ...); "
                            "pairing is by name, keep one of each")
        return found

    images, labels = pictures(Path(images_dir)), pictures(Path(labels_dir))
    lonely = [f"image {images[s].name} has no mask in {labels_dir}" for s in sorted(images.keys() - labels.keys())]
    lonely += [f"mask {labels[s].name} has no image in {images_dir}" for s in sorted(labels.keys() - images.keys())]
    pairs = [(images[s], labels[s]) for s in sorted(images.keys() & labels.keys())]
    if lonely and not (allow_unpaired and pairs):
        hint = "; pass allow_unpaired=True (--allow-unpaired) to skip them" if pairs else ""
        raise DataError(f"{len(lonely)} unpaired file(s): " + "; ".join(lonely) + hint)
    for line in lonely:
        print(f"skipping unpaired file: {line}")
    return pairs


def read_pairs(images: str | os.PathLike, labels: str | os.PathLike, allow_unpaired: bool = False) -> dict:
    """Return {'images', 'labels': lists of raw (H, W) pages, 'names': one per page} of a TIFF pair or a folder pair."""
    images, labels = Path(images), Path(labels)
    if images.is_dir() != labels.is_dir():
        raise DataError(f"{images} and {labels}: give two files (multipage TIFFs) or two folders, not one of each")
    if images.is_dir():
        files = pair_folders(images, labels, allow_unpaired)
    else:
        files = [(images, labels)]
    result = {"images": [], "labels": [], "names": []}
    for image_file, label_file in files:
        pages, masks = read_pages(image_file), read_pages(label_file)
        if len(pages) != len(masks):
            raise DataError(f"{image_file} has {len(pages)} pages but {label_file} has {len(masks)}")
        for i, (page, mask) in enumerate(zip(pages, masks)):
            if page.shape != mask.shape:
                raise DataError(f"{image_file} page {i} is {page.shape} but its mask {label_file} is {mask.shape}")
        result["images"] += pages
        result["labels"] += masks
        result["names"] += [image_file.name if len(pages) == 1 else f"{image_file.name}[{i}]"
                            for i in range(len(pages))]
    return result


def label_convention(labels: list[np.ndarray], name: str, membrane_value: int | None = None) -> dict:
    """Return {'values', 'membrane_value', 'cell_fraction'} of two-valued masks; DataError says what is wrong.

    The two values may be in any encoding (0/1, 0/255, 0/65535, ...); the
    membrane value is `membrane_value`, by default the lower one (ISBI: 0).
    More than two values are refused with the values listed; with the default,
    membranes as the majority class are refused as inverted polarity, naming
    the setting that reads them the other way.
    """
    values = np.unique(np.concatenate([np.unique(page) for page in labels]))
    if len(values) != 2:
        shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
        raise DataError(f"{name}: masks must hold two values (membrane / cell), found {len(values)}: {shown}; "
                        "masks saved with smoothing or as JPEG gain extra values, save them as PNG or TIFF")
    low, high = (v.item() for v in values)
    membrane = low if membrane_value is None else membrane_value
    if membrane not in (low, high):
        raise DataError(f"{name}: membrane_value {membrane_value} is not one of the mask values {low}, {high}")
    membrane_pixels = sum(int(np.count_nonzero(page == membrane)) for page in labels)
    cell_fraction = 1.0 - membrane_pixels / sum(page.size for page in labels)
    other = high if membrane == low else low
    if cell_fraction < 0.5:
        message = (f"{name}: membranes (value {membrane}) are {100 * (1 - cell_fraction):.0f} % of the pixels, "
                   f"the majority; in EM they are the minority, so the masks look inverted (cells = {membrane})")
        if membrane_value is None:
            raise DataError(f"{message}. If {other} marks membranes, set membrane_value={other} "
                            f"(--membrane-value {other}); to keep this reading, set membrane_value={membrane}")
        print(f"warning: {message}; kept, as membrane_value={membrane} was given")
    return {"values": [low, high], "membrane_value": membrane, "cell_fraction": cell_fraction}


def parse_split(split: str | None, n_pages: int, seed: int = 0) -> dict[str, list[int]]:
    """Return {'train', 'validation'} page indices: `split` is page indices ('3,7'), a fraction ('0.2', seeded)
    or 'isbi' (the original split, with its 'test' part); None means a fraction of DEFAULT_VALIDATION_FRACTION."""
    if split == "isbi":
        return split_indices(n_pages)
    text = str(DEFAULT_VALIDATION_FRACTION) if split is None else split.strip()
    try:
        if "," in text or text.isdigit():
            validation = sorted({int(part) for part in text.split(",") if part.strip()})
        else:
            fraction = float(text)
            if not 0 < fraction < 1:
                raise ValueError
            count = min(max(1, round(fraction * n_pages)), n_pages - 1)
            validation = sorted(np.random.default_rng(seed).choice(n_pages, count, replace=False).tolist())
    except ValueError:
        raise DataError(f"split {split!r}: give validation page indices (e.g. '3,7'), a fraction between 0 and 1 "
                        "(e.g. '0.2'), 'isbi', or separate validation files") from None
    if not validation or any(not 0 <= i < n_pages for i in validation) or len(validation) == n_pages:
        raise DataError(f"split {split!r} does not leave both training and validation pages among {n_pages} "
                        "page(s); with a single page give separate validation files")
    return {"train": [i for i in range(n_pages) if i not in validation], "validation": validation}


def _fit_page(page: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Return an (H, W) page reflect-padded where smaller than `shape` and centre-cropped where larger."""
    missing = [max(target - size, 0) for size, target in zip(page.shape, shape)]
    if any(missing):
        page = np.pad(page, [(m // 2, m - m // 2) for m in missing], mode="reflect")
    top, left = (page.shape[0] - shape[0]) // 2, (page.shape[1] - shape[1]) // 2
    return page[top : top + shape[0], left : left + shape[1]]


def stack_pages(pages: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Return (H, W) pages as one (N, *shape, 1) float32 array, each reflect-padded or centre-cropped to `shape`."""
    return add_channel(np.stack([_fit_page(np.asarray(page, dtype=np.float32), shape) for page in pages]))


def part_shapes(train_sizes: list[tuple[int, int]], validation_sizes: list[tuple[int, int]],
                crop: int, multiple: int = 16) -> dict[str, tuple[int, int]]:
    """Return the common page shape of each part, pixels: training pages reach at least `crop` (reflect
    padding) and the largest page; validation pages, seen whole, shrink to the smallest page cut to a
    `multiple` (at least one `multiple`)."""
    train = tuple(max(crop, *(size[axis] for size in train_sizes)) for axis in range(2))
    validation = tuple(max(multiple, min(size[axis] for size in validation_sizes) // multiple * multiple)
                       for axis in range(2))
    return {"train": train, "validation": validation}


def load_pages(
    images: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    val_images: str | os.PathLike | None = None,
    val_labels: str | os.PathLike | None = None,
    split: str | None = None,
    membrane_value: int | None = None,
    allow_unpaired: bool = False,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> tuple[dict[str, tuple[list[np.ndarray], list[np.ndarray]]], dict]:
    """Return ({part: (images, labels)}, report): pages as lists of float32 (H, W) arrays, images in [0, 1],
    labels 1 = cell, 0 = membrane, and the data report (`data_report`).

    Without `images` the ISBI stacks (`find_data_dir(data_dir)`) with the
    original split; otherwise `images` and `labels` are two multipage TIFFs or
    two folders of PNG/TIFF pages paired by stem, split by `split`
    (`parse_split`) or by separate `val_images` / `val_labels`.
    """
    if (images is None) != (labels is None) or (val_images is None) != (val_labels is None):
        raise DataError("give images and labels together (and val_images with val_labels)")
    if images is None:
        if val_images is not None:
            raise DataError("val_images need images and labels to train on")
        folder = find_data_dir(data_dir)
        images, labels, split = folder / IMAGES_FILE, folder / LABELS_FILE, split or "isbi"
    sources = {"train": read_pairs(images, labels, allow_unpaired)}
    if val_images is not None:
        sources["validation"] = read_pairs(val_images, val_labels, allow_unpaired)
        indices = {"train": list(range(len(sources["train"]["images"]))),
                   "validation": list(range(len(sources["validation"]["images"])))}
        split_text = f"validation files {val_images}, {val_labels}"
    else:
        indices = parse_split(split, len(sources["train"]["images"]), seed)
        split_text = split or f"fraction {DEFAULT_VALIDATION_FRACTION} (seed {seed})"
    all_labels = [page for source in sources.values() for page in source["labels"]]
    where = f"{labels}" + (f" and {val_labels}" if val_labels else "")
    convention = label_convention(all_labels, where, membrane_value)
    parts = {}
    for part, idx in indices.items():
        source = sources.get(part, sources["train"])
        parts[part] = ([normalize_images(source["images"][i]) for i in idx],
                       [(source["labels"][i] != convention["membrane_value"]).astype(np.float32) for i in idx])
    report = data_report(sources, indices, convention, {"images": str(images), "labels": str(labels),
                         "val_images": val_images and str(val_images), "val_labels": val_labels and str(val_labels),
                         "split": split_text})
    return parts, report


def data_report(sources: dict, indices: dict, convention: dict, origin: dict) -> dict:
    """Return the data report: origin, pages, sizes, dtypes, intensity ranges, label values, cell fraction, split."""
    def describe(source: dict, idx: list[int]) -> dict:
        pages = [source["images"][i] for i in idx]
        sizes, dtypes = {}, {}
        for page in pages:
            sizes[f"{page.shape[0]}x{page.shape[1]}"] = sizes.get(f"{page.shape[0]}x{page.shape[1]}", 0) + 1
            dtypes[str(page.dtype)] = dtypes.get(str(page.dtype), 0) + 1
        cells = [np.count_nonzero(source["labels"][i] != convention["membrane_value"]) for i in idx]
        return {
            "pages": len(pages),
            "sizes": sizes,
            "dtypes": dtypes,
            "intensity_range": [min(p.min().item() for p in pages), max(p.max().item() for p in pages)],
            "normalised_range": [float(min(normalize_images(p).min() for p in pages)),
                                 float(max(normalize_images(p).max() for p in pages))],
            "cell_fraction": float(sum(cells) / sum(p.size for p in pages)),
            "names": [source["names"][i] for i in idx],
        }

    return {
        **origin,
        "label_values": convention["values"],
        "membrane_value": convention["membrane_value"],
        "cell_fraction": convention["cell_fraction"],
        "parts": {part: describe(sources.get(part, sources["train"]), idx) for part, idx in indices.items()},
        "split_pages": indices,
    }


def format_report(report: dict) -> str:
    """Return the data report as a few lines of text."""
    lines = [f"data: images {report['images']}, labels {report['labels']}",
             f"  labels: values {report['label_values']}, membrane = {report['membrane_value']}, "
             f"cell fraction {report['cell_fraction']:.3f}",
             f"  split: {report['split']}"]
    for part, info in report["parts"].items():
        names = info["names"]
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        lines.append(
            f"  {part}: {info['pages']} page(s), sizes {info['sizes']}, dtypes {info['dtypes']}, intensities "
            f"{info['intensity_range'][0]}..{info['intensity_range'][1]} (scaled to {info['normalised_range'][0]:.3f}"
            f"..{info['normalised_range'][1]:.3f}), cell fraction {info['cell_fraction']:.3f}: {shown}")
    return "\n".join(lines)


def write_report(report: dict, folder: str | os.PathLike) -> list[Path]:
    """Write the report as data_report.json and data_report.txt in `folder`, atomically; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (("data_report.json", json.dumps(report, indent=2) + "\n"),
                       ("data_report.txt", format_report(report) + "\n")):
        path = folder / name
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def make_example(dest: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                 size: tuple[int, int] = (700, 900), pages: tuple[int, ...] = tuple(range(6))) -> Path:
    """Write ISBI training `pages` resized to `size` (height, width) as a folder pair of PNGs,
    dest/images/page-NN.png and dest/masks/page-NN.png (0 = membrane, 255 = cell); return `dest`."""
    from PIL import Image

    stack, masks = load_isbi(data_dir)
    dest = Path(dest)
    for folder in ("images", "masks"):
        (dest / folder).mkdir(parents=True, exist_ok=True)
    zoom = (size[0] / stack.shape[1], size[1] / stack.shape[2])
    for i in pages:
        picture = np.clip(ndimage.zoom(stack[i].astype(np.float32), zoom, order=1), 0, 255).round().astype(np.uint8)
        mask = ndimage.zoom(masks[i], zoom, order=0)  # nearest neighbour: masks stay two-valued
        for folder, array in (("images", picture), ("masks", mask)):
            path = dest / folder / f"page-{i:02d}.png"
            tmp = path.with_name(f".{path.name}.tmp.png")
            Image.fromarray(array).save(tmp)
            os.replace(tmp, path)
    return dest


# ---------------------------------------------------------------- downloading

def download(dest: str | os.PathLike = DEFAULT_DATA_DIR, base_url: str = DOWNLOAD_URL, files=FILES) -> Path:
    """Download the ISBI stacks into `dest` (atomically, validated); return `dest`."""
    from tqdm import tqdm

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in files:
        target = dest / name
        if target.is_file():
            print(f"{target} already present")
            continue
        url = base_url.rstrip("/") + "/" + name
        fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=name) as bar:
                    while chunk := response.read(1 << 16):
                        out.write(chunk)
                        bar.update(len(chunk))
            read_stack(tmp_name)  # validate before it takes the real name
            os.chmod(tmp_name, 0o644)  # mkstemp makes it private; data files are for everyone
            os.replace(tmp_name, target)
        finally:
            if os.path.exists(tmp_name):
                os.remove(tmp_name)
    if LABELS_FILE in files:
        load_isbi(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("download", help="fetch the ISBI 2012 stacks")
    get.add_argument("--dest", default=str(DEFAULT_DATA_DIR))
    get.add_argument("--url", default=DOWNLOAD_URL)
    check = sub.add_parser("check", help="validate the stacks (or your own data) and print the data report")
    check.add_argument("data_dir", nargs="?")
    for flag in ("--images", "--labels", "--val-images", "--val-labels", "--split"):
        check.add_argument(flag)
    check.add_argument("--membrane-value", type=int)
    check.add_argument("--allow-unpaired", action="store_true")
    check.add_argument("--seed", type=int, default=0)
    example = sub.add_parser("example", help="write ISBI pages at 700x900 as a folder pair of PNGs (README)")
    example.add_argument("dest")
    example.add_argument("--data-dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            print(f"data ready in {download(args.dest, args.url)}")
        elif args.command == "example":
            dest = make_example(args.dest, args.data_dir)
            print(f"wrote {dest / 'images'} and {dest / 'masks'}")
        else:
            if args.images is None:
                load_isbi(args.data_dir)  # the ISBI stacks' own checks first
            _, report = load_pages(args.images, args.labels, args.val_images, args.val_labels, args.split,
                                   args.membrane_value, args.allow_unpaired, args.data_dir, args.seed)
            print(format_report(report))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
