"""scores.py: the Keras metrics' numpy twins against set oracles, and the challenge's V_rand and V_info against
scikit-image and the challenge's own definitions."""

import numpy as np
import pytest
from skimage.metrics import (
    adapted_rand_error,
    contingency_table,
    variation_of_information,
)

from scores import (
    CHALLENGE_THRESHOLDS,
    accuracy_np,
    cell_scores,
    challenge_scores,
    info_scores,
    label_boundaries,
    membrane_dice_np,
    membrane_iou_np,
    pixel_difference_np,
    pixel_error,
    rand_error,
    rand_scores,
    segment_cells,
    thin,
    uniform_prediction,
)


def test_pixel_difference_is_the_mean_absolute_difference_in_percent():
    rng = np.random.default_rng(0)
    y_true = (rng.random((3, 16, 24, 1)) > 0.5).astype("float32")
    y_pred = rng.random((3, 16, 24, 1)).astype("float32")
    assert pixel_difference_np(y_true, y_pred) == pytest.approx(100 * np.abs(y_true - y_pred).mean(), rel=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        pixel_difference_np(y_true, y_pred[:2])


def test_pixel_difference_bounds():
    ones = np.ones((2, 4, 4, 1))
    assert pixel_difference_np(ones, ones) == 0
    assert pixel_difference_np(ones, 0 * ones) == 100


def test_accuracy_counts_thresholded_agreement():
    y_true = np.array([1, 1, 0, 0])
    y_pred = np.array([0.9, 0.4, 0.2, 0.6])
    assert accuracy_np(y_true, y_pred) == 0.5


def _membrane_sets(y_true, y_pred):
    """The oracle: membrane pixels of the truth and of the prediction as sets of coordinates."""
    truth = {index for index, value in np.ndenumerate(y_true) if value == 0}
    predicted = {index for index, value in np.ndenumerate(y_pred) if value < 0.5}
    return truth, predicted


@pytest.mark.parametrize("seed", [0, 1])
def test_membrane_dice_and_iou_match_a_set_oracle(seed):
    rng = np.random.default_rng(seed)
    y_true = (rng.random((3, 12, 10, 1)) > 0.3).astype("float32")
    y_pred = rng.random((3, 12, 10, 1)).astype("float32")
    truth, predicted = _membrane_sets(y_true, y_pred)
    assert membrane_iou_np(y_true, y_pred) == pytest.approx(len(truth & predicted) / len(truth | predicted))
    assert membrane_dice_np(y_true, y_pred) == pytest.approx(2 * len(truth & predicted) / (len(truth) + len(predicted)))


def test_membrane_dice_is_zero_for_a_model_that_predicts_cell_everywhere():
    y_true = np.ones((1, 10, 10, 1))
    y_true[0, 2:4] = 0  # 20 % membrane
    everywhere_cell = np.full(y_true.shape, 0.9)
    assert accuracy_np(y_true, everywhere_cell) == pytest.approx(0.8)
    assert membrane_dice_np(y_true, everywhere_cell) == 0.0
    assert membrane_iou_np(y_true, everywhere_cell) == 0.0
    assert membrane_dice_np(y_true, 1.0 - y_true) == 0.0  # inverted
    assert membrane_dice_np(y_true, y_true) == 1.0


@pytest.mark.parametrize("probabilities, what", [
    (np.full((8, 8), 0.5), "every pixel"),
    (np.linspace(0.6, 1.0, 64).reshape(8, 8), "cell"),
    (np.linspace(0.0, 0.4, 64).reshape(8, 8), "membrane"),
])
def test_uniform_predictions_are_named(probabilities, what):
    assert what in uniform_prediction(probabilities)


def test_a_prediction_with_membranes_is_not_uniform():
    probabilities = np.ones((10, 10))
    probabilities[::5] = 0.0  # 20 % membrane
    assert uniform_prediction(probabilities) is None


def random_labels(seed, shape=(24, 30)):
    """Return (seg, gt) random label images with some 0 (border) pixels in each."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 5, shape), rng.integers(0, 7, shape)


def with_singletons(seg):
    """Return seg with each 0 pixel given a label of its own (the challenge's handling of proposal borders)."""
    seg = seg.copy()
    border = seg == 0
    seg[border] = seg.max() + 1 + np.arange(np.count_nonzero(border))
    return seg


def cell_label(shape=(60, 70)):
    """Return a binary label (255 = cell, 0 = membrane) with 3-pixel-wide membranes, one of them diagonal."""
    rows, cols = np.indices(shape)
    membrane = (np.abs(rows - 20) <= 1) | (np.abs(cols - 30) <= 1) | (np.abs(rows - cols - 15) <= 1)
    return np.where(membrane, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rand_scores_match_skimage_adapted_rand_error(seed):
    seg, gt = random_labels(seed)
    ours = rand_scores(seg, gt)
    # skimage counts pairs of distinct pixels (sum n(n-1)); the challenge counts all ordered pairs,
    # a pixel with itself included (sum n^2). Scaling skimage's own table by k leaves the challenge's
    # ratios unchanged and shrinks the self-pair term like 1/k.
    table = contingency_table(gt, with_singletons(seg), ignore_labels=[0], sparse_type="array")
    are, first, second = adapted_rand_error(table=table * 1e9)
    assert ours["v_rand"] == pytest.approx(1 - are, rel=1e-9)
    # skimage's first ("precision") divides by the ground truth's sum of squares, so it is the split
    # score; its docstring says the opposite (scikit-image issue #6485).
    assert ours["split"] == pytest.approx(first, rel=1e-9)
    assert ours["merge"] == pytest.approx(second, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_info_scores_match_skimage_conditional_entropies(seed):
    seg, gt = random_labels(seed)
    seg = with_singletons(seg)
    # skimage returns (H(seg|gt), H(gt|seg)), in that order; the plain entropies are the
    # conditional entropies given a constant labeling of the same (foreground) pixels.
    h_s_given_t, h_t_given_s = variation_of_information(gt, seg, ignore_labels=[0])
    constant = (gt != 0).astype(int)
    h_s = variation_of_information(constant, seg, ignore_labels=[0])[0]
    h_t = variation_of_information(constant, gt, ignore_labels=[0])[0]
    split, merge = 1 - h_s_given_t / h_s, 1 - h_t_given_s / h_t  # I/H(S) and I/H(T)
    ours = info_scores(seg, gt)
    assert ours["split"] == pytest.approx(split, rel=1e-9)
    assert ours["merge"] == pytest.approx(merge, rel=1e-9)
    assert ours["v_info"] == pytest.approx(2 * split * merge / (split + merge), rel=1e-9)


GT = np.array(
    [
        [1, 1, 0, 2, 2],
        [1, 1, 0, 2, 2],
        [0, 0, 0, 0, 0],
        [3, 3, 0, 4, 4],
    ]
)


def test_perfect_segmentation_scores_one():
    assert rand_scores(GT, GT) == {"v_rand": 1.0, "split": 1.0, "merge": 1.0}
    assert info_scores(GT, GT) == {"v_info": 1.0, "split": 1.0, "merge": 1.0}


def test_merging_two_cells_lowers_only_the_merge_scores():
    seg = np.where(GT == 2, 1, GT)
    for scores in (rand_scores(seg, GT), info_scores(seg, GT)):
        assert scores["split"] == pytest.approx(1.0)
        assert scores["merge"] < 1.0


def test_splitting_a_cell_lowers_only_the_split_scores():
    seg = GT.copy()
    seg[0, 3:] = 5  # cell 2 cut into two rows
    for scores in (rand_scores(seg, GT), info_scores(seg, GT)):
        assert scores["merge"] == pytest.approx(1.0)
        assert scores["split"] < 1.0


def test_scores_of_one_merge_worked_by_hand():
    gt = np.array([[1, 1, 2, 2]])
    seg = np.ones_like(gt)
    # sum p^2 = 8/16, sum t^2 = 8/16, sum s^2 = 16/16
    assert rand_scores(seg, gt) == pytest.approx({"v_rand": 2 / 3, "split": 1.0, "merge": 0.5})
    # one proposal segment: H(S) = 0 so split = 1; I = 0 so merge = 0
    assert info_scores(seg, gt) == pytest.approx({"v_info": 0.0, "split": 1.0, "merge": 0.0})


def test_ground_truth_border_is_ignored_and_proposal_border_counts_as_one_pixel_segments():
    # the proposal joins cells 1 and 2 across a ground-truth border: the border pixel is left out
    assert rand_scores(np.array([[5, 5, 5]]), np.array([[1, 0, 2]]))["merge"] == pytest.approx(0.5)
    # a proposal border pixel inside a cell is a segment of its own: a split, sum p^2 / sum t^2 = 10/16
    scores = rand_scores(np.array([[1, 1, 0, 1]]), np.array([[1, 1, 1, 1]]))
    assert scores["split"] == pytest.approx(10 / 16)
    assert scores["merge"] == pytest.approx(1.0)


def test_renumbering_labels_leaves_scores_unchanged():
    seg, gt = random_labels(3)
    rng = np.random.default_rng(4)
    new_seg = np.concatenate([[0], rng.permutation(np.arange(1, 5)) * 10 + 7])[seg]  # 0 stays border
    new_gt = np.concatenate([[0], rng.permutation(np.arange(1, 7)) + 100])[gt]
    for score in (rand_scores, info_scores):
        assert score(new_seg, new_gt) == pytest.approx(score(seg, gt), rel=1e-12)


def test_cells_are_4_connected_so_a_diagonal_one_pixel_border_separates_them():
    cells = segment_cells(~np.eye(5, dtype=bool))
    assert cells.max() == 2
    assert np.all(cells[np.eye(5, dtype=bool)] == 0)


def test_thinning_keeps_borders_that_reach_the_image_edge():
    cell_mask = np.ones((9, 12), bool)
    cell_mask[:, 5:8] = False  # a 3-pixel-wide border from the top edge to the bottom edge
    thinned = segment_cells(cell_mask, thin_borders=True)
    assert thinned.max() == 2  # not joined along the edges
    border_per_row = np.count_nonzero(thinned == 0, axis=1)
    assert np.median(border_per_row) == 1
    assert border_per_row.max() <= 2  # a corner may stay where the border meets the edge


@pytest.mark.parametrize("seed", range(6))
def test_thin_equals_skimage_thin_on_noisy_and_smooth_masks(seed):
    from scipy import ndimage
    from skimage.morphology import thin as skimage_thin

    rng = np.random.default_rng(seed)
    for _ in range(8):
        shape = tuple(int(s) for s in rng.integers(1, 90, size=2))
        noise = rng.random(shape)
        # white noise thins in a few passes; smoothed noise (an untrained network's output) needs many
        field = noise if rng.random() < 0.5 else ndimage.gaussian_filter(noise, rng.uniform(0.5, 3))
        mask = field < np.quantile(field, rng.uniform(0.05, 0.95))
        np.testing.assert_array_equal(thin(mask), skimage_thin(mask))


def test_challenge_scores_of_a_perfect_map_are_one():
    label = cell_label()
    scores = challenge_scores(label / 255.0, label)
    assert scores["v_rand"] == pytest.approx(1.0)
    assert scores["v_info"] == pytest.approx(1.0)
    assert scores["v_rand_threshold"] in CHALLENGE_THRESHOLDS
    assert scores["v_info_threshold"] in CHALLENGE_THRESHOLDS
    assert scores["per_threshold"]["threshold"] == list(CHALLENGE_THRESHOLDS)
    assert all(len(values) == len(CHALLENGE_THRESHOLDS) for values in scores["per_threshold"].values())


def test_thick_proposal_borders_cost_little_once_thinned():
    label = cell_label()
    thick_membrane = np.abs(np.indices(label.shape)[1] - 30) <= 4  # the vertical membrane, 9 wide
    probability = np.where(thick_membrane, 0.0, label / 255.0)
    scores = challenge_scores(probability, label)
    unthinned = segment_cells(probability > 0.5)  # its border pixels inside cells would count as splits
    assert scores["v_rand"] > 0.99 > rand_scores(unthinned, segment_cells(label))["v_rand"] + 0.05
    assert scores["v_info"] > 0.98 > info_scores(unthinned, segment_cells(label))["v_info"] + 0.1


def test_challenge_scores_of_a_constant_map_are_much_lower():
    label = cell_label()
    scores = challenge_scores(np.full(label.shape, 0.5), label)
    assert scores["v_rand"] < 0.5
    assert scores["v_info"] < 0.5
    assert scores["v_rand_threshold"] in CHALLENGE_THRESHOLDS


def test_challenge_scores_check_their_inputs():
    label = cell_label()
    with pytest.raises(ValueError, match="shape"):
        challenge_scores(np.zeros((4, 4)), label)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        challenge_scores(label.astype(float), label)  # 0..255, not a probability
    with pytest.raises(ValueError, match="binary"):
        challenge_scores(label / 255.0, label / 255.0 * 0.5 + 0.25)  # two positive values, no membrane


def test_pixel_error_is_the_fraction_of_wrong_pixels():
    label = np.array([[255, 0], [255, 255]], np.uint8)
    assert pixel_error(np.array([[0.9, 0.2], [0.4, 0.6]]), label) == pytest.approx(0.25)
    assert pixel_error(np.array([[0.9, 0.2], [0.5, 0.6]]), label) == pytest.approx(0.25)  # 0.5 is not > 0.5
    assert pixel_error(label / 255.0, label) == 0.0


def test_rand_error_counts_disagreeing_pixel_pairs():
    label = np.array([[1, 1, 0, 1]])  # segments {0, 1}, membrane {2}, {3}
    # the proposal puts all 4 pixels in one cell: of the 6 pairs only (0, 1) agrees
    assert rand_error(np.ones((1, 4)), label) == pytest.approx(5 / 6)
    assert rand_error(label.astype(float), label) == 0.0


# ------------------------------------------------------- label images: cell_scores

def touching_cells(label: np.ndarray) -> np.ndarray:
    """Return the cells of a binary label with every membrane pixel given to its nearest cell (touching cells)."""
    from affinities import cells_of

    return cells_of(label)


def test_label_boundaries_mark_zero_and_both_sides_of_a_change_between_cells():
    labels = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 3, 3, 3], [4, 0, 0, 4]])
    expected = np.array([[0, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], bool)  # 1 | 0 is no change
    assert np.array_equal(label_boundaries(labels), expected)
    assert not label_boundaries(np.full((3, 4), 7)).any()


@pytest.mark.parametrize("cells_of", [lambda label: segment_cells(label != 0), touching_cells])
def test_cell_scores_of_the_ground_truths_own_cells_are_one(cells_of):
    label = cell_label()
    scores = cell_scores(cells_of(label), label)
    for key in ("v_rand", "rand_split", "rand_merge", "v_info", "info_split", "info_merge"):
        assert scores[key] == pytest.approx(1.0), key
    assert scores["cells"] == scores["true_cells"] == segment_cells(label).max()


def test_cell_scores_of_merged_cells_lower_merge_only():
    label = cell_label()
    cells = touching_cells(label)
    merged = np.where(cells == 2, 1, cells)  # cells 1 and 2 touch (no membrane pixel between touching cells)
    scores = cell_scores(merged, label)
    assert scores["cells"] == scores["true_cells"] - 1
    assert scores["rand_merge"] < 1.0 and scores["info_merge"] < 1.0
    assert scores["rand_split"] == pytest.approx(1.0) and scores["info_split"] == pytest.approx(1.0)


def test_cell_scores_of_a_split_cell_lower_split_only():
    label = cell_label()
    cells = touching_cells(label).copy()
    cells[:, :12][cells[:, :12] == 1] = cells.max() + 1  # cell 1 cut in two along a column
    scores = cell_scores(cells, label)
    assert scores["cells"] == scores["true_cells"] + 1
    assert scores["rand_split"] < 1.0 and scores["info_split"] < 1.0
    assert scores["rand_merge"] == pytest.approx(1.0) and scores["info_merge"] == pytest.approx(1.0)


def blocky(seed, shape=(12, 12), block=3, values=4) -> np.ndarray:
    """Return labels 1..values constant on random blocks (so that they hold cells bigger than a pixel)."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(1, values + 1, (shape[0] // block, shape[1] // block))
    return np.kron(grid, np.ones((block, block), int))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cell_scores_match_a_brute_force_oracle_over_pixel_pairs(seed):
    from sklearn.metrics.cluster import contingency_matrix

    labels = blocky(seed)
    label = np.where(blocky(seed + 10, block=4, values=2) == 1, 255, 0).astype(np.uint8)
    label[5, :] = 0  # a membrane line through the truth
    # the proposal's cells as cell_scores takes them, border pixels as one-pixel segments
    seg = segment_cells(~label_boundaries(labels), thin_borders=True).ravel()
    seg = np.where(seg == 0, 1000 + np.arange(seg.size), seg)
    gt = segment_cells(label != 0).ravel()
    seg, gt = seg[gt != 0], gt[gt != 0]
    # every ordered pair of foreground pixels, a pixel with itself included
    same_seg, same_gt = seg[:, None] == seg[None, :], gt[:, None] == gt[None, :]
    split = np.sum(same_seg & same_gt) / np.sum(same_gt)
    merge = np.sum(same_seg & same_gt) / np.sum(same_seg)
    # entropies from an independent contingency table
    p = contingency_matrix(seg, gt).astype(float) / seg.size

    def entropy(q):
        q = q[q > 0]
        return -np.sum(q * np.log(q))

    h_s, h_t, h_st = entropy(p.sum(axis=1)), entropy(p.sum(axis=0)), entropy(p.ravel())
    info_split = 1.0 if h_s == 0 else (h_s + h_t - h_st) / h_s
    info_merge = 1.0 if h_t == 0 else (h_s + h_t - h_st) / h_t
    scores = cell_scores(labels, label)
    assert scores["rand_split"] == pytest.approx(split, rel=1e-12)
    assert scores["rand_merge"] == pytest.approx(merge, rel=1e-12)
    assert scores["v_rand"] == pytest.approx(2 * split * merge / (split + merge), rel=1e-12)
    assert scores["info_split"] == pytest.approx(info_split, rel=1e-9, abs=1e-12)
    assert scores["info_merge"] == pytest.approx(info_merge, rel=1e-9, abs=1e-12)
    assert scores["cells"] == len(np.unique(labels))


def test_cell_scores_check_their_inputs():
    label = cell_label()
    with pytest.raises(ValueError, match="shape"):
        cell_scores(np.zeros((4, 4), int), label)
    with pytest.raises(ValueError, match="integer"):
        cell_scores(label / 255.0, label)
    with pytest.raises(ValueError, match="binary"):
        cell_scores(segment_cells(label), segment_cells(label))


def test_a_map_with_a_flat_side_is_named_and_a_saturated_map_is_not():
    from scores import flat_side

    rng = np.random.default_rng(0)
    healthy = rng.uniform(0, 1, (64, 64)).astype(np.float32)
    healthy[:8] = 0.0  # saturated membranes: many pixels at exactly 0 are what training aims for
    assert flat_side(healthy) is None
    collapsed = healthy.copy()
    collapsed[collapsed < 0.427] = np.float32(0.427)  # both head filters silent on membranes: sigmoid(bias)
    assert "membrane side is flat" in flat_side(collapsed) and "0.427" in flat_side(collapsed)
    capped = np.minimum(healthy, np.float32(0.88))
    assert "cell side is flat" in flat_side(capped)
