"""Affinity targets, offsets, and how a flip or turn moves them."""

import numpy as np
import pytest

import affinities
import tiling


def test_affinity_targets_of_a_small_label_equal_the_hand_worked_array():
    # two cells side by side, the boundary between columns 2 and 3
    cells = np.array([[1, 1, 1, 2]] * 3)
    affs = affinities.affinities_of(cells, ((-1, 0), (0, -1), (0, -3)))
    up = np.ones((3, 4))  # rows never change cell; row 0 compares with itself (clamped at the edge)
    left = np.array([[1, 1, 1, 0]] * 3)  # only column 3 looks left across the boundary
    far_left = np.array([[1, 1, 1, 0]] * 3)  # column 3 - 3 = column 0 (cell 1); columns 0..2 clamp to column 0
    assert affs.shape == (3, 4, 3) and affs.dtype == np.float32
    np.testing.assert_array_equal(affs[..., 0], up)
    np.testing.assert_array_equal(affs[..., 1], left)
    np.testing.assert_array_equal(affs[..., 2], far_left)


def test_membrane_pixels_go_to_the_nearest_cell():
    label = np.ones((5, 9))
    label[:, 3:6] = 0  # a three-pixel membrane: its left column to the left cell, its right one to the right
    cells = affinities.cells_of(label)
    assert set(np.unique(cells)) == {1, 2}
    assert (cells[:, :4] == cells[0, 0]).all() and (cells[:, 5:] == cells[0, -1]).all()


def test_a_label_with_no_cells_is_one_region():
    assert (affinities.label_affinities(np.zeros((4, 4))) == 1).all()


def test_offsets_parse_from_distances_and_bad_ones_are_refused():
    assert affinities.parse_offsets("1,3") == ((-1, 0), (0, -1), (-3, 0), (0, -3))
    for bad in ("", "3,9", "1,x", "1,1", "1,-3"):
        with pytest.raises(ValueError):
            affinities.parse_offsets(bad)
    with pytest.raises(ValueError, match="nearest neighbours"):
        affinities.check_offsets([(0, -1), (-1, 0)])
    with pytest.raises(ValueError, match="8 channels but 4 offsets"):
        affinities.offsets_for(8, affinities.parse_offsets("1,3"))
    assert affinities.offsets_for(8) == affinities.OFFSETS
    field = affinities.parse_offsets("field")
    assert len(field) == 12 and field[:2] == ((-1, 0), (0, -1)) and (-3, 0) not in field
    assert {max(abs(dy), abs(dx)) for dy, dx in field[2:]} == {9, 27}  # repulsive only beyond the neighbours


@pytest.mark.parametrize("offsets", [affinities.OFFSETS, affinities.FIELD_OFFSETS])
def test_each_flip_or_turn_of_exact_affinities_maps_back_to_them(offsets):
    rng = np.random.default_rng(0)
    label = np.ones((40, 36))
    label[rng.integers(0, 40, 6), :] = 0
    label[:, rng.integers(0, 36, 5)] = 0
    cells = affinities.cells_of(label)
    exact = affinities.affinities_of(cells, offsets)[np.newaxis]
    seen_everywhere = np.zeros(exact.shape, np.float32)
    for k in range(8):
        moved_cells = tiling._dihedral(cells[np.newaxis, ..., np.newaxis], k)[0, ..., 0]
        answer = tiling._undo_dihedral(affinities.affinities_of(moved_cells, offsets)[np.newaxis], k)  # perfect
        back, weight = affinities.undo_moved_affinities(answer, k, offsets)
        np.testing.assert_array_equal(back * weight, exact * weight)
        seen_everywhere += weight
    assert seen_everywhere.min() >= 1  # every channel at every pixel answered by some view (the unmoved one)


def test_tta_of_exact_affinities_returns_them_unchanged():
    label = np.ones((64, 64))
    label[20:22, :] = 0
    label[:, 40:42] = 0  # even widths: a membrane's middle is not a tie between its two cells
    label[45:, 10:12] = 0
    cells = affinities.cells_of(label)

    def perfect_network(tiles):  # tiles of the label image itself stand in for the EM image
        return np.stack([affinities.affinities_of(affinities.cells_of(tile[..., 0] > 0.5)) for tile in tiles])

    image = (label * 255).astype(np.uint8)
    plain = tiling.predict_image(perfect_network, image, tiling=tiling.TileSettings(64, 0))
    tta = tiling.predict_image(perfect_network, image, tiling=tiling.TileSettings(64, 0, tta=True))
    np.testing.assert_array_equal(plain, affinities.affinities_of(cells))
    np.testing.assert_allclose(tta, plain, atol=1e-6)


def test_the_cell_map_of_affinities_marks_both_sides_of_every_cut():
    cells = np.array([[1, 1, 2, 2],
                      [1, 1, 2, 2],
                      [3, 3, 3, 3]])
    cell_map = affinities.cell_map(affinities.affinities_of(cells))
    np.testing.assert_array_equal(cell_map, [[1, 0, 0, 1],
                                             [0, 0, 0, 0],
                                             [0, 0, 0, 0]])
    stacked = affinities.cell_map(np.stack([affinities.affinities_of(cells)] * 2))
    np.testing.assert_array_equal(stacked[1], cell_map)


@pytest.mark.parametrize("page, offsets", [(5, affinities.OFFSETS), (15, affinities.OFFSETS),
                                           (25, affinities.OFFSETS), (20, affinities.FIELD_OFFSETS)])
def test_true_affinities_of_a_validation_page_cut_by_the_mutex_watershed_give_back_its_cells(isbi_dir, page, offsets):
    import data
    import scores
    import segment

    _, raw_labels = data.load_isbi(isbi_dir)
    label = data.binarize_labels(raw_labels)[page]
    cells = segment.segment(affinities.label_affinities(label, offsets), "mws", offsets=offsets)
    assert scores.cell_scores(cells, label)["v_rand"] >= 0.99


def test_the_training_targets_mask_exactly_the_pairs_that_leave_the_crop():
    label = np.ones((20, 30))
    label[:, 14] = 0  # two cells, a membrane at column 14
    offsets = ((-1, 0), (0, -1), (-9, 0), (4, -9))
    targets = affinities.label_targets(label, offsets)
    assert targets.shape == (20, 30, 8) and targets.dtype == np.float32
    np.testing.assert_array_equal(targets[..., :4], affinities.label_affinities(label, offsets))
    rows, cols = np.mgrid[:20, :30]
    for c, (dy, dx) in enumerate(offsets):
        partner_inside = (rows + dy >= 0) & (rows + dy < 20) & (cols + dx >= 0) & (cols + dx < 30)
        np.testing.assert_array_equal(targets[..., 4 + c], partner_inside)
