"""bench/affinity_errors.py: per-offset errors and the edges behind a merge, on labels made here."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import affinities  # noqa: E402
import affinity_errors  # noqa: E402

OFFSETS = ((-1, 0), (0, -1), (-9, 0), (0, -9))


def two_cells(gap: slice | None = None) -> np.ndarray:
    """A 40x40 label: two cells side by side, a membrane column between them, optionally opened at `gap` rows."""
    label = np.ones((40, 40), np.float32)
    label[:, 19:21] = 0
    label[0, :] = label[-1, :] = label[:, 0] = label[:, -1] = 0
    if gap is not None:
        label[gap, 19:21] = 1
    return label


def test_true_affinities_have_no_error_and_a_blurred_cut_is_missed():
    label = two_cells()
    truth = affinities.label_affinities(label, OFFSETS)
    rows = affinity_errors.channel_errors(truth[np.newaxis], label[np.newaxis], OFFSETS)
    assert all(row["mae"] == 0 and row["missed_cuts"] == 0 and row["false_cuts"] == 0 for row in rows)
    assert rows[1]["cut_share"] > 0 and rows[0]["cut_share"] < rows[1]["cut_share"]  # the wall runs along y
    wrong = truth.copy()
    wrong[..., 1] = 1.0  # the model never cuts horizontally
    rows = affinity_errors.channel_errors(wrong[np.newaxis], label[np.newaxis], OFFSETS)
    assert rows[1]["missed_cuts"] == 1.0 and rows[0]["missed_cuts"] == 0


def test_a_merge_is_found_and_explained_by_the_edges_that_were_called_same_cell():
    label = two_cells()
    truth = affinities.label_affinities(label, OFFSETS)
    segments = np.ones(label.shape, np.int32)  # everything one segment: the two cells merged
    pairs = affinity_errors.merged_pairs(segments, label, min_cell=50)
    assert len(pairs) == 1
    a, b, _ = pairs[0]
    clean = affinity_errors.boundary_evidence(truth, label, (a, b), OFFSETS)
    assert clean["gap"] == 0 and clean["per_offset"][3]["cut"] == 1.0
    leaky = truth.copy()
    leaky[10:18, :, 1] = 1.0  # an 8-row hole in the wall, in the nearest horizontal channel only
    found = affinity_errors.boundary_evidence(leaky, label, (a, b), OFFSETS)
    assert 0 < found["gap"] < 0.2 and found["weakest"] == 1.0  # rows 12-15: no cut within 2 px
    assert affinity_errors.gap_mask(leaky, label, pairs)[14, 20] and not affinity_errors.gap_mask(truth, label, pairs).any()
    separate = np.where(np.arange(40)[None, :] < 20, 1, 2) * np.ones((40, 1), np.int32)
    assert affinity_errors.merged_pairs(separate, label, min_cell=50) == []
