"""augment.py: the random transforms move image, label and weights together (elastic deformation as in the
U-Net paper, section 3.1, composed with the affine one), and the batches are a function of seed, epoch and index."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

import augment
import data

ELASTIC = augment.Augmentation(elastic_grid=3, elastic_sigma=10.0)
ELASTIC_ONLY = dataclasses.replace(augment.Augmentation.none(), elastic_grid=3, elastic_sigma=10.0)


def blobs(size=128, seed=0):
    """Return a binary image of large random blobs, so that misalignment shows."""
    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.random((size, size)), 6) > 0.5).astype(np.float32)


def measured_displacement(aug, seed, size=128):
    """Return the (2, size, size) displacement `aug` applies, read off deformed coordinate ramps."""
    rows, cols = np.mgrid[:size, :size].astype(np.float32)
    moved_rows, _ = augment.augment_pair(rows, rows, aug, np.random.default_rng(seed))
    moved_cols, _ = augment.augment_pair(cols, cols, aug, np.random.default_rng(seed))
    return np.stack([moved_rows - rows, moved_cols - cols])


def test_elastic_is_off_by_default():
    aug = augment.Augmentation()
    assert aug.elastic_grid == 0 and aug.elastic_sigma == 10.0
    assert not aug.elastic and not augment.Augmentation.none().elastic


@pytest.mark.parametrize(
    "grid, sigma, message",
    [(1, 10.0, "elastic_grid .* got 1"), (-1, 10.0, "elastic_grid .* got -1"), (3, -1.0, "elastic_sigma .* got -1.0")],
)
def test_bad_elastic_settings_are_refused_showing_the_value(grid, sigma, message):
    with pytest.raises(ValueError, match=message):
        augment.Augmentation(elastic_grid=grid, elastic_sigma=sigma)


@pytest.mark.parametrize("aug", [ELASTIC, augment.Augmentation(40, 0.2, 0.2, 10, 0.2, True, True, True, 3, 10.0)])
def test_elastic_deformation_moves_image_and_label_together_and_keeps_label_binary(aug):
    label = blobs()
    image = label.copy()  # an image that *is* its label: after the transform they must still agree
    for seed in range(5):
        new_image, new_label = augment.augment_pair(image, label, aug, np.random.default_rng(seed), crop=96)
        assert new_image.shape == new_label.shape == (96, 96)
        assert set(np.unique(new_label)) <= {0.0, 1.0}
        assert np.mean((new_image > 0.5) == (new_label > 0.5)) > 0.97


def test_elastic_deformation_moves_pixels_by_about_sigma():
    label = blobs()
    for seed in range(3):
        still, _ = augment.augment_pair(label, label, augment.Augmentation.none(), np.random.default_rng(seed))
        bent, _ = augment.augment_pair(label, label, ELASTIC_ONLY, np.random.default_rng(seed))
        assert np.mean((still > 0.5) == (bent > 0.5)) < 0.95
    # Away from the borders (where 'nearest' filling clamps the ramps) the ramps show the field itself.
    inner = np.s_[:, 30:-30, 30:-30]
    magnitudes = [np.hypot(*measured_displacement(ELASTIC_ONLY, seed)[inner]).mean() for seed in range(8)]
    assert 0.5 * 10.0 < np.mean(magnitudes) < 2 * 10.0


def test_elastic_displacement_is_smooth():
    field = measured_displacement(ELASTIC_ONLY, seed=0)[:, 30:-30, 30:-30]
    # Neighbouring pixels move almost alike: a 3x3 grid over 128 pixels bends gently.
    assert np.abs(np.diff(field, axis=1)).max() < 1.0
    assert np.abs(np.diff(field, axis=2)).max() < 1.0


def test_zero_sigma_equals_no_deformation():
    label = blobs()
    for base in (augment.Augmentation(), augment.Augmentation(40, 0.2, 0.2, 10, 0.2, True, True, True)):
        flat = dataclasses.replace(base, elastic_grid=3, elastic_sigma=0.0)
        expected = augment.augment_pair(label, label, base, np.random.default_rng(4), crop=96)
        got = augment.augment_pair(label, label, flat, np.random.default_rng(4), crop=96)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


def test_one_pass_resampling_with_zero_displacement_equals_the_affine_path():
    # The elastic path (map_coordinates) uses the same coordinates as affine_transform.
    label = blobs()
    image = ndimage.gaussian_filter(np.random.default_rng(0).random((128, 128)), 2).astype(np.float32)
    aug = augment.Augmentation(40, 0.2, 0.2, 10, 0.2, True, True)
    matrix = augment.random_affine(label.shape, aug, np.random.default_rng(3)) @ np.array(
        [[1, 0, 7], [0, 1, 11], [0, 0, 1]]
    )
    affine = augment._resample(((image, 1), (label, 0)), matrix, (96, 96))
    one_pass = augment._resample(((image, 1), (label, 0)), matrix, (96, 96), np.zeros((2, 96, 96)))
    np.testing.assert_allclose(one_pass[0], affine[0], atol=1e-5)
    np.testing.assert_array_equal(one_pass[1], affine[1])


@pytest.mark.parametrize("size, grid", [(101, 2), (101, 3), (101, 5), (96, 3), (7, 4)])
def test_interpolation_matrix_hits_the_grid_points_and_is_a_partition_of_unity(size, grid):
    weights = augment._interpolation_matrix(size, grid)
    assert weights.shape == (size, grid)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    positions = np.linspace(0, size - 1, grid)
    # A linear ramp on the grid stays a ramp on the pixels (no wobble between grid points).
    np.testing.assert_allclose(weights @ positions, np.arange(size), atol=1e-9)
    on_grid = np.isclose(positions, np.round(positions))
    np.testing.assert_allclose(weights[np.round(positions[on_grid]).astype(int)], np.eye(grid)[on_grid], atol=1e-12)
    assert not weights.flags.writeable  # shared through the cache


def test_interpolation_matrix_is_smooth():
    weights = augment._interpolation_matrix(512, 3)
    steps = np.diff(weights, axis=0)
    assert np.abs(steps).max() < 8 / 512  # no jumps
    assert np.abs(np.diff(steps, axis=0)).max() < 20 / 512**2  # no kinks


def test_elastic_deformation_is_deterministic_for_a_seed():
    label = blobs()
    aug = augment.Augmentation(elastic_grid=3)
    first = augment.augment_pair(label, label, aug, np.random.default_rng(9), crop=96)
    again = augment.augment_pair(label, label, aug, np.random.default_rng(9), crop=96)
    other = augment.augment_pair(label, label, aug, np.random.default_rng(10), crop=96)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("aug", [augment.Augmentation(), augment.Augmentation(40, 0.2, 0.2, 10, 0.2, True, True, True)])
def test_augmentation_moves_image_and_label_together_and_keeps_label_binary(aug):
    label = blobs()
    image = label.copy()  # an image that *is* its label: after the transform they must still agree
    agreements = []
    for seed in range(5):
        new_image, new_label = augment.augment_pair(image, label, aug, np.random.default_rng(seed), crop=96)
        assert new_image.shape == new_label.shape == (96, 96)
        assert set(np.unique(new_label)) <= {0.0, 1.0}
        agreements.append(np.mean((new_image > 0.5) == (new_label > 0.5)))
    assert min(agreements) > 0.97


def test_independent_transforms_would_misalign():
    # The check above can fail: transforms drawn separately disagree much more.
    label = blobs()
    aug = augment.Augmentation(40, 0.2, 0.2, 10, 0.2, True, True, True)
    a, _ = augment.augment_pair(label, label, aug, np.random.default_rng(1), crop=96)
    _, b = augment.augment_pair(label, label, aug, np.random.default_rng(2), crop=96)
    assert np.mean((a > 0.5) == (b > 0.5)) < 0.9


def test_no_augmentation_is_identity():
    label = blobs(64)
    image, new_label = augment.augment_pair(label, label, augment.Augmentation.none(), np.random.default_rng(0))
    np.testing.assert_allclose(image, label, atol=1e-6)
    np.testing.assert_array_equal(new_label, label)


def test_batches_are_float32_nhwc_binary_and_reproducible(synthetic_stacks):
    images, labels = synthetic_stacks
    x = data.add_channel(data.normalize_images(images))
    y = data.add_channel(data.binarize_labels(labels))
    batches = augment.AugmentedBatches(x, y, batch_size=3, steps_per_epoch=7, crop=32, seed=5)
    assert batches.num_batches is None  # endless: Keras keeps one iterator for the whole fit
    bx, by = batches[2]
    assert bx.shape == by.shape == (3, 32, 32, 1)
    assert bx.dtype == by.dtype == np.float32
    assert set(np.unique(by)) <= {0.0, 1.0}
    again = augment.AugmentedBatches(x, y, batch_size=3, steps_per_epoch=7, crop=32, seed=5)
    np.testing.assert_array_equal(again[2][0], bx)
    assert not np.array_equal(batches[2 + 7][0], bx)  # the next epoch's third step draws new transforms
    resumed = augment.AugmentedBatches(x, y, batch_size=3, steps_per_epoch=7, crop=32, seed=5, first_step=9)
    np.testing.assert_array_equal(resumed[0][0], batches[9][0])  # a resumed run sees the same batches


@pytest.mark.parametrize("aug", [augment.Augmentation(40, 0.2, 0.2, 10, 0.2, True, True, True, elastic_grid=3,
                                                      elastic_sigma=5)])
def test_neighbouring_sections_move_with_the_page_under_one_transform(aug):
    rng = np.random.default_rng(3)
    image = rng.random((64, 64)).astype(np.float32)
    label = (image > 0.5).astype(np.float32)
    moved, moved_label = augment.augment_pair(np.stack([image, image, 1 - image], -1), label, aug,
                                              np.random.default_rng(7), crop=32)
    alone, alone_label = augment.augment_pair(image, label, aug, np.random.default_rng(7), crop=32)
    assert moved.shape == (32, 32, 3)
    np.testing.assert_allclose(moved[..., 0], alone, atol=1e-6)
    np.testing.assert_allclose(moved[..., 2], 1 - alone, atol=1e-5)
    np.testing.assert_array_equal(moved_label, alone_label)


def test_data_workers_start_from_a_fork_server_not_as_forks_of_the_training_process():
    import multiprocessing
    import os

    from keras.src.trainers.data_adapters import py_dataset_adapter

    with augment.workers_from_a_fork_server():
        pool = py_dataset_adapter.get_pool_class(True)(1)
        try:
            assert pool.apply(os.getppid) != os.getpid()  # a forked worker's parent is this process
        finally:
            pool.terminate()
    assert py_dataset_adapter.get_pool_class(True) is multiprocessing.Pool  # only while training


INTENSITY = dataclasses.replace(augment.Augmentation.none(), contrast=0.3, brightness=0.1, blur=1.5, noise=0.05)


def test_intensity_changes_are_off_by_default_and_leave_the_image_alone():
    assert not augment.Augmentation().intensity
    image = blobs() * 0.6 + 0.2
    moved, _ = augment.augment_pair(image, blobs(), augment.Augmentation.none(), np.random.default_rng(0))
    np.testing.assert_array_equal(moved, image)


def test_intensity_changes_touch_the_image_in_range_and_never_the_label():
    image, label = blobs() * 0.6 + 0.2, blobs(seed=1)
    changed = []
    for seed in range(8):
        moved, moved_label = augment.augment_pair(image, label, INTENSITY, np.random.default_rng(seed))
        np.testing.assert_array_equal(moved_label, label)
        assert moved.dtype == np.float32 and 0.0 <= moved.min() and moved.max() <= 1.0
        changed.append(np.abs(moved - image).mean())
    assert min(changed) > 0.005  # every draw changes the image


@pytest.mark.parametrize("field, value", [("contrast", 0.5), ("brightness", 0.2), ("blur", 2.0), ("noise", 0.1)])
def test_each_intensity_change_does_what_it_says(field, value):
    image = blobs() * 0.5 + 0.25
    aug = dataclasses.replace(augment.Augmentation.none(), **{field: value})
    moved = [augment.random_intensity(image, aug, np.random.default_rng(seed)) for seed in range(20)]
    stds, means = [m.std() / image.std() for m in moved], [m.mean() - image.mean() for m in moved]
    sharpness = [(np.diff(m, axis=0) ** 2).mean() / (np.diff(image, axis=0) ** 2).mean() for m in moved]  # energy
    if field == "contrast":  # scaled about the mean: the spread changes, the mean does not
        assert max(stds) > 1.2 and min(stds) < 0.8 and max(np.abs(means)) < 1e-5
    elif field == "brightness":  # a shift: the mean moves, the spread does not
        assert max(means) > 0.1 and min(means) < -0.1 and np.allclose(stds, 1.0, atol=1e-5)
    elif field == "blur":  # edges soften, the mean stays
        assert min(sharpness) < 0.6 and max(sharpness) <= 1.0 + 1e-6 and max(np.abs(means)) < 1e-3
    else:  # noise: neighbouring pixels differ more
        assert max(sharpness) > 2.0


def test_intensity_changes_the_neighbouring_sections_together():
    image = np.stack([blobs() * 0.5 + 0.25] * 3, axis=-1)
    moved = augment.random_intensity(image, dataclasses.replace(INTENSITY, noise=0.0), np.random.default_rng(3))
    np.testing.assert_allclose(moved[..., 0], moved[..., 2])
    assert not np.allclose(moved[..., 0], image[..., 0])


@pytest.mark.parametrize("field, value", [("contrast", -0.1), ("contrast", 1.0), ("blur", -1.0), ("noise", float("nan"))])
def test_bad_intensity_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        augment.Augmentation(**{field: value})
