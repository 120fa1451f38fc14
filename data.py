"""ISBI 2012 data: find, read and validate the stacks, normalise, split, augment.

Knows nothing of models. Everything the training loop eats comes from here as
float32 NHWC arrays in [0, 1]; labels are exactly 0 (membrane) or 1 (cell).

Command line: ``python data.py download [--dest DIR]`` fetches the stacks,
``python data.py check [DIR]`` validates what is there.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise DataError(f"{path}: not a readable TIFF file ({reason})") from err
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
    check = sub.add_parser("check", help="validate the stacks and print the split")
    check.add_argument("data_dir", nargs="?")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            print(f"data ready in {download(args.dest, args.url)}")
        else:
            images, labels = load_isbi(args.data_dir)
            print(f"{find_data_dir(args.data_dir)}: {images.shape[0]} pages of "
                  f"{images.shape[1]}x{images.shape[2]} {images.dtype}; labels {np.unique(labels).tolist()}")
            for part, idx in split_indices(len(images)).items():
                print(f"  {part}: {idx}")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
