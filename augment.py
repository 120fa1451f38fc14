"""Augmentation: the random transforms of training pairs and the batches that feed training.

The transforms (affine, elastic, flips, quarter turns) move an image, its
label and any per-pixel map together; `AugmentedBatches` draws them as a
function of (seed, epoch, index) only, so a resumed run sees the batches it
would have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing
from collections.abc import Callable

import keras
import numpy as np
from scipy import interpolate, ndimage

from files import DataError


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

    Intensity changes (off by default) touch the image only, never the label:
    its contrast is scaled about its mean by a factor within 1 +- `contrast`,
    `brightness` is added within +- (in units of the [0, 1] image), it is
    blurred by a Gaussian of up to `blur` pixels, and Gaussian noise of up to
    `noise` standard deviation is added; each drawn uniformly per pair. The
    ISBI stack is blurred in its first half and sharp in its second, and its
    pages differ in brightness and contrast (docs/EXPERIMENTS.md).
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
    contrast: float = 0.0
    brightness: float = 0.0
    blur: float = 0.0
    noise: float = 0.0

    def __post_init__(self):
        if self.elastic_grid < 0 or self.elastic_grid == 1:
            raise ValueError(f"elastic_grid must be 0 (off) or at least 2 points per side, got {self.elastic_grid}")
        if self.elastic_sigma < 0:
            raise ValueError(f"elastic_sigma must be >= 0 pixels, got {self.elastic_sigma}")
        for name in ("contrast", "brightness", "blur", "noise"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.contrast >= 1:
            raise ValueError(f"contrast must be below 1 (a factor within 1 +- contrast), got {self.contrast}")

    @property
    def elastic(self) -> bool:
        """Whether the settings deform elastically (a grid and a non-zero sigma)."""
        return self.elastic_grid > 0 and self.elastic_sigma > 0

    @property
    def intensity(self) -> bool:
        """Whether the settings change the image's intensities."""
        return any((self.contrast, self.brightness, self.blur, self.noise))

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


def random_intensity(image: np.ndarray, aug: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """Return an (H, W[, C]) float32 image with random contrast, brightness, blur and noise, clipped to [0, 1];
    the channels of neighbouring sections change together."""
    image = np.asarray(image, np.float32)
    if aug.contrast:
        mean = image.mean()
        image = mean + (image - mean) * rng.uniform(1 - aug.contrast, 1 + aug.contrast)
    if aug.brightness:
        image = image + rng.uniform(-aug.brightness, aug.brightness)
    if aug.blur:
        sigma = rng.uniform(0.0, aug.blur)
        image = ndimage.gaussian_filter(image, (sigma, sigma, 0)[: image.ndim], mode="nearest")
    if aug.noise:
        image = image + rng.normal(0.0, rng.uniform(0.0, aug.noise), image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


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
    """Return one randomly transformed (image, label) pair of (H, W) arrays (the image may be (H, W, C): its
    channels move together), optionally a random crop;
    (image, label, weight) when a per-pixel `weight` map is given to move along.

    The same transform moves all; the image is interpolated bilinearly, the
    label (and weight) by nearest neighbour so that the label stays binary and
    the weights stay on the pixels they were computed for. Borders are filled by
    repeating the nearest pixel, as Keras' fill_mode='nearest'. An elastic
    deformation, when `aug` asks for one, is composed with the affine transform
    and the crop, so that the image is interpolated only once; intensity changes
    follow, on the image alone.
    """
    h, w = label.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape} and label {label.shape} differ in height or width")
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
    channels = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[-1])]
    arrays = (*((channel, 1) for channel in channels), (label, 0)) + (((weight, 0),) if weight is not None else ())
    outputs = _resample(arrays, matrix, (out_h, out_w), displacement)
    if image.ndim == 3:  # neighbouring sections (data.with_context) move as one
        outputs = [np.stack(outputs[: len(channels)], axis=-1), *outputs[len(channels) :]]
    if aug.intensity:
        outputs[0] = random_intensity(outputs[0], aug, rng)
    if aug.rot90:
        # Quarter turns keep the shape only for square outputs; otherwise half turns.
        k = int(rng.integers(4)) if out_h == out_w else 2 * int(rng.integers(2))
        outputs = [np.rot90(array, k) for array in outputs]
    return tuple(outputs)


class AugmentedBatches(keras.utils.PyDataset):
    """Keras dataset of augmented training batches, without end: (images, labels), float32 NHWC (images with C
    channels: 1, or neighbouring sections, data.with_context).

    Batch i is optimizer step `first_step` + i of epochs of `steps_per_epoch`
    steps: it draws `batch_size` random pages, transforms each pair with its own
    random transform and crops it to `crop` pixels, as a function of (seed, epoch,
    step within the epoch) only, so a resumed run sees the batches it would have
    seen. With `weights` (per-pixel loss weights of each page, N x H x W) it yields
    (images, labels, weights), the weights moved with their labels, which Keras
    applies as sample weights. With `target` (a picklable function of one augmented
    (H, W) label page, such as `affinities.label_affinities`) the labels yielded
    are its (H, W, K) outputs. Endless, because Keras (given `steps_per_epoch`)
    then keeps one iterator for the whole of `fit`: it rebuilds a finite dataset's
    every epoch, and that rebuild stalled some epochs for 10-30 s with the cores
    idle (docs/PERFORMANCE.md).
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
        first_step: int = 0,
        target: Callable[[np.ndarray], np.ndarray] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if first_step < 0 or steps_per_epoch < 1:
            raise ValueError(f"first_step must be >= 0 and steps_per_epoch positive, got {first_step} and "
                             f"{steps_per_epoch}")
        if images.shape[:3] != labels.shape[:3] or labels.shape[3:] != (1,):
            raise DataError(f"images {images.shape} and labels {labels.shape} differ in shape")
        if weights is not None and weights.shape != labels.shape[:3]:
            raise DataError(f"weights {weights.shape} do not match the labels {labels.shape[:3]}")
        self.images = images[..., 0] if images.shape[-1] == 1 else images
        self.labels = labels[..., 0]
        self.weights = weights
        self.target = target
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.augmentation = augmentation if augmentation is not None else Augmentation()
        self.crop = crop
        self.seed = seed
        self.first_step = first_step

    @property
    def num_batches(self) -> None:
        """None: the batches never run out (Keras's sign of an endless dataset)."""
        return None

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        epoch, step = divmod(self.first_step + index, self.steps_per_epoch)
        rng = np.random.default_rng([self.seed, epoch, step])
        pages = rng.integers(0, len(self.images), size=self.batch_size)
        samples = [
            augment_pair(self.images[p], self.labels[p], self.augmentation, rng, self.crop,
                         None if self.weights is None else self.weights[p])
            for p in pages
        ]
        x, y, *w = (np.stack(parts).astype(np.float32) for parts in zip(*samples))
        y = y[..., np.newaxis] if self.target is None else np.stack([self.target(page) for page in y])
        return (x[..., np.newaxis] if x.ndim == 3 else x, y.astype(np.float32), *w)


@contextlib.contextmanager
def workers_from_a_fork_server():
    """Within it, Keras starts the processes that augment batches (`use_multiprocessing=True`) from a fork
    server that has imported this module, instead of forking the training process: a child forked while one
    of TensorFlow's threads holds a lock can wait on that lock for ever (keras-team/keras#11461; seen here as a
    data worker stuck on its queue's lock)."""
    from keras.src.trainers.data_adapters import py_dataset_adapter

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    pools, ids = py_dataset_adapter.get_pool_class, py_dataset_adapter.get_worker_id_queue
    queue = context.Queue()  # the workers' ids: a lock made for forked children cannot reach these
    py_dataset_adapter.get_pool_class = lambda use_multiprocessing: context.Pool if use_multiprocessing else pools(False)
    py_dataset_adapter.get_worker_id_queue = lambda: queue
    try:
        yield
    finally:
        py_dataset_adapter.get_pool_class, py_dataset_adapter.get_worker_id_queue = pools, ids
        queue.close()
