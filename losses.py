"""Optional training losses of the U-Net literature: Keras versions for training and numpy twins for tests.

Ronneberger, Fischer and Brox (2015), "U-Net: Convolutional Networks for
Biomedical Image Segmentation", MICCAI, arXiv:1505.04597, section 3: a
pixel-wise weighted cross-entropy whose weight map (eq. 2) makes the network
learn the thin borders between touching cells. Milletari et al. (2016),
"V-Net", 3DV, arXiv:1606.04797: the soft Dice loss.

Labels: 1 = cell interior, 0 = membrane; predictions are the probability of
"cell". Keras losses return one value per sample, shape (batch,), so that
Keras averages them over any batch size exactly, and compute in float32
whatever the model's dtype policy.

The weighted cross-entropy is Keras' own binary cross-entropy with the
weight map given as per-pixel sample weights: `augment.AugmentedBatches` moves
the map with its label and yields (images, labels, weights).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
from keras import ops
from scipy import ndimage

from metrics import per_sample_mean, split_targets
from scores import segment_cells

EPSILON = 1e-7  # probabilities are clipped to [EPSILON, 1 - EPSILON] before the log, as Keras does
# Distances beyond sigma * this are treated as infinite in the weight map: there the border term is below
# w0 * 1e-6 (exp(-x^2 / 2) = 1e-6 at x = sqrt(2 ln 1e6) = 5.26).
_CUTOFF_SIGMAS = float(np.sqrt(2.0 * np.log(1e6)))


# ---------------------------------------------------------------- weight map (numpy)

def class_balance_weights(label: np.ndarray) -> np.ndarray:
    """Return w_c: per pixel the inverse frequency of its class, scaled so that the more frequent class has weight 1.

    w_c(x) = f_dominant / f_class(x), with f the fraction of pixels of each
    class (cell = label > 0.5, membrane otherwise) in `label` itself. On ISBI
    pages membrane is about 22 % of the pixels, so membrane pixels get about
    3.5 and cell pixels 1. A label of one class only gets 1 everywhere.
    """
    cells = np.asarray(label) > 0.5
    f_cell = float(np.mean(cells))
    if f_cell in (0.0, 1.0):
        return np.ones(cells.shape, np.float32)
    f_dominant = max(f_cell, 1.0 - f_cell)
    return np.where(cells, f_dominant / f_cell, f_dominant / (1.0 - f_cell)).astype(np.float32)


def nearest_two_cell_distances(cells: np.ndarray, cutoff: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
    """Return (d1, d2): per pixel the Euclidean distance to the nearest and the second-nearest cell.

    The distance of a pixel to a cell is to the cell's closest pixel (0 inside
    the cell), by `scipy.ndimage.distance_transform_edt`. Each cell's
    distances are computed only in its bounding box grown by `cutoff` pixels
    (outside it they exceed `cutoff`), which makes the cost grow with the cells'
    sizes rather than with cells x image. Distances above `cutoff`, and all
    distances where fewer than two cells exist, may be reported as inf;
    those up to `cutoff` are exact.

    Args:
        cells: (H, W) integer labels, 0 = membrane, cells 1..n (see `scores.segment_cells`).
        cutoff: pixels; the distances that must come out exact.
    """
    cells = np.asarray(cells)
    if cells.ndim != 2:
        raise ValueError(f"cells must be 2-D (H, W), got shape {cells.shape}")
    d1 = np.full(cells.shape, np.inf)
    d2 = np.full(cells.shape, np.inf)
    margin = int(np.ceil(cutoff)) if np.isfinite(cutoff) else max(cells.shape)
    h, w = cells.shape
    for index, box in enumerate(ndimage.find_objects(cells), start=1):
        if box is None:  # a label number with no pixels
            continue
        rows, cols = box
        window = (slice(max(rows.start - margin, 0), min(rows.stop + margin, h)),
                  slice(max(cols.start - margin, 0), min(cols.stop + margin, w)))
        distance = ndimage.distance_transform_edt(cells[window] != index)
        near1, near2 = d1[window], d2[window]  # views: updated in place
        np.minimum(near2, np.maximum(near1, distance), out=near2)
        np.minimum(near1, distance, out=near1)
    return d1, d2


def border_weight_map(label: np.ndarray, w0: float = 10.0, sigma: float = 5.0, balance: bool = True) -> np.ndarray:
    """Return the U-Net paper's weight map w(x) of a cell/membrane label, float32 (H, W).

    Ronneberger et al. (2015), eq. 2:

        w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

    with d1, d2 the distances to the nearest and second-nearest cell (cells:
    4-connected components of label > 0.5, as `scores.segment_cells`), and
    w_c the class-balancing weight (`class_balance_weights`: inverse class
    frequency in this label, the more frequent class at 1; 1 everywhere with
    `balance=False`).

    As in the paper the border term is computed for every pixel, not only for
    membrane: it peaks on thin membranes between close cells (d1 + d2 small),
    and cell pixels next to such a membrane get part of it too (there d1 = 0
    and d2 is the distance across the membrane). Deep inside a cell or in wide
    membrane w(x) is w_c(x). With fewer than two cells the border term is 0.
    Cost: about 50 ms for a 512x512 ISBI page (136 cells), 10 ms for a 256x256 crop.

    Args:
        label: (H, W); > 0.5 = cell, else membrane (0/1 floats and 0/255 bytes both work).
        w0: height of the border term (paper: 10).
        sigma: its width, pixels (paper: about 5).
        balance: add the class-balancing w_c (else w_c = 1).
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be 2-D (H, W), got shape {label.shape}")
    if w0 < 0 or sigma <= 0:
        raise ValueError(f"need w0 >= 0 and sigma > 0, got w0={w0!r}, sigma={sigma!r}")
    w_c = class_balance_weights(label) if balance else np.ones(label.shape, np.float32)
    d1, d2 = nearest_two_cell_distances(segment_cells(label > 0.5), cutoff=_CUTOFF_SIGMAS * sigma)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))  # exp(-inf) = 0 where a cell is missing
    return (w_c + border).astype(np.float32)


# ---------------------------------------------------------------- Keras losses

def _label_channel(y_true, y_pred):
    """Return the target channels that `y_pred` predicts (the label; or the affinities), as float32 (batch, H, W, C)."""
    return split_targets(y_true, y_pred)[0]


def _pair_mask(y_true, y_pred):
    """Return the (batch, H, W, C) float32 weights of the pairs that count, when `y_true` carries them after its C
    targets (2C channels: `affinities.label_targets`); None when every pixel counts."""
    return split_targets(y_true, y_pred)[1]


def _pixel_bce(y_true, y_pred):
    """Return the per-pixel binary cross-entropy of probabilities (clipped to [EPSILON, 1 - EPSILON])."""
    y_pred = ops.clip(ops.cast(y_pred, "float32"), EPSILON, 1.0 - EPSILON)
    return -(y_true * ops.log(y_pred) + (1.0 - y_true) * ops.log(1.0 - y_pred))


@keras.saving.register_keras_serializable(package="unet_isbi")
def dice_loss(y_true, y_pred, smooth: float = 1.0):
    """Return 1 - soft Dice of the membrane class per sample, shape (batch,).

    Membrane (the minority class) is 1 - label and 1 - prediction:
    dice = (2 sum(m_true m_pred) + smooth) / (sum m_true + sum m_pred + smooth).
    0 for a perfect prediction (also when there is no membrane), near 1 for
    the inverted one. With C > 1 channels (affinities: 1 - affinity is a cut)
    it is computed per channel and averaged over the channels; pairs that
    `y_true`'s mask channels leave out (`_pair_mask`) count on neither side.
    """
    channels = y_pred.shape[-1]
    membrane_true = 1.0 - _label_channel(y_true, y_pred)
    membrane_pred = 1.0 - ops.cast(y_pred, "float32")
    mask = _pair_mask(y_true, y_pred)
    if mask is not None:
        membrane_true, membrane_pred = membrane_true * mask, membrane_pred * mask
    batch = ops.shape(membrane_true)[0]
    membrane_true = ops.reshape(membrane_true, (batch, -1, channels))
    membrane_pred = ops.reshape(membrane_pred, (batch, -1, channels))
    overlap = ops.sum(membrane_true * membrane_pred, axis=1)
    total = ops.sum(membrane_true, axis=1) + ops.sum(membrane_pred, axis=1)
    return ops.mean(1.0 - (2.0 * overlap + smooth) / (total + smooth), axis=-1)


@keras.saving.register_keras_serializable(package="unet_isbi")
def bce_loss(y_true, y_pred):
    """Return the binary cross-entropy per sample, shape (batch,), over the pairs that count (`_pair_mask`):
    Keras' own for a target with a mask of the pairs (affinities)."""
    return per_sample_mean(_pixel_bce(_label_channel(y_true, y_pred), y_pred), _pair_mask(y_true, y_pred))


@keras.saving.register_keras_serializable(package="unet_isbi")
def bce_dice_loss(y_true, y_pred):
    """Return binary cross-entropy (unweighted) + `dice_loss` per sample, shape (batch,)."""
    return bce_loss(y_true, y_pred) + dice_loss(y_true, y_pred)


@keras.saving.register_keras_serializable(package="unet_isbi")
def bce_dice_l1_loss(y_true, y_pred):
    """Return `bce_dice_loss` + the mean absolute difference |label - prediction| per sample, shape (batch,).

    The last term is the pixel difference (as a fraction): it pulls pixels the network is unsure
    of towards 0 or 1, which is what the original's pixel difference rewards.
    """
    l1 = per_sample_mean(ops.abs(_label_channel(y_true, y_pred) - ops.cast(y_pred, "float32")),
                          _pair_mask(y_true, y_pred))
    return bce_dice_loss(y_true, y_pred) + l1


# ---------------------------------------------------------------- choosing a loss by name

# Keras' own string for the cross-entropies, so that models compiled with them save and load as before;
# 'weighted_bce' is the same loss fed per-pixel sample weights (see `needs_weight_map`).
LOSSES: dict[str, str | Callable] = {
    "binary_crossentropy": "binary_crossentropy",
    "weighted_bce": "binary_crossentropy",
    "dice": dice_loss,
    "bce_dice": bce_dice_loss,
    "bce_dice_l1": bce_dice_l1_loss,
}
# For keras.models.load_model of a model compiled with one of these losses.
CUSTOM_OBJECTS = {fn.__name__: fn for fn in (*LOSSES.values(), bce_loss) if callable(fn)}


def _check_name(name: str) -> None:
    """Raise ValueError, listing the known names, unless `name` is one of `LOSSES`."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")


def get_loss(name: str, pair_mask: bool = False) -> str | Callable:
    """Return what `model.compile(loss=...)` takes for `name`: one of the keys of `LOSSES`. With `pair_mask`
    (targets that carry a mask of the pairs, `affinities.label_targets`) Keras' cross-entropy becomes `bce_loss`."""
    _check_name(name)
    return bce_loss if pair_mask and isinstance(LOSSES[name], str) else LOSSES[name]


def needs_weight_map(name: str) -> bool:
    """Return whether loss `name` is trained with `border_weight_map`s as per-pixel sample weights."""
    _check_name(name)
    return name == "weighted_bce"


# ---------------------------------------------------------------- numpy twins (per sample, shape (batch,))

def _label_channel_np(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Return the target channels that `y_pred` predicts, as float64."""
    return np.asarray(y_true, dtype=np.float64)[..., : np.shape(y_pred)[-1]]


def _pair_mask_np(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray | None:
    """Return `_pair_mask` in float64 numpy."""
    channels = np.shape(y_pred)[-1]
    return np.asarray(y_true, np.float64)[..., channels:] if np.shape(y_true)[-1] == 2 * channels else None


def _per_sample_mean_np(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Return the mean over everything but the first axis; with `weights`, the weighted mean."""
    values = values.reshape(len(values), -1)
    if weights is None:
        return values.mean(axis=-1)
    weights = weights.reshape(len(values), -1)
    return (values * weights).sum(axis=-1) / np.maximum(weights.sum(axis=-1), 1.0)


def _pixel_bce_np(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Return `_pixel_bce` in float64 numpy."""
    y_pred = np.clip(np.asarray(y_pred, dtype=np.float64), EPSILON, 1.0 - EPSILON)
    return -(y_true * np.log(y_pred) + (1.0 - y_true) * np.log(1.0 - y_pred))


def weighted_binary_crossentropy_np(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Return the per-sample mean of weights * BCE in float64 numpy, shape (batch,); `weights` (batch, H, W)."""
    bce = _pixel_bce_np(_label_channel_np(y_true, y_pred), y_pred)[..., 0]
    return _per_sample_mean_np(np.asarray(weights, dtype=np.float64) * bce)


def dice_loss_np(y_true: np.ndarray, y_pred: np.ndarray, smooth: float = 1.0) -> np.ndarray:
    """Return `dice_loss` in float64 numpy, shape (batch,)."""
    membrane_true = 1.0 - _label_channel_np(y_true, y_pred)
    membrane_pred = 1.0 - np.asarray(y_pred, dtype=np.float64)
    mask = _pair_mask_np(y_true, y_pred)
    if mask is not None:
        membrane_true, membrane_pred = membrane_true * mask, membrane_pred * mask
    batch, channels = len(membrane_true), membrane_pred.shape[-1]
    membrane_true = membrane_true.reshape(batch, -1, channels)
    membrane_pred = membrane_pred.reshape(batch, -1, channels)
    overlap = np.sum(membrane_true * membrane_pred, axis=1)
    total = membrane_true.sum(axis=1) + membrane_pred.sum(axis=1)
    return np.mean(1.0 - (2.0 * overlap + smooth) / (total + smooth), axis=-1)


def bce_loss_np(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Return `bce_loss` in float64 numpy, shape (batch,)."""
    return _per_sample_mean_np(_pixel_bce_np(_label_channel_np(y_true, y_pred), y_pred), _pair_mask_np(y_true, y_pred))


def bce_dice_loss_np(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Return `bce_dice_loss` in float64 numpy, shape (batch,)."""
    return bce_loss_np(y_true, y_pred) + dice_loss_np(y_true, y_pred)


def bce_dice_l1_loss_np(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Return `bce_dice_l1_loss` in float64 numpy, shape (batch,)."""
    l1 = _per_sample_mean_np(np.abs(_label_channel_np(y_true, y_pred) - np.asarray(y_pred, dtype=np.float64)),
                             _pair_mask_np(y_true, y_pred))
    return bce_dice_loss_np(y_true, y_pred) + l1
