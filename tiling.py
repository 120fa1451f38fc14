"""Tiling: predict an image of any size with any predictor, tile by tile, without seams.

As in the U-Net paper (Ronneberger et al. 2015, Fig. 2): the borders are
extrapolated by mirroring, each tile is predicted on its own, and the tile
predictions are blended with a smooth window. The one place that defines the
tile geometry. A predictor is a Keras model, any object with
`predict_on_batch` (see runtimes.py), or a plain function mapping float32
(N, H, W, 1) tiles in [0, 1] to (N, H, W, 1) probabilities, as MONAI's
sliding-window inferer takes a network.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

import affinities
from data import normalize_images
from shapes import SIZE_MULTIPLE

DEFAULT_TILE = 576  # pixels; a 512x512 page and its mirrored border (overlap / 2 each side) fit in one tile
DEFAULT_OVERLAP = 64  # pixels shared by neighbouring tiles; half of it is the mirrored border
DEFAULT_BATCH_SIZE = 4  # tiles per model call


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


def _check_geometry(tile: int, overlap: int) -> None:
    """Raise ValueError unless `tile` is a positive multiple of 16 and 0 <= `overlap` < `tile` (pixels)."""
    if tile < SIZE_MULTIPLE or tile % SIZE_MULTIPLE:
        raise ValueError(f"tile must be a positive multiple of {SIZE_MULTIPLE}, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be at least 0 and smaller than the tile ({tile}), got {overlap}")


@dataclasses.dataclass(frozen=True)
class TileSettings:
    """How an image is tiled for prediction: tile side and overlap (pixels), tiles per model call, 8-fold TTA."""

    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    batch_size: int = DEFAULT_BATCH_SIZE
    tta: bool = False

    def __post_init__(self):
        _check_geometry(self.tile, self.overlap)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size}")

    def describe(self) -> str:
        """Return the settings in words: "tiles 576, overlap 64, batch 4[, 8-fold test-time augmentation]"."""
        return (f"tiles {self.tile}, overlap {self.overlap}, batch {self.batch_size}"
                + (", 8-fold test-time augmentation" if self.tta else ""))


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
    _check_geometry(tile, overlap)
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
    """Return the predictor's (height, width) if it only takes one input size, else None (or a plain function)."""
    shape = getattr(model, "input_shape", None)
    height, width = shape[1:3] if shape is not None else (None, None)
    return (height, width) if height is not None and width is not None else None


def _check_sections(model, sections: int) -> None:
    """Raise ValueError unless the predictor takes `sections` input channels (a page and its neighbours,
    data.with_context), as far as it says (a plain function says nothing)."""
    shape = getattr(model, "input_shape", None)
    wanted = shape[-1] if shape is not None and len(shape) == 4 else None
    if isinstance(wanted, int) and wanted != sections:
        raise ValueError(f"the model takes {wanted} section(s) per page (each page with its neighbours, "
                         f"data.with_context) but was given {sections}"
                         + ("; predict a stack of pages, whose neighbours it sees" if sections == 1 else ""))


def _predictor(model) -> Callable[[np.ndarray], np.ndarray]:
    """Return the function that maps a batch of tiles to the model's outputs."""
    return getattr(model, "predict_on_batch", model)


def _predict_tiles(model, tiles: np.ndarray, tta: bool, offsets: Sequence | None = None) -> np.ndarray:
    """Return the model's (N, H, W, C) outputs for (N, H, W, S) tiles (S sections: 1, or a page and its
    neighbours), averaged over the 8 flips if `tta`.

    With C > 1 the channels are affinities along `offsets` (affinities.py), which a flip or turn permutes
    and negates: each view's answer is mapped back channel by channel (`affinities.undo_moved_affinities`).
    """
    transforms = range(8) if tta else (0,)
    predict = _predictor(model)
    total = weight = None
    for k in transforms:
        moved = np.ascontiguousarray(_dihedral(tiles, k))
        out = np.asarray(predict(moved), dtype=np.float32)
        if out.shape[:3] != moved.shape[:3] or out.ndim != 4:
            raise ValueError(
                f"the model turned tiles of shape {moved.shape} into {out.shape}; tiled prediction needs outputs "
                "of the input's size (a U-Net with padding='same')"
            )
        out = _undo_dihedral(out, k)
        if out.shape[3] > 1 and tta:
            out, seen = affinities.undo_moved_affinities(out, k, affinities.offsets_for(out.shape[3], offsets))
        else:
            seen = np.ones(out.shape, np.float32)
        total = out * seen if total is None else total + out * seen
        weight = seen if weight is None else weight + seen
    return total / weight


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


def _blend(model, padded: np.ndarray, boxes: list[tuple[int, int]], grid: TileGrid, tiling: TileSettings, progress,
           offsets) -> tuple[np.ndarray, np.ndarray]:
    """Return (the sum of the tiles' outputs weighted by the blend window, the sum of the windows), float32
    (H, W, C) and (H, W, 1), of the tiles starting at `boxes` (top, left) in the normalised `padded` image
    ((H, W), or (H, W, sections))."""
    tile_h, tile_w = grid.tile
    window = blend_window(grid.tile, grid.overlap)[..., np.newaxis]
    total = None
    weight = np.zeros(padded.shape[:2] + (1,), np.float32)
    for batch in _batches(boxes, tiling.batch_size):
        tiles = np.stack([padded[y : y + tile_h, x : x + tile_w] for y, x in batch])
        outputs = _predict_tiles(model, tiles if tiles.ndim == 4 else tiles[..., np.newaxis], tiling.tta, offsets)
        if total is None:
            total = np.zeros(padded.shape[:2] + outputs.shape[3:], np.float32)
        for (y, x), probabilities in zip(batch, outputs):
            total[y : y + tile_h, x : x + tile_w] += window * probabilities
            weight[y : y + tile_h, x : x + tile_w] += window
        if progress is not None:
            progress.update(len(batch))
    return total, weight


def predict_region(
    model,
    page,
    region: tuple[tuple[int, int], tuple[int, int]],
    *,
    tiling: TileSettings = TileSettings(),
    progress=None,
    offsets: Sequence | None = None,
) -> np.ndarray:
    """Return the probabilities of "cell" in `region` of one grey page, float32 (bottom - top, right - left),
    or of a model with C > 1 output channels (affinities along `offsets`) float32 (bottom - top, right - left, C).

    The tiles are those of the whole page (`tile_grid(page.shape)`), so a
    region gets the values that `predict_image` gives the whole page there:
    predicting a page region by region gives the same result for any region
    size. Only the pixels that the tiles touching the region need are read.

    Args:
        model, tiling, progress, offsets: as for `predict_image`.
        page: a (height, width) array, or anything with `shape` and
            ``page[rows, cols]`` slicing (e.g. a lazily read page of a zarr array); (height, width, sections)
            for a model that sees each page with its neighbours (`data.with_context`).
        region: ((top, bottom), (left, right)) in page pixels, ends exclusive.
    """
    if len(page.shape) not in (2, 3) or min(page.shape) < 1:
        raise ValueError(f"expected one grey page of shape (height, width), or (height, width, sections) with its "
                         f"neighbours, got shape {tuple(page.shape)}")
    _check_sections(model, 1 if len(page.shape) == 2 else page.shape[2])
    tile, overlap = tiling.tile, tiling.overlap
    fixed = _fixed_input_size(model)
    if fixed is not None and fixed != (tile, tile):
        raise ValueError(f"the model only takes {fixed[0]}x{fixed[1]} inputs; use tile={fixed[0]}")
    height, width = page.shape[:2]
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
    padded = normalize_images(read)[np.ix_(rows - rows.min(), cols - cols.min())]

    boxes = [(y - box_y0, x - box_x0) for y, x in origins]
    total, weight = _blend(model, padded, boxes, grid, tiling, progress, offsets)
    rows_out = slice(y0 + top - box_y0, y1 + top - box_y0)
    cols_out = slice(x0 + left - box_x0, x1 + left - box_x0)
    result = total[rows_out, cols_out] / weight[rows_out, cols_out]
    return result[..., 0] if result.shape[-1] == 1 else result


def predict_image(
    model,
    image: np.ndarray,
    *,
    tiling: TileSettings = TileSettings(),
    progress=None,
    offsets: Sequence | None = None,
) -> np.ndarray:
    """Return the model's probability of "cell" for every pixel of one grey image, float32 (H, W), or its
    C > 1 affinity channels, float32 (H, W, C).

    Args:
        model: a predictor (module docstring) mapping (N, H, W, 1) images in [0, 1] to
            (N, H, W, 1) probabilities, for H and W multiples of 16 (as `model.build_unet` makes).
        image: (H, W) or (H, W, 1), any size, any integer or float dtype; it is
            normalised as for training (`data.normalize_images`). (H, W, S) for a model that sees S sections
            at once: the page and its neighbours (`data.with_context`).
        tiling: the tile side (a multiple of 16, the model's input size if it takes only one), the overlap
            of neighbouring tiles (twice the mirrored border), tiles per model call, and whether to average
            the predictions of the 8 flips and quarter turns of each tile (`TileSettings`).
        progress: a tqdm bar (or anything with `update(n)`) advanced by the tiles done.
        offsets: of an affinity model's channels, needed for TTA when they are not `affinities.OFFSETS`.

    Example: ``predict_image(model.load_model("runs/cpu/best.keras", precision="auto"), page,
    tiling=TileSettings(tile=256))``.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(f"expected one grey image of shape (height, width), or (height, width, sections) with "
                         f"its neighbours, got shape {image.shape}")
    whole = ((0, image.shape[0]), (0, image.shape[1]))
    return predict_region(model, image, whole, tiling=tiling, progress=progress, offsets=offsets)


def predict_stack(
    model,
    stack: np.ndarray,
    *,
    tiling: TileSettings = TileSettings(),
    desc: str | None = None,
    progress: bool = True,
    offsets: Sequence | None = None,
) -> np.ndarray:
    """Return `predict_image` of each page of a (pages, H, W) stack, or of (pages, H, W, S) pages with their
    neighbours (`data.with_context`), float32 (pages, H, W) or (pages, H, W, C); shows a progress bar over tiles."""
    stack = np.asarray(stack)
    if stack.ndim not in (3, 4):
        raise ValueError(f"expected a stack of grey pages (pages, height, width), got shape {stack.shape}")
    fixed = _fixed_input_size(model)
    tiles = len(tile_grid(stack.shape[1:3], tiling.tile, tiling.overlap, fit=fixed is None).origins) * len(stack)
    with tqdm(total=tiles, desc=desc, unit="tile", disable=not progress) as bar:
        return np.stack([predict_image(model, page, tiling=tiling, progress=bar, offsets=offsets) for page in stack])


def to_uint8(probabilities: np.ndarray) -> np.ndarray:
    """Return probabilities in [0, 1] as uint8 0-255, rounded."""
    return np.round(np.clip(probabilities, 0, 1) * 255).astype(np.uint8)
