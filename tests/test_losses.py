"""losses.py: each loss against its numpy twin and an independent oracle, border weights as in the U-Net paper."""

import numpy as np
import pytest
from scipy import ndimage

import losses
from losses import (
    bce_dice_l1_loss,
    bce_dice_l1_loss_np,
    bce_dice_loss,
    bce_dice_loss_np,
    border_weight_map,
    dice_loss,
    dice_loss_np,
    get_loss,
    needs_weight_map,
    weighted_binary_crossentropy_np,
)


@pytest.fixture
def two_cells():
    """Return an 80x80 label: two 70x34 cells (columns 5..38 and 41..74) with a 2-pixel membrane gap between."""
    label = np.zeros((80, 80), np.float32)
    label[5:75, 5:39] = 1
    label[5:75, 41:75] = 1
    return label


def border_term(d1, d2, w0=10.0, sigma=5.0):
    return w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))


def random_targets(rng, batch, channels=2, shape=(16, 24)):
    label = (rng.random((batch, *shape, 1)) > 0.3).astype("float32")
    weights = rng.uniform(0.5, 12.0, (batch, *shape, 1)).astype("float32")
    y_true = np.concatenate([label, weights], axis=-1) if channels == 2 else label
    y_pred = rng.uniform(0.01, 0.99, (batch, *shape, 1)).astype("float32")
    return y_true, y_pred


# ---------------------------------------------------------------- weight map

def test_weight_map_matches_hand_computed_points_of_formula(two_cells):
    w = border_weight_map(two_cells, balance=False)
    # In the gap, next to the left cell: 1 pixel to it, 2 to the right one.
    assert w[40, 39] == pytest.approx(1 + border_term(1, 2), rel=1e-6)
    # Above the gap, 3 rows above the cells: sqrt(3^2 + 1^2) and sqrt(3^2 + 2^2).
    assert w[2, 39] == pytest.approx(1 + border_term(np.sqrt(10), np.sqrt(13)), rel=1e-6)
    # In the outer membrane beside the left cell: 3 pixels to it, 38 to the right one.
    assert w[40, 2] == pytest.approx(1 + border_term(3, 38), rel=1e-5)


def test_weight_map_decays_with_distance_from_the_gap(two_cells):
    w = border_weight_map(two_cells, balance=False)
    above_gap = w[4::-1, 39]  # membrane from the cells' top edge upwards
    assert np.all(np.diff(above_gap) < 0)


def test_weight_map_peaks_about_w_c_plus_w0_on_thin_membrane_and_is_w_c_inside_big_cells(two_cells):
    w = border_weight_map(two_cells)
    w_c = losses.class_balance_weights(two_cells)
    membrane = two_cells == 0
    f_membrane = membrane.mean()
    assert w_c[membrane][0] == pytest.approx((1 - f_membrane) / f_membrane)  # inverse frequency, cells at 1
    assert np.all(w_c[~membrane] == 1)
    row, col = np.unravel_index(np.argmax(w), w.shape)
    assert col in (39, 40) and membrane[row, col]
    assert w.max() == pytest.approx(w_c[row, col] + border_term(1, 2), rel=1e-6)
    assert w.max() > w_c[row, col] + 0.8 * 10
    # 31 pixels from the other cell: the border term is below 1e-7.
    assert w[40, 10] == pytest.approx(1.0, abs=1e-6)


def test_weight_map_with_one_pixel_gap_reaches_most_of_w0():
    label = np.ones((32, 32), np.float32)
    label[:, 16] = 0
    w = border_weight_map(label, balance=False)
    assert np.allclose(w[:, 16], 1 + border_term(1, 1))


@pytest.mark.parametrize("case", ["random", "all_cell", "all_membrane", "one_cell"])
def test_weight_map_is_finite_and_at_least_one(case):
    rng = np.random.default_rng(0)
    label = {
        "random": ndimage.gaussian_filter(rng.random((48, 64)), 2) > 0.5,
        "all_cell": np.ones((48, 64)),
        "all_membrane": np.zeros((48, 64)),
        "one_cell": np.pad(np.ones((40, 56)), 4),
    }[case]
    w = border_weight_map(label)
    assert w.dtype == np.float32 and w.shape == label.shape
    assert np.all(np.isfinite(w)) and w.min() >= 1.0
    if case != "random":  # fewer than two cells: no border term
        assert np.allclose(w, losses.class_balance_weights(label))


def test_windowed_distances_equal_full_image_distances_within_cutoff():
    rng = np.random.default_rng(1)
    cells, n = ndimage.label(ndimage.gaussian_filter(rng.random((64, 96)), 1.5) > 0.5)
    assert n >= 5
    full = np.stack([ndimage.distance_transform_edt(cells != i) for i in range(1, n + 1)])
    expected = np.partition(full, 1, axis=0)[:2]
    d1, d2 = losses.nearest_two_cell_distances(cells, cutoff=12.0)
    assert np.allclose(d1, expected[0])  # d1 <= the cutoff everywhere in this image
    exact = expected[1] <= 12.0
    assert np.allclose(d2[exact], expected[1][exact])
    assert np.all(d2[~exact] > 12.0)


def test_weight_map_of_real_page_is_finite_and_bounded(isbi_dir):
    import data
    import files

    label = files.read_stack(isbi_dir / data.LABELS_FILE)[0]
    w = border_weight_map(label)
    assert np.all(np.isfinite(w))
    assert 1.0 <= w.min() and w.max() <= losses.class_balance_weights(label).max() + 10.0


# ---------------------------------------------------------------- Keras losses and their numpy twins

@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(
    "fn, twin, channels",
    [
        (dice_loss, dice_loss_np, 1),
        (dice_loss, dice_loss_np, 2),
        (bce_dice_loss, bce_dice_loss_np, 1),
        (bce_dice_loss, bce_dice_loss_np, 2),
        (bce_dice_l1_loss, bce_dice_l1_loss_np, 1),
        (bce_dice_l1_loss, bce_dice_l1_loss_np, 2),
    ],
)
def test_keras_losses_equal_their_numpy_twins_per_sample(fn, twin, channels, batch):
    y_true, y_pred = random_targets(np.random.default_rng(batch), batch, channels)
    got = np.asarray(fn(y_true, y_pred))
    assert got.shape == (batch,)
    np.testing.assert_allclose(got, twin(y_true, y_pred), rtol=1e-5)


def test_keras_sample_weighted_bce_equals_the_weighted_numpy_twin():

    from model import build_unet

    rng = np.random.default_rng(0)
    x = rng.random((3, 32, 32, 1)).astype("float32")
    y = (rng.random((3, 32, 32, 1)) > 0.5).astype("float32")
    w = rng.uniform(1, 10, (3, 32, 32)).astype("float32")
    model = build_unet((None, None, 1), filters=2)
    model.compile(loss=get_loss("weighted_bce"))
    keras_loss = model.evaluate(x, y, sample_weight=w, batch_size=3, verbose=0)
    twin = weighted_binary_crossentropy_np(y, model.predict_on_batch(x), w)
    np.testing.assert_allclose(keras_loss, twin.mean(), rtol=1e-4)


def test_losses_compute_in_float32_for_bfloat16_predictions():
    from keras import ops

    y_true, y_pred = random_targets(np.random.default_rng(0), 2)
    for fn in (dice_loss, bce_dice_loss, bce_dice_l1_loss):
        value = fn(y_true, ops.cast(y_pred, "bfloat16"))
        assert ops.dtype(value) == "float32"
        np.testing.assert_allclose(np.asarray(value), np.asarray(fn(y_true, y_pred)), rtol=2e-2)


def test_l1_term_adds_the_pixel_difference_as_a_fraction():
    from scores import pixel_difference_np

    y_true, y_pred = random_targets(np.random.default_rng(3), 1, channels=1)
    extra = float(bce_dice_l1_loss(y_true, y_pred)[0] - bce_dice_loss(y_true, y_pred)[0])
    assert extra == pytest.approx(pixel_difference_np(y_true, y_pred) / 100, rel=1e-5)


def test_dice_is_zero_for_perfect_and_near_one_for_inverted_prediction():
    y_true, _ = random_targets(np.random.default_rng(0), 2, channels=1, shape=(32, 32))
    np.testing.assert_allclose(np.asarray(dice_loss(y_true, y_true)), 0.0, atol=1e-6)
    assert np.all(np.asarray(dice_loss(y_true, 1.0 - y_true)) > 0.99)
    no_membrane = np.ones((1, 8, 8, 1), np.float32)
    assert float(dice_loss(no_membrane, no_membrane)[0]) == pytest.approx(0.0)


# ---------------------------------------------------------------- choosing by name

def test_get_loss_rejects_unknown_names_listing_the_known_ones():
    with pytest.raises(ValueError, match="'focal'.*binary_crossentropy, weighted_bce, dice, bce_dice"):
        get_loss("focal")
    with pytest.raises(ValueError, match="unknown loss"):
        needs_weight_map("focal")


def test_only_weighted_bce_needs_a_weight_map():
    assert [name for name in losses.LOSSES if needs_weight_map(name)] == ["weighted_bce"]
    assert get_loss("binary_crossentropy") == "binary_crossentropy"


@pytest.mark.parametrize("name", list(losses.LOSSES))
def test_tiny_unet_trains_one_step_with_each_loss(name):
    import keras

    from model import build_unet

    rng = np.random.default_rng(0)
    x = rng.random((2, 64, 64, 1)).astype("float32")
    label = np.stack([ndimage.gaussian_filter(rng.random((64, 64)), 2) > 0.5 for _ in range(2)]).astype("float32")
    weights = np.stack([border_weight_map(page) for page in label]) if needs_weight_map(name) else None
    model = build_unet((None, None, 1), filters=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=get_loss(name))
    loss = model.train_on_batch(x, label[..., np.newaxis], sample_weight=weights)
    assert np.isfinite(loss)


def test_model_compiled_with_dice_saves_and_loads_with_custom_objects(tmp_path):
    import keras

    from model import build_unet

    model = build_unet((None, None, 1), filters=2)
    model.compile(optimizer="adam", loss=get_loss("bce_dice"))
    x = np.zeros((1, 32, 32, 1), "float32")
    y_true, _ = random_targets(np.random.default_rng(0), 1, channels=1, shape=(32, 32))
    model.train_on_batch(x, y_true)  # builds the optimizer, so that it is saved too
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, custom_objects=losses.CUSTOM_OBJECTS)
    assert loaded.loss is losses.bce_dice_loss
    assert np.isfinite(loaded.train_on_batch(x, y_true))


@pytest.mark.parametrize("fn, twin", [(dice_loss, dice_loss_np), (bce_dice_loss, bce_dice_loss_np)])
def test_affinity_losses_average_the_per_channel_losses(fn, twin):
    rng = np.random.default_rng(7)
    y_true = (rng.random((2, 16, 24, 8)) > 0.2).astype("float32")
    y_pred = rng.uniform(0.01, 0.99, (2, 16, 24, 8)).astype("float32")
    got = np.asarray(fn(y_true, y_pred))
    np.testing.assert_allclose(got, twin(y_true, y_pred), rtol=1e-5)
    per_channel = [twin(y_true[..., c : c + 1], y_pred[..., c : c + 1]) for c in range(8)]
    if fn is dice_loss:  # the Dice of each channel on its own, averaged; the cross-entropy is a plain mean anyway
        np.testing.assert_allclose(got, np.mean(per_channel, axis=0), rtol=1e-5)


@pytest.mark.parametrize("fn, twin", [(dice_loss, dice_loss_np), (bce_dice_loss, bce_dice_loss_np),
                                      (losses.bce_loss, losses.bce_loss_np)])
def test_pairs_outside_the_mask_change_no_loss(fn, twin):
    rng = np.random.default_rng(3)
    targets = (rng.random((2, 16, 24, 4)) > 0.2).astype("float32")
    mask = (rng.random((2, 16, 24, 4)) > 0.3).astype("float32")
    y_true = np.concatenate([targets, mask], axis=-1)
    y_pred = rng.uniform(0.01, 0.99, (2, 16, 24, 4)).astype("float32")
    got = np.asarray(fn(y_true, y_pred))
    np.testing.assert_allclose(got, twin(y_true, y_pred), rtol=1e-5)
    scrambled = np.where(mask > 0, y_pred, rng.uniform(0.01, 0.99, y_pred.shape)).astype("float32")
    np.testing.assert_allclose(np.asarray(fn(y_true, scrambled)), got, rtol=1e-5)
    assert not np.allclose(np.asarray(fn(targets, scrambled)), np.asarray(fn(targets, y_pred)))  # unmasked: it does


def test_keras_cross_entropy_becomes_the_masked_one_for_targets_with_a_mask():
    assert get_loss("binary_crossentropy") == "binary_crossentropy"
    assert get_loss("binary_crossentropy", pair_mask=True) is losses.bce_loss
    assert get_loss("dice", pair_mask=True) is dice_loss
