"""Affinities: the second thing a U-Net here can learn to predict, beside the membrane map.

An affinity channel belongs to an offset (dy, dx) in pixels. At pixel p its
target is 1 when p and p + (dy, dx) lie in the same cell, 0 when a membrane
runs between them. Nearest-neighbour offsets say where the boundaries are;
long-range ones (3, 9, 27 pixels) say which pixels must not be joined, which
is what the mutex watershed (`segment.py`) uses to close gaps in a membrane.
Offsets point up and left, as in elf and torch-em, and the nearest-neighbour
channels come first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

Offset = tuple[int, int]

# Wolf et al. (2020), "The Mutex Watershed and its Objective", used 1, 3, 9 and 27 on ISBI 2012.
OFFSETS: tuple[Offset, ...] = ((-1, 0), (0, -1), (-3, 0), (0, -3), (-9, 0), (0, -9), (-27, 0), (0, -27))
# The field's ISBI set (the mutex watershed's experiments): attractive edges to the nearest neighbours only,
# repulsive ones 9 and 27 pixels away and around a radius of 9 on the diagonals. Closed under the flips and
# quarter turns of test-time augmentation, up to the sign of an offset.
FIELD_OFFSETS: tuple[Offset, ...] = ((-1, 0), (0, -1), (-9, 0), (0, -9), (-9, -9), (9, -9), (-9, -4), (-4, -9),
                                     (4, -9), (9, -4), (-27, 0), (0, -27))
NAMED_OFFSETS = {"field": FIELD_OFFSETS}


def check_offsets(offsets: Sequence[Sequence[int]]) -> tuple[Offset, ...]:
    """Return `offsets` as a tuple of (dy, dx) pairs, after checking that the first two are (-1, 0) and (0, -1)."""
    try:
        offsets = tuple((int(dy), int(dx)) for dy, dx in offsets)
    except (TypeError, ValueError):
        raise ValueError(f"offsets must be pairs of integers (dy, dx), got {offsets!r}") from None
    if offsets[:2] != ((-1, 0), (0, -1)):
        raise ValueError(f"the first two offsets must be the nearest neighbours (-1, 0) and (0, -1), got {offsets[:2]}")
    if len(set(offsets)) != len(offsets) or any(o == (0, 0) for o in offsets):
        raise ValueError(f"offsets must be distinct and nonzero, got {offsets}")
    return offsets


def offsets_for(channels: int, offsets: Sequence[Sequence[int]] | None = None) -> tuple[Offset, ...]:
    """Return the offsets of a model's `channels` affinity channels: `offsets` if given (checked), else OFFSETS
    when the count fits; ValueError when the count does not fit."""
    offsets = OFFSETS if offsets is None else check_offsets(offsets)
    if channels != len(offsets):
        raise ValueError(f"the model predicts {channels} channels but {len(offsets)} offsets are given "
                         f"({', '.join(map(str, offsets))}); pass the offsets it was trained with")
    return offsets


def parse_offsets(text: str) -> tuple[Offset, ...]:
    """Return offsets from the command line's form: distances '1,3,9,27' (each taken in y and in x), or a
    name of NAMED_OFFSETS ('field')."""
    if str(text).strip() in NAMED_OFFSETS:
        return NAMED_OFFSETS[str(text).strip()]
    try:
        distances = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"offsets must be comma-separated whole numbers of pixels, e.g. 1,3,9,27, or "
                         f"{' or '.join(NAMED_OFFSETS)}; got {text!r}") from None
    if not distances or distances[0] != 1 or min(distances) < 1 or len(set(distances)) != len(distances):
        raise ValueError(f"offsets must start at 1 and be distinct positive distances, e.g. 1,3,9,27; got {text!r}")
    return check_offsets([o for d in distances for o in ((-d, 0), (0, -d))])


def cells_of(label: np.ndarray) -> np.ndarray:
    """Return the (H, W) int32 cells of a binary label (nonzero = cell), every membrane pixel given to its
    nearest cell: the cells are the 4-connected components of the cell pixels, numbered from 1."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be 2-D (H, W), got shape {label.shape}")
    cells, count = ndimage.label(label != 0)
    if count == 0:
        return np.ones(label.shape, np.int32)  # all membrane: one region, every affinity 1
    _, (rows, cols) = ndimage.distance_transform_edt(cells == 0, return_indices=True)
    return cells[rows, cols].astype(np.int32)


def _shifted(array: np.ndarray, offset: Offset) -> np.ndarray:
    """Return array[p + offset] at each p, with coordinates that leave the image clamped to its edge."""
    height, width = array.shape[:2]
    rows = np.clip(np.arange(height) + offset[0], 0, height - 1)
    cols = np.clip(np.arange(width) + offset[1], 0, width - 1)
    return array[rows][:, cols]


def affinities_of(cells: np.ndarray, offsets: Sequence[Offset] = OFFSETS) -> np.ndarray:
    """Return the (H, W, K) float32 affinities of a label image of cells: 1 where p and p + offset share a cell.

    Beyond the image edge a cell is taken to go on (the offset is clamped to the edge)."""
    cells = np.asarray(cells)
    return np.stack([cells == _shifted(cells, o) for o in offsets], axis=-1).astype(np.float32)


def label_affinities(label: np.ndarray, offsets: Sequence[Offset] = OFFSETS) -> np.ndarray:
    """Return the (H, W, K) affinity targets of one binary label page (nonzero = cell): `affinities_of(cells_of(label))`."""
    return affinities_of(cells_of(label), offsets)


def inside(shape: Sequence[int], offsets: Sequence[Offset] = OFFSETS) -> np.ndarray:
    """Return the (H, W, K) float32 mask of the pixels p whose partner p + offset lies inside an (H, W) image:
    1 inside, 0 where the pair leaves it (its affinity there is a guess, `affinities_of` clamps it)."""
    height, width = shape[:2]
    mask = np.zeros((height, width, len(offsets)), np.float32)
    for c, (dy, dx) in enumerate(offsets):
        mask[max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0), c] = 1.0
    return mask


def label_targets(label: np.ndarray, offsets: Sequence[Offset] = OFFSETS) -> np.ndarray:
    """Return the (H, W, 2K) float32 training targets of one binary label crop: its K affinities
    (`label_affinities`), then K masks of the pairs that stay inside the crop (`inside`), which the losses and
    metrics weigh by, so that a pair whose partner the crop cut off teaches nothing."""
    return np.concatenate([label_affinities(label, offsets), inside(np.shape(label), offsets)], axis=-1)


def cell_map(affs: np.ndarray) -> np.ndarray:
    """Return an (..., H, W) cell probability from (..., H, W, K) affinities, 1 = inside a cell, as a membrane
    model's output: the lowest of the four nearest-neighbour affinities that touch each pixel.

    The minimum, not a mean: both pixels of a cut edge are marked, so a boundary is a closed line whichever
    way it runs (a mean of the up and left channels reads 0.5 along any straight boundary)."""
    affs = np.asarray(affs)
    up, left = affs[..., 0], affs[..., 1]
    down, right = np.ones_like(up), np.ones_like(left)
    down[..., :-1, :] = up[..., 1:, :]  # the edge to the pixel below is that pixel's "up" edge
    right[..., :, :-1] = left[..., :, 1:]
    return np.minimum(np.minimum(up, left), np.minimum(down, right))


# ------------------------------------------------------ flips and rotations

def _moved_offset(offset: Offset, k: int) -> Offset:
    """Return where `offset` points after the k-th flip/rotation of tiling._dihedral (np.rot90 k % 4, then a
    left-right flip if k >= 4), as (dy, dx) in the moved image."""
    dy, dx = offset
    for _ in range(k % 4):  # np.rot90 on (rows, cols): (dy, dx) -> (-dx, dy)
        dy, dx = -dx, dy
    return (dy, -dx) if k >= 4 else (dy, dx)


def _inverse(k: int) -> int:
    """Return the index of the flip/rotation that undoes the k-th (a rotation then a flip is its own inverse)."""
    return (-k) % 4 if k < 4 else k


def undo_moved_affinities(moved: np.ndarray, k: int, offsets: Sequence[Offset]) -> tuple[np.ndarray, np.ndarray]:
    """Return (affinities, weights), both (N, H, W, K), of a prediction made on images moved by the k-th
    flip/rotation and already mapped back to the original pixel grid.

    Channel c answered offsets[c] in the moved image; on the original grid it compares each pixel along
    d = the inverse transform of offsets[c], which is offsets[j] or -offsets[j] for some channel j. A negated
    one is the same pair of pixels seen from the other end, A_d(p) = A_-d(p + d), so that map is shifted by d;
    pixels whose partner falls outside the image get weight 0 (this view has no answer there).
    """
    offsets = [tuple(o) for o in offsets]
    out = np.zeros_like(moved)
    weights = np.zeros(moved.shape, np.float32)
    height, width = moved.shape[1:3]
    for c, offset in enumerate(offsets):
        direction = _moved_offset(offset, _inverse(k))
        if direction in offsets:
            j = offsets.index(direction)
            out[..., j], weights[..., j] = moved[..., c], 1.0
            continue
        j = offsets.index((-direction[0], -direction[1]))
        # A_-d(q) = A_d(q - d): pixel q's value sits at q - d
        rows, cols = np.arange(height) - direction[0], np.arange(width) - direction[1]
        valid = (((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None, :])
        shifted = moved[:, np.clip(rows, 0, height - 1)][:, :, np.clip(cols, 0, width - 1), c]
        out[..., j] = shifted * valid
        weights[..., j] = valid
    return out, weights
