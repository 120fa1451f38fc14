"""tiling.py: tiles cover every pixel with the overlap asked for, blend without seams, and give the whole-image
prediction for any size, with or without test-time augmentation."""

import keras
import numpy as np
import pytest
from conftest import picture

import data
import files
import runtimes
import tiling
from model import build_unet
from tiling import TileSettings


@pytest.fixture(scope="module")
def pointwise_model():
    """A model of one 1x1 convolution: each output pixel depends on its own input pixel only."""
    model = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(1, 1, activation="sigmoid")])
    model.set_weights([np.full((1, 1, 1, 1), 4.0, np.float32), np.array([-2.0], np.float32)])
    return model


@pytest.mark.parametrize(
    "shape, tile, overlap",
    [((300, 700), 128, 32), ((512, 512), 512, 64), ((37, 53), 512, 64), ((1, 1), 16, 0), ((530, 515), 256, 100)],
)
def test_tiles_cover_every_pixel_and_stay_inside_the_padded_image(shape, tile, overlap):
    grid = tiling.tile_grid(shape, tile, overlap)
    padded = grid.padded_shape
    assert all(side % 16 == 0 and side <= tile for side in grid.tile)
    covered = np.zeros(padded, int)
    for y, x in grid.origins:
        assert 0 <= y and y + grid.tile[0] <= padded[0] and 0 <= x and x + grid.tile[1] <= padded[1]
        covered[y : y + grid.tile[0], x : x + grid.tile[1]] += 1
    (top, _), (left, _) = grid.pad
    assert covered[top : top + shape[0], left : left + shape[1]].min() >= 1
    assert covered.min() >= 1


def test_neighbouring_tiles_overlap_by_at_least_the_overlap():
    grid = tiling.tile_grid((300, 700), 128, 32)
    for axis in (0, 1):
        starts = sorted({origin[axis] for origin in grid.origins})
        assert min(np.diff(starts)) >= 1 and max(np.diff(starts)) <= 128 - 32


def test_an_image_of_whole_strides_takes_the_expected_number_of_tiles():
    grid = tiling.tile_grid((3 * 96, 5 * 96), tile=128, overlap=32)
    assert len(grid.origins) == 3 * 5
    assert {y for y, _ in grid.origins} == {0, 96, 192}
    assert grid.pad == ((16, 16), (16, 16))


def test_an_image_smaller_than_the_tile_gets_one_small_tile():
    grid = tiling.tile_grid((37, 53), tile=512, overlap=64)
    assert grid.origins == ((0, 0),)
    assert grid.tile == (112, 128)  # 37 + 64 and 53 + 64 rounded up to multiples of 16


@pytest.mark.parametrize("tile, overlap", [(100, 10), (0, 0), (128, 128), (128, -1)])
def test_bad_tile_settings_are_refused(tile, overlap):
    with pytest.raises(ValueError, match="tile|overlap"):
        tiling.tile_grid((64, 64), tile, overlap)
    with pytest.raises(ValueError, match="tile|overlap"):
        TileSettings(tile, overlap)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_tile_settings_refuse_a_batch_of_no_tiles(batch_size):
    with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {batch_size}"):
        TileSettings(batch_size=batch_size)


def test_tile_settings_are_frozen_and_say_what_they_are():
    settings = TileSettings(tile=256, overlap=32, batch_size=2, tta=True)
    with pytest.raises(AttributeError):
        settings.tile = 128
    assert settings.describe() == "tiles 256, overlap 32, batch 2, 8-fold test-time augmentation"
    assert TileSettings().describe() == "tiles 576, overlap 64, batch 4"


def test_blend_window_is_positive_and_cross_fades_to_one():
    window = tiling.blend_window((128, 128), 32)
    assert window.min() > 0 and window.max() == 1
    ramp = window[64]
    assert np.allclose(ramp[96:] + ramp[:32], 1)  # two tiles 96 apart share 32 pixels


def test_tiled_prediction_equals_whole_image_prediction_for_a_pointwise_model(pointwise_model):
    image = picture((300, 700))
    direct = pointwise_model.predict_on_batch(data.normalize_images(image)[np.newaxis, ..., np.newaxis])[0, ..., 0]
    tiled = tiling.predict_image(pointwise_model, image, tiling=TileSettings(128, 32, batch_size=3))
    assert tiled.dtype == np.float32 and tiled.shape == image.shape
    np.testing.assert_allclose(tiled, direct, atol=1e-6)


@pytest.mark.parametrize("shape", [(37, 53), (530, 515), (1000, 1337)])
def test_prediction_has_the_input_shape_for_odd_sizes(unet, shape):
    probabilities = tiling.predict_image(unet, picture(shape), tiling=TileSettings(256, 32, batch_size=4))
    assert probabilities.shape == shape and probabilities.dtype == np.float32
    assert np.isfinite(probabilities).all() and 0 <= probabilities.min() and probabilities.max() <= 1


def test_a_two_page_stack_comes_back_at_its_own_size(unet):
    stack = np.stack([picture((600, 700)), picture((600, 700))[::-1]])
    probabilities = tiling.predict_stack(unet, stack, progress=False)
    assert probabilities.shape == (2, 600, 700)
    assert not np.array_equal(probabilities[0], probabilities[1])


def test_test_time_augmentation_keeps_the_result_of_a_flip_equivariant_model(pointwise_model):
    image = picture((90, 150))
    plain = tiling.predict_image(pointwise_model, image, tiling=TileSettings(64, 16))
    augmented = tiling.predict_image(pointwise_model, image, tiling=TileSettings(64, 16, tta=True))
    np.testing.assert_allclose(augmented, plain, atol=1e-6)


def test_test_time_augmentation_maps_every_transform_back():
    batch = np.arange(2 * 3 * 5).reshape(2, 3, 5, 1)
    moved = [tiling._dihedral(batch, k) for k in range(8)]
    assert len({m.tobytes() for m in moved}) == 8  # eight different transforms
    for k, m in enumerate(moved):
        np.testing.assert_array_equal(tiling._undo_dihedral(m, k), batch)


def test_test_time_augmentation_runs_the_unet_on_non_square_tiles(unet):
    probabilities = tiling.predict_image(unet, picture((40, 70)), tiling=TileSettings(128, 16, tta=True))
    assert probabilities.shape == (40, 70)


def test_8_bit_16_bit_and_float_pictures_give_the_same_prediction(unet):
    image = picture((48, 80))
    as_16_bit = image.astype(np.uint16) * 257  # 255 -> 65535
    as_float = image / 255.0
    results = [tiling.predict_image(unet, im, tiling=TileSettings(64, 16)) for im in (image, as_16_bit, as_float)]
    np.testing.assert_allclose(results[1], results[0], atol=1e-6)
    np.testing.assert_allclose(results[2], results[0], atol=1e-6)


def test_predict_stack_predicts_every_page(pointwise_model):
    stack = picture((3, 40, 50))
    result = tiling.predict_stack(pointwise_model, stack, tiling=TileSettings(32, 8), progress=False)
    assert result.shape == stack.shape
    np.testing.assert_allclose(result[1], tiling.predict_image(pointwise_model, stack[1], tiling=TileSettings(32, 8)))


def test_a_model_that_changes_the_size_is_refused():
    shrinking = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(1, 3)])
    with pytest.raises(ValueError, match="padding='same'"):
        tiling.predict_image(shrinking, picture((20, 20)), tiling=TileSettings(32, 8))


def test_a_fixed_size_model_needs_its_own_tile_size():
    fixed = build_unet((64, 64, 1), filters=1)
    with pytest.raises(ValueError, match="tile=64"):
        tiling.predict_image(fixed, picture((20, 20)), tiling=TileSettings(128))
    assert tiling.predict_image(fixed, picture((20, 100)), tiling=TileSettings(64, 16)).shape == (20, 100)


@pytest.fixture(scope="module")
def shipped_model():
    if not runtimes.DEFAULT_MODEL.is_file():
        pytest.skip(f"{runtimes.DEFAULT_MODEL} not shipped")
    from train import load_model

    return load_model(runtimes.DEFAULT_MODEL, precision="float32")


def test_tiled_prediction_of_a_real_page_matches_whole_page_prediction(shipped_model, isbi_dir):
    page = files.read_stack(isbi_dir / data.IMAGES_FILE)[0]
    whole = shipped_model.predict_on_batch(data.normalize_images(page)[np.newaxis, ..., np.newaxis])[0, ..., 0]
    tiled = tiling.predict_image(shipped_model, page, tiling=TileSettings(256, 64))
    inner = (slice(64, -64), slice(64, -64))  # the borders differ by design: mirrored vs zero padding
    assert np.mean(np.abs(tiled[inner] - whole[inner])) < 0.01
    assert np.mean((tiled[inner] > 0.5) == (whole[inner] > 0.5)) > 0.99


def test_no_seams_on_a_constant_image(shipped_model):
    flat = tiling.predict_image(shipped_model, np.full((700, 900), 0.6, np.float32), tiling=TileSettings(256, 64))
    assert flat.std() < 0.01


def test_an_affinity_model_comes_back_with_its_channels_and_without_seams():
    model = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(8, 1, activation="sigmoid")])
    model.set_weights([np.linspace(-3, 3, 8, dtype=np.float32).reshape(1, 1, 1, 8), np.zeros(8, np.float32)])
    image = picture((100, 130))
    tiled = tiling.predict_image(model, image, tiling=TileSettings(64, 16))
    whole = model.predict_on_batch(data.normalize_images(image)[np.newaxis, ..., np.newaxis])[0]
    assert tiled.shape == (100, 130, 8)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    stacked = tiling.predict_stack(model, np.stack([image, image]), tiling=TileSettings(64, 16), progress=False)
    assert stacked.shape == (2, 100, 130, 8)
    with pytest.raises(ValueError, match="8 channels but 4 offsets"):
        tiling.predict_image(model, image, tiling=TileSettings(64, 16, tta=True),
                             offsets=[(-1, 0), (0, -1), (-3, 0), (0, -3)])


def test_a_context_model_predicts_pages_with_their_neighbours_and_refuses_a_lone_page(context_unet_path):
    model = runtimes.load_model(context_unet_path)
    stack = (picture((4, 64, 80), seed=3) * 255).astype(np.uint8)
    sections = data.with_context(stack, 3)
    outputs = tiling.predict_stack(model, sections, tiling=TileSettings(tile=64, overlap=16), progress=False)
    assert outputs.shape == (4, 64, 80)
    alone = tiling.predict_image(model, sections[1], tiling=TileSettings(tile=64, overlap=16))
    np.testing.assert_allclose(outputs[1], alone, atol=1e-6)
    whole = model.predict_on_batch(data.normalize_images(sections[1:2, :, :64]))[0, ..., 0]
    assert np.abs(tiling.predict_image(model, sections[1, :, :64], tiling=TileSettings(tile=64, overlap=0))
                  - whole).max() < 1e-5  # the three sections reach the model as its three channels
    with pytest.raises(ValueError, match="takes 3 section"):
        tiling.predict_image(model, stack[0], tiling=TileSettings(tile=64, overlap=16))
