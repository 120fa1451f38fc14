"""The scores of a prediction in numpy: the Keras metrics' twins, the challenge's V_rand and V_info, cells' scores.

Never imports TensorFlow or Keras, so scoring and cutting cells start in a fraction of a second and run
where TensorFlow is absent; the Keras training metrics themselves are in metrics.py. No project imports.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
# The deletion tables of skimage.morphology.thin (Guo and Hall 1989, two subiterations); `thin` below
# applies them only where something changed and is tested equal to skimage's own function.
from skimage.morphology._skeletonize import G123_LUT, G123P_LUT


# ------------------------------------------- the Keras metrics' numpy twins (metrics.py)

def _counted(y_true: np.ndarray, y_pred: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Return y_true and y_pred as arrays of the same shape, only where `mask` (the pairs that count) is nonzero."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shapes differ: y_true {y_true.shape}, y_pred {y_pred.shape}")
    if mask is None:
        return y_true, y_pred
    keep = np.broadcast_to(np.asarray(mask) != 0, y_true.shape)
    return y_true[keep], y_pred[keep]


def pixel_difference_np(y_true: np.ndarray, y_pred: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Return 100 * mean |y_true - y_pred| over all pixels, or those where `mask` is nonzero (percent, 0..100)."""
    y_true, y_pred = _counted(y_true, y_pred, mask)
    return float(100.0 * np.mean(np.abs(y_true.astype(np.float64) - y_pred.astype(np.float64))))


def _membrane_counts(y_true: np.ndarray, y_pred: np.ndarray, threshold: float,
                     mask: np.ndarray | None = None) -> tuple[int, int, int]:
    """Return (TP, FP, FN) of the membrane class: label < 0.5, prediction < threshold (where `mask` is nonzero)."""
    y_true, y_pred = _counted(y_true, y_pred, mask)
    truth, predicted = y_true < 0.5, y_pred < threshold
    return (int(np.count_nonzero(truth & predicted)), int(np.count_nonzero(~truth & predicted)),
            int(np.count_nonzero(truth & ~predicted)))


def membrane_iou_np(y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 0.5,
                    mask: np.ndarray | None = None) -> float:
    """Return the membrane class's IoU (0..1; 0 when neither has membrane), counted as `metrics.membrane_iou`."""
    tp, fp, fn = _membrane_counts(y_true, y_pred, threshold, mask)
    return tp / (tp + fp + fn) if tp + fp + fn else 0.0


def membrane_dice_np(y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 0.5,
                     mask: np.ndarray | None = None) -> float:
    """Return the membrane class's Dice score (0..1; 0 when neither has membrane), counted as `metrics.MembraneDice`."""
    tp, fp, fn = _membrane_counts(y_true, y_pred, threshold, mask)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def accuracy_np(y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 0.5,
                mask: np.ndarray | None = None) -> float:
    """Return the fraction (0..1) of pixels (where `mask` is nonzero) where y_pred > threshold agrees with y_true > 0.5."""
    y_true, y_pred = _counted(y_true, y_pred, mask)
    return float(np.mean((y_pred > threshold) == (y_true > 0.5)))


# ------------------------------------------- a (nearly) uniform prediction

UNIFORM_FRACTION = 0.01  # a prediction with less than 1 % of its pixels on one side of the threshold is uniform
UNIFORM_RANGE = 0.05  # or one whose probabilities all lie within this of each other
UNIFORM_CAUSES = (
    "likely causes: images not scaled as in training (integers divided by their dtype's maximum, see "
    "data.normalize_images), label polarity inverted (membrane_value / --membrane-value), or too little training"
)


def uniform_prediction(probabilities: np.ndarray, threshold: float = 0.5) -> str | None:
    """Return what is uniform about a probability map of "cell" (all cell, all membrane, one grey value), or None.

    Uniform: less than UNIFORM_FRACTION of the pixels fall on one side of
    `threshold`, or all probabilities lie within UNIFORM_RANGE of each other.
    EM membranes take a fifth or so of a page, so neither happens to a
    model that has learned them.
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    low, high = float(probabilities.min()), float(probabilities.max())
    cell = float(np.mean(probabilities >= threshold))
    if high - low < UNIFORM_RANGE:
        return f"every pixel has probability {low:.3f}..{high:.3f}"
    if cell > 1 - UNIFORM_FRACTION:
        return f"{100 * cell:.2f} % of the pixels are cell (almost no membrane)"
    if cell < UNIFORM_FRACTION:
        return f"{100 * (1 - cell):.2f} % of the pixels are membrane (almost no cell)"
    return None


FLAT_FRACTION = 0.05  # a side is flat when this share of the pixels holds one probability, away from 0 and 1
FLAT_HINT = ("the ReLU filters before the output are silent on that side, so its pixels all get sigmoid(bias); "
             "a run of the original's 2 filters does this in 2 of 3 seeds: train with more (--head-filters 16)")


def flat_side(probabilities: np.ndarray) -> str | None:
    """Return which side of a probability map of "cell" is flat (a share of FLAT_FRACTION or more of its
    pixels at one value strictly between 0.02 and 0.98, its lowest or its highest), or None.

    A trained map saturates to 0 on membranes and 1 in cells; a side that
    stops at one grey value instead is what a collapsed output head leaves.
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    for side, value in (("membrane", probabilities.min()), ("cell", probabilities.max())):
        share = float(np.mean(probabilities == value))
        if 0.02 < value < 0.98 and share >= FLAT_FRACTION:
            return f"the {side} side is flat: {100 * share:.1f} % of the pixels at probability {value:.3f}"
    return None


# ------------------------------------------- ISBI 2012 challenge scores (numpy)
#
# Arganda-Carreras et al. (2015), "Crowdsourcing the creation of image
# segmentation algorithms for connectomics", Front. Neuroanat. 9:142,
# doi:10.3389/fnana.2015.00142, and its reference implementation in Fiji
# (Trainable_Segmentation, trainableSegmentation.metrics.RandError and
# VariationOfInformation, run by the challenge's "Segmentation evaluation after
# border thinning" script). Notation of the paper: S is the proposal, T the
# ground truth, p_ij the fraction of pixels in segment i of S and segment j of
# T, s_i = sum_j p_ij and t_j = sum_i p_ij.

CHALLENGE_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# (row offset, column offset, bit) of the 8 neighbours, in the code skimage's tables are indexed by.
_NEIGHBOUR_BITS = ((-1, -1, 8), (-1, 0, 4), (-1, 1, 2), (0, -1, 16), (0, 1, 1), (1, -1, 32), (1, 0, 64), (1, 1, 128))


def thin(mask: np.ndarray) -> np.ndarray:
    """Return the topology-preserving thinning of a 2-D boolean mask, equal to `skimage.morphology.thin`.

    The same subiterations, but each looks only at the pixels whose 3x3
    neighbourhood changed since that subiteration last ran (a pixel's fate
    depends on nothing else), so a noisy mask that needs a hundred passes
    costs little more than the first one. On the border masks of an
    untrained network this was 10 to 20 times faster than skimage's full passes.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    padded = np.pad(mask, 1).astype(np.uint8)  # a frame of background, as skimage's mode='constant'
    flat = padded.ravel()
    width = padded.shape[1]
    offsets = np.array([dr * width + dc for dr, dc, _ in _NEIGHBOUR_BITS])
    bits = np.array([bit for _, _, bit in _NEIGHBOUR_BITS], dtype=np.uint8)
    tables = (G123_LUT, G123P_LUT)
    stale = [flat.astype(bool), flat.astype(bool)]  # per subiteration: pixels whose neighbourhood changed
    quiet = 0  # subiterations in a row that deleted nothing
    step = 0
    while quiet < 2:
        k = step % 2
        pixels = np.flatnonzero(stale[k] & (flat == 1))
        stale[k].fill(False)
        codes = (flat[pixels[:, None] + offsets] * bits).sum(axis=1, dtype=np.uint8)
        deleted = pixels[tables[k][codes]]
        flat[deleted] = 0  # all at once: every decision above saw the same image
        neighbours = (deleted[:, None] + offsets).ravel()
        stale[0][neighbours] = stale[1][neighbours] = True
        quiet = quiet + 1 if len(deleted) == 0 else 0
        step += 1
    return padded[1:-1, 1:-1].astype(bool)


def segment_cells(cell_mask: np.ndarray, thin_borders: bool = False) -> np.ndarray:
    """Return the cells of a cell/border mask as a label image (0 = border, cells 1..n).

    Cells are the 4-connected components of the non-border pixels. 4 and not 8:
    a one-pixel-wide border drawn with 8-connected steps (as thinning leaves
    it) touches the cells on either side only at corners, and 8-connected
    cells would leak through those corners and merge; 4-connected cells with
    8-connected borders is the pairing under which a closed border separates
    what it encloses. Fiji's challenge metrics use 4-connectivity too.

    Args:
        cell_mask: (H, W); nonzero = cell interior, 0 = border (membrane).
        thin_borders: thin the border to one pixel wide first
            (`thin`, equal to `skimage.morphology.thin`, which keeps the border's topology, so
            no cell is merged or lost; a 2x2 block of border may stay). The
            image is framed with border while it is thinned: without the
            frame, a border that ends at the image edge is shortened there and
            the cells on either side of it join along the edge.
    """
    cell_mask = np.asarray(cell_mask) != 0
    if cell_mask.ndim != 2:
        raise ValueError(f"cell_mask must be 2-D (H, W), got shape {cell_mask.shape}")
    if thin_borders:
        framed_border = np.pad(~cell_mask, 1, constant_values=True)
        cell_mask = ~thin(framed_border)[1:-1, 1:-1]
    labels, _ = ndimage.label(cell_mask)  # the default structure in 2-D is the 4-neighbourhood
    return labels


def _compact(labels: np.ndarray) -> np.ndarray:
    """Return 1-D integer labels renumbered 0..k-1, keeping their order."""
    if labels.min() >= 0 and labels.max() < 2 * labels.size:  # by counting: ~50x faster than sorting
        present = np.bincount(labels) > 0
        return np.cumsum(present)[labels] - 1
    return np.unique(labels, return_inverse=True)[1].ravel()


def _contingency(seg: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the pixel counts (n_ij of the non-empty cells, s_i, t_j) of two 1-D integer label arrays."""
    s, t = _compact(seg), _compact(gt)
    _, n_ij = np.unique(s * (t.max() + 1) + t, return_counts=True)  # sparse: only the non-empty cells
    return n_ij.astype(np.float64), np.bincount(s).astype(np.float64), np.bincount(t).astype(np.float64)


def _foreground_contingency(seg: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the foreground-restricted counts (n_ij, s_i, t_j) of the challenge.

    Pixels with gt == 0 (ground-truth border) are left out. Pixels with seg == 0
    (proposal border) inside ground-truth cells stay in, each as a segment of
    its own, as in Fiji's RandError.foregroundRestrictedStatsN2 and
    VariationOfInformation.foregroundRestrictedVI (their sum(p_i0)/n and
    sum(p_i0)*log(n) terms are exactly these one-pixel segments).
    """
    seg = np.asarray(seg)
    gt = np.asarray(gt)
    if seg.shape != gt.shape:
        raise ValueError(f"shapes differ: seg {seg.shape}, gt {gt.shape}")
    for name, image in (("seg", seg), ("gt", gt)):
        if not (np.issubdtype(image.dtype, np.integer) or image.dtype == bool):
            raise ValueError(f"{name} must hold integer labels, got dtype {image.dtype}")
    foreground = gt.ravel() != 0
    if not foreground.any():
        raise ValueError("gt is 0 (border) everywhere, so the foreground-restricted scores are undefined")
    s = seg.ravel()[foreground].astype(np.int64)
    border = s == 0
    s[border] = s.max() + 1 + np.arange(np.count_nonzero(border))
    return _contingency(s, gt.ravel()[foreground].astype(np.int64))


def _f_score(split: float, merge: float) -> float:
    """Return the harmonic mean of two scores (0 when both are 0)."""
    return 0.0 if split + merge == 0 else 2.0 * split * merge / (split + merge)


def rand_scores(seg: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Return the foreground-restricted Rand scores {"v_rand", "split", "merge"} of two label images.

    Arganda-Carreras et al. (2015), "Crowdsourcing the creation of image
    segmentation algorithms for connectomics", Front. Neuroanat. 9:142:

        split  = V_rand_split = sum_ij p_ij^2 / sum_j t_j^2
        merge  = V_rand_merge = sum_ij p_ij^2 / sum_i s_i^2
        v_rand = 2 * split * merge / (split + merge)
               = sum_ij p_ij^2 / (0.5 * sum_i s_i^2 + 0.5 * sum_j t_j^2)

    with S = `seg` (proposal) and T = `gt`. `merge` is the probability that two
    pixels drawn at random (with replacement) lie in the same ground-truth cell
    given that they lie in the same proposal segment: it drops below 1 only
    when the proposal merges cells. `split` is the same with S and T swapped:
    it drops below 1 only when the proposal splits a cell. 1 is perfect.

    The sums run over ordered pairs including a pixel with itself (the
    challenge's "N^2 normalisation"); `skimage.metrics.adapted_rand_error`
    counts pairs of distinct pixels instead, so its numbers differ slightly.

    Foreground restriction: pixels with gt == 0 are left out; pixels with
    seg == 0 inside ground-truth cells count as one-pixel segments, so a
    proposal border running through a cell lowers `split` (not `merge`).

    Args:
        seg: (H, W) integer labels of the proposal; 0 = border.
        gt: (H, W) integer labels of the ground truth; 0 = border (ignored).
    """
    return _rand_from_counts(*_foreground_contingency(seg, gt))


def _rand_from_counts(n_ij: np.ndarray, s_i: np.ndarray, t_j: np.ndarray) -> dict[str, float]:
    """Return `rand_scores` from the contingency counts."""
    sum_p2 = np.sum(n_ij**2)  # the common 1/N^2 cancels in every ratio
    split = float(sum_p2 / np.sum(t_j**2))
    merge = float(sum_p2 / np.sum(s_i**2))
    return {"v_rand": _f_score(split, merge), "split": split, "merge": merge}


def _entropy(counts: np.ndarray) -> float:
    """Return the entropy (nats) of the distribution proportional to `counts` (all > 0)."""
    p = counts / counts.sum()
    return float(-np.sum(p * np.log(p)))


def info_scores(seg: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Return the foreground-restricted information-theoretic scores {"v_info", "split", "merge"}.

    Arganda-Carreras et al. (2015), Front. Neuroanat. 9:142, with S = `seg`
    (proposal), T = `gt` and I(S;T) = H(S) + H(T) - H(S,T):

        split  = V_info_split = I(S;T) / H(S) = 1 - H(S|T) / H(S)
        merge  = V_info_merge = I(S;T) / H(T) = 1 - H(T|S) / H(T)
        v_info = 2 * split * merge / (split + merge)

    H(S|T) is zero unless the proposal splits a cell, so `split` is 1 when
    nothing is split; H(T|S) is zero unless it merges cells. When H(S) = 0
    (a single proposal segment) H(S|T) = 0 as well and `split` is taken as 1
    (nothing can be split); likewise `merge` = 1 when H(T) = 0. The log base
    cancels in the ratios. Foreground restriction as in `rand_scores`.

    Args:
        seg: (H, W) integer labels of the proposal; 0 = border.
        gt: (H, W) integer labels of the ground truth; 0 = border (ignored).
    """
    return _info_from_counts(*_foreground_contingency(seg, gt))


def _info_from_counts(n_ij: np.ndarray, s_i: np.ndarray, t_j: np.ndarray) -> dict[str, float]:
    """Return `info_scores` from the contingency counts."""
    h_s, h_t = _entropy(s_i), _entropy(t_j)
    mutual = h_s + h_t - _entropy(n_ij)
    # clipped because round-off can put a perfect score a hair above 1
    split = 1.0 if h_s == 0 else float(np.clip(mutual / h_s, 0.0, 1.0))
    merge = 1.0 if h_t == 0 else float(np.clip(mutual / h_t, 0.0, 1.0))
    return {"v_info": _f_score(split, merge), "split": split, "merge": merge}


def _check_probability_and_label(probability: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (probability as float64, label as a bool cell mask) after checking shapes and ranges."""
    probability = np.asarray(probability, dtype=np.float64)
    label = np.asarray(label)
    if probability.ndim != 2 or probability.shape != label.shape:
        raise ValueError(f"probability and label must be 2-D of one shape, got {probability.shape}, {label.shape}")
    low, high = probability.min(), probability.max()
    if not (np.isfinite(low) and np.isfinite(high) and low >= 0.0 and high <= 1.0):
        raise ValueError(f"probability must lie in [0, 1], got values in [{low}, {high}]")
    values = np.unique(label)
    if values.min() < 0 or np.count_nonzero(values) > 1:
        raise ValueError(f"label must be binary (0 = membrane, one positive value = cell), got {values[:5]}...")
    return probability, label > 0


def challenge_scores(
    probability: np.ndarray,
    label: np.ndarray,
    thresholds: Sequence[float] = CHALLENGE_THRESHOLDS,
) -> dict:
    """Return the ISBI 2012 ranking scores V_rand and V_info (after border thinning) of a probability map.

    The challenge's evaluation (Arganda-Carreras et al. 2015; Fiji script
    "Segmentation evaluation after border thinning"), for each threshold:
    a pixel is cell where probability > threshold; the proposal's border is
    thinned to one pixel wide; cells of proposal and ground truth are the
    4-connected components (`segment_cells`); `rand_scores` and `info_scores`
    compare them. The reported score is the best over the thresholds, each
    maximised on its own. The ground truth is not thinned; its border pixels
    are left out of the scores.

    Args:
        probability: (H, W) in [0, 1]; 1 = cell interior, 0 = membrane.
        label: (H, W) binary ground truth; nonzero (255 or 1) = cell, 0 = membrane.
        thresholds: the sweep; the default 0.0, 0.1, ..., 0.9. (Fiji's script
            steps th += 0.1 while th <= 1.0, which in floating point also tries
            a last threshold just below 1.0; add it here to match exactly.)

    Returns:
        {"v_rand", "v_rand_threshold", "v_info", "v_info_threshold", "per_threshold"},
        where per_threshold maps "threshold", "v_rand", "rand_split", "rand_merge",
        "v_info", "info_split", "info_merge" to lists in sweep order (ties go to
        the first threshold).
    """
    probability, cells = _check_probability_and_label(probability, label)
    thresholds = [float(t) for t in thresholds]
    if not thresholds:
        raise ValueError("thresholds is empty")
    gt = segment_cells(cells)
    keys = ("v_rand", "rand_split", "rand_merge", "v_info", "info_split", "info_merge")
    per_threshold = {"threshold": thresholds, **{key: [] for key in keys}}
    for threshold in thresholds:
        seg = segment_cells(probability > threshold, thin_borders=True)
        counts = _foreground_contingency(seg, gt)  # shared by both scores
        rand, info = _rand_from_counts(*counts), _info_from_counts(*counts)
        values = (rand["v_rand"], rand["split"], rand["merge"], info["v_info"], info["split"], info["merge"])
        for key, value in zip(keys, values):
            per_threshold[key].append(value)
    best_rand = int(np.argmax(per_threshold["v_rand"]))
    best_info = int(np.argmax(per_threshold["v_info"]))
    return {
        "v_rand": per_threshold["v_rand"][best_rand],
        "v_rand_threshold": thresholds[best_rand],
        "v_info": per_threshold["v_info"][best_info],
        "v_info_threshold": thresholds[best_info],
        "per_threshold": per_threshold,
    }


def pixel_error(probability: np.ndarray, label: np.ndarray, threshold: float = 0.5) -> float:
    """Return the fraction (0..1) of pixels where (probability > threshold) disagrees with label != 0.

    One of the challenge's deprecated scores. Its leaderboard (and the U-Net
    paper's table) reported 1 - the maximal F-score of pixel similarity over
    thresholds, not this error at one threshold.
    """
    probability, cells = _check_probability_and_label(probability, label)
    return float(np.mean((probability > threshold) != cells))


def rand_error(probability: np.ndarray, label: np.ndarray, threshold: float = 0.5) -> float:
    """Return the classic Rand error 1 - RI (0..1) of the cell labelings at one threshold.

    RI = (a + b) / C(N, 2) (Rand 1971, J. Am. Stat. Assoc. 66:846), over all
    C(N, 2) pairs of distinct pixels of the image, where a = pairs in one
    segment in both labelings and b = pairs in different segments in both.
    Labelings: the proposal (probability > threshold) and the label are each
    cut into 4-connected cells (`segment_cells`, no thinning), and all
    membrane pixels together form one more segment, as in Fiji's
    RandError.classicRandIndex. No foreground restriction.

    One of the challenge's deprecated scores, but not the number on its
    leaderboard or in the U-Net paper's table: that "Rand error" was
    1 - the maximal F-score of the foreground-restricted Rand index over thresholds.
    """
    probability, cells = _check_probability_and_label(probability, label)
    seg = segment_cells(probability > threshold)
    gt = segment_cells(cells)
    n_ij, s_i, t_j = _contingency(seg.ravel().astype(np.int64), gt.ravel().astype(np.int64))

    def pairs(counts: np.ndarray) -> float:
        return float(np.sum(counts * (counts - 1.0)) / 2.0)

    n = float(seg.size)
    disagreements = pairs(s_i) + pairs(t_j) - 2.0 * pairs(n_ij)
    return disagreements / (n * (n - 1.0) / 2.0)


# ------------------------------------------------- label images (segment.py)

def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Return an (H, W) bool map, True where a pixel is 0 or its label differs from a nonzero 4-neighbour's.

    Both sides of a boundary between two labels are marked (a band two pixels wide; `cell_scores` thins it).
    A cell pixel beside a 0 pixel is not marked: the 0 pixels already separate it, and widening such a border
    would let thinning move it off the membrane where it meets the image edge.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (H, W), got shape {labels.shape}")
    boundary = labels == 0
    vertical = (labels[1:] != labels[:-1]) & (labels[1:] != 0) & (labels[:-1] != 0)
    horizontal = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] != 0) & (labels[:, :-1] != 0)
    boundary[1:] |= vertical
    boundary[:-1] |= vertical
    boundary[:, 1:] |= horizontal
    boundary[:, :-1] |= horizontal
    return boundary


def cell_scores(labels: np.ndarray, label: np.ndarray) -> dict:
    """Return the challenge's scores of a label image of cells, as it scores a submitted segmentation.

    The submission's border is `label_boundaries(labels)`, thinned to one pixel wide; its cells are the
    4-connected components of the rest (`segment_cells(..., thin_borders=True)`), so two segments count as
    one cell only where they are one connected region. The ground truth's cells are
    `segment_cells(label != 0)`. Scores as in `challenge_scores` at one threshold.

    Args:
        labels: (H, W) integer labels of the proposal; 0 = no cell.
        label: (H, W) binary ground truth; nonzero (255 or 1) = cell, 0 = membrane.

    Returns:
        {"v_rand", "rand_split", "rand_merge", "v_info", "info_split", "info_merge"} (0..1, 1 is perfect),
        "cells" (distinct nonzero labels in `labels`) and "true_cells" (cells of the ground truth).
    """
    labels, label = np.asarray(labels), np.asarray(label)
    if labels.ndim != 2 or labels.shape != label.shape:
        raise ValueError(f"labels and label must be 2-D of one shape, got {labels.shape}, {label.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"labels must hold integer labels, got dtype {labels.dtype}")
    values = np.unique(label)
    if values.min() < 0 or np.count_nonzero(values) > 1:
        raise ValueError(f"label must be binary (0 = membrane, one positive value = cell), got {values[:5]}...")
    seg = segment_cells(~label_boundaries(labels), thin_borders=True)
    gt = segment_cells(label != 0)
    counts = _foreground_contingency(seg, gt)  # shared by both scores
    rand, info = _rand_from_counts(*counts), _info_from_counts(*counts)
    return {
        "v_rand": rand["v_rand"], "rand_split": rand["split"], "rand_merge": rand["merge"],
        "v_info": info["v_info"], "info_split": info["split"], "info_merge": info["merge"],
        "cells": int(np.count_nonzero(np.unique(labels))), "true_cells": int(gt.max()),
    }
