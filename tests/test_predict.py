import keras
import numpy as np
import pytest
import tifffile
from PIL import Image

import data
import predict
import train
from model import build_unet


@pytest.fixture(scope="module")
def pointwise_model():
    """A model of one 1x1 convolution: each output pixel depends on its own input pixel only."""
    model = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(1, 1, activation="sigmoid")])
    model.set_weights([np.full((1, 1, 1, 1), 4.0, np.float32), np.array([-2.0], np.float32)])
    return model


@pytest.fixture(scope="module")
def unet():
    keras.utils.set_random_seed(0)
    return build_unet((None, None, 1), filters=2)


@pytest.fixture(scope="module")
def unet_path(tmp_path_factory, unet):
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    unet.save(path)
    return path


def picture(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


# ---------------------------------------------------------------- tile geometry

@pytest.mark.parametrize(
    "shape, tile, overlap",
    [((300, 700), 128, 32), ((512, 512), 512, 64), ((37, 53), 512, 64), ((1, 1), 16, 0), ((530, 515), 256, 100)],
)
def test_tiles_cover_every_pixel_and_stay_inside_the_padded_image(shape, tile, overlap):
    grid = predict.tile_grid(shape, tile, overlap)
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
    grid = predict.tile_grid((300, 700), 128, 32)
    for axis in (0, 1):
        starts = sorted({origin[axis] for origin in grid.origins})
        assert min(np.diff(starts)) >= 1 and max(np.diff(starts)) <= 128 - 32


def test_an_image_of_whole_strides_takes_the_expected_number_of_tiles():
    grid = predict.tile_grid((3 * 96, 5 * 96), tile=128, overlap=32)
    assert len(grid.origins) == 3 * 5
    assert {y for y, _ in grid.origins} == {0, 96, 192}
    assert grid.pad == ((16, 16), (16, 16))


def test_an_image_smaller_than_the_tile_gets_one_small_tile():
    grid = predict.tile_grid((37, 53), tile=512, overlap=64)
    assert grid.origins == ((0, 0),)
    assert grid.tile == (112, 128)  # 37 + 64 and 53 + 64 rounded up to multiples of 16


@pytest.mark.parametrize("tile, overlap", [(100, 10), (0, 0), (128, 128), (128, -1)])
def test_bad_tile_settings_are_refused(tile, overlap):
    with pytest.raises(ValueError, match="tile|overlap"):
        predict.tile_grid((64, 64), tile, overlap)


def test_blend_window_is_positive_and_cross_fades_to_one():
    window = predict.blend_window((128, 128), 32)
    assert window.min() > 0 and window.max() == 1
    ramp = window[64]
    assert np.allclose(ramp[96:] + ramp[:32], 1)  # two tiles 96 apart share 32 pixels


# ---------------------------------------------------------------- predicting

def test_tiled_prediction_equals_whole_image_prediction_for_a_pointwise_model(pointwise_model):
    image = picture((300, 700))
    direct = pointwise_model.predict_on_batch(data.normalize_images(image)[np.newaxis, ..., np.newaxis])[0, ..., 0]
    tiled = predict.predict_image(pointwise_model, image, tile=128, overlap=32, batch_size=3)
    assert tiled.dtype == np.float32 and tiled.shape == image.shape
    np.testing.assert_allclose(tiled, direct, atol=1e-6)


@pytest.mark.parametrize("shape", [(37, 53), (530, 515), (1000, 1337)])
def test_prediction_has_the_input_shape_for_odd_sizes(unet, shape):
    probabilities = predict.predict_image(unet, picture(shape), tile=256, overlap=32, batch_size=4)
    assert probabilities.shape == shape and probabilities.dtype == np.float32
    assert np.isfinite(probabilities).all() and 0 <= probabilities.min() and probabilities.max() <= 1


def test_a_two_page_stack_comes_back_at_its_own_size(unet):
    stack = np.stack([picture((600, 700)), picture((600, 700))[::-1]])
    probabilities = predict.predict_stack(unet, stack, progress=False)
    assert probabilities.shape == (2, 600, 700)
    assert not np.array_equal(probabilities[0], probabilities[1])


def test_test_time_augmentation_keeps_the_result_of_a_flip_equivariant_model(pointwise_model):
    image = picture((90, 150))
    plain = predict.predict_image(pointwise_model, image, tile=64, overlap=16)
    augmented = predict.predict_image(pointwise_model, image, tile=64, overlap=16, tta=True)
    np.testing.assert_allclose(augmented, plain, atol=1e-6)


def test_test_time_augmentation_maps_every_transform_back():
    batch = np.arange(2 * 3 * 5).reshape(2, 3, 5, 1)
    moved = [predict._dihedral(batch, k) for k in range(8)]
    assert len({m.tobytes() for m in moved}) == 8  # eight different transforms
    for k, m in enumerate(moved):
        np.testing.assert_array_equal(predict._undo_dihedral(m, k), batch)


def test_test_time_augmentation_runs_the_unet_on_non_square_tiles(unet):
    probabilities = predict.predict_image(unet, picture((40, 70)), tile=128, overlap=16, tta=True)
    assert probabilities.shape == (40, 70)


def test_8_bit_16_bit_and_float_pictures_give_the_same_prediction(unet):
    image = picture((48, 80))
    as_16_bit = image.astype(np.uint16) * 257  # 255 -> 65535
    as_float = image / 255.0
    results = [predict.predict_image(unet, im, tile=64, overlap=16) for im in (image, as_16_bit, as_float)]
    np.testing.assert_allclose(results[1], results[0], atol=1e-6)
    np.testing.assert_allclose(results[2], results[0], atol=1e-6)


def test_predict_stack_predicts_every_page(pointwise_model):
    stack = picture((3, 40, 50))
    result = predict.predict_stack(pointwise_model, stack, tile=32, overlap=8, progress=False)
    assert result.shape == stack.shape
    np.testing.assert_allclose(result[1], predict.predict_image(pointwise_model, stack[1], tile=32, overlap=8))


def test_a_model_that_changes_the_size_is_refused():
    shrinking = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(1, 3)])
    with pytest.raises(ValueError, match="padding='same'"):
        predict.predict_image(shrinking, picture((20, 20)), tile=32, overlap=8)


def test_a_fixed_size_model_needs_its_own_tile_size():
    fixed = build_unet((64, 64, 1), filters=1)
    with pytest.raises(ValueError, match="tile=64"):
        predict.predict_image(fixed, picture((20, 20)), tile=128)
    assert predict.predict_image(fixed, picture((20, 100)), tile=64, overlap=16).shape == (20, 100)


# ---------------------------------------------------------------- reading and writing

def test_read_images_reads_a_multipage_tiff_a_png_and_a_folder(tmp_path):
    folder = tmp_path / "pages"
    folder.mkdir()
    tifffile.imwrite(folder / "stack.tif", picture((3, 20, 30)), photometric="minisblack")
    Image.fromarray(picture((25, 35)).astype(np.uint16) * 257).save(folder / "page.png")
    predict.write_prediction(folder / "stack-prediction.tif", np.zeros((3, 20, 30)))  # an earlier output
    (folder / "notes.txt").write_text("not an image")
    single = tmp_path / "single.png"
    Image.fromarray(picture((10, 12))).save(single)

    images = dict(predict.read_images([folder, single]))
    assert list(images) == [str(folder / "page.png"), str(folder / "stack.tif"), str(single)]
    assert images[str(folder / "stack.tif")].shape == (3, 20, 30)
    assert images[str(folder / "page.png")].shape == (1, 25, 35)
    assert images[str(folder / "page.png")].dtype == np.uint16
    assert images[str(single)].dtype == np.uint8


def test_read_images_explains_bad_inputs(tmp_path):
    with pytest.raises(data.DataError, match="missing.tif: no such file"):
        predict.read_images([tmp_path / "missing.tif"])
    (tmp_path / "text.tif").write_text("not a TIFF")
    with pytest.raises(data.DataError, match="text.tif: not a readable TIFF"):
        predict.read_images([tmp_path / "text.tif"])
    (tmp_path / "text.png").write_text("not a PNG")
    with pytest.raises(data.DataError, match="text.png: not a readable image"):
        predict.read_images([tmp_path / "text.png"])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(data.DataError, match="colour.png: RGB image"):
        predict.read_images([tmp_path / "colour.png"])
    tifffile.imwrite(tmp_path / "colour.tif", np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(data.DataError, match="colour.tif: expected 2-D grey pages"):
        predict.read_images([tmp_path / "colour.tif"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no image files"):
        predict.read_images([tmp_path / "empty"])


@pytest.mark.parametrize("uint8, dtype", [(False, np.float32), (True, np.uint8)])
def test_write_prediction_writes_a_multipage_tiff(tmp_path, uint8, dtype):
    probabilities = np.random.default_rng(0).random((3, 10, 12)).astype(np.float32)
    path = predict.write_prediction(tmp_path / "out" / "p.tif", probabilities, uint8=uint8)
    saved = tifffile.imread(path)
    assert saved.shape == (3, 10, 12) and saved.dtype == dtype
    expected = np.round(probabilities * 255) if uint8 else probabilities
    np.testing.assert_array_equal(saved, expected)
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.tif"]  # no temporary file left


def test_a_missing_default_model_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(predict, "DEFAULT_MODEL", tmp_path / "models" / "none.keras")
    with pytest.raises(FileNotFoundError, match="python train.py"):
        predict.resolve_model(None)


# ---------------------------------------------------------------- command line

def test_command_line_writes_a_prediction_beside_the_input(tmp_path, unet_path, capsys):
    source = tmp_path / "volume.tif"
    tifffile.imwrite(source, picture((2, 40, 70)), photometric="minisblack")
    assert predict.main([str(source), "--model", str(unet_path), "--tile", "64", "--overlap", "16"]) == 0
    written = tmp_path / "volume-prediction.tif"
    result = tifffile.imread(written)
    assert result.shape == (2, 40, 70) and result.dtype == np.float32
    np.testing.assert_allclose(
        result[0], predict.predict_image(train.load_model(unet_path, precision="auto"), picture((2, 40, 70))[0], 64, 16), atol=1e-6
    )
    assert f"wrote {written}" in capsys.readouterr().out


def test_command_line_writes_uint8_into_the_out_folder(tmp_path, unet_path, capsys):
    source = tmp_path / "page.png"
    Image.fromarray(picture((33, 47))).save(source)
    out = tmp_path / "predictions"
    args = [str(source), "--model", str(unet_path), "--out", str(out), "--uint8", "--tile", "64", "--overlap", "16"]
    assert predict.main(args) == 0
    result = tifffile.imread(out / "page-prediction.tif")
    assert result.shape == (33, 47) and result.dtype == np.uint8  # one page in, one 2-D page out


def test_command_line_reports_errors_without_a_traceback(tmp_path, unet_path, capsys):
    assert predict.main([str(tmp_path / "missing.tif"), "--model", str(unet_path)]) == 1
    assert "missing.tif: no such file" in capsys.readouterr().err
    assert predict.main([str(tmp_path), "--model", str(tmp_path / "none.keras")]) == 1
    assert "no such model file" in capsys.readouterr().err
    assert predict.main([str(tmp_path), "--model", str(unet_path), "--tile", "100"]) == 1
    assert "multiple of 16" in capsys.readouterr().err


def test_challenge_option_predicts_the_test_volume_with_png_masks(tmp_path, unet_path, monkeypatch):
    stack = (np.arange(2 * 40 * 48).reshape(2, 40, 48) % 251).astype(np.uint8)
    labels = np.where(np.arange(40 * 48).reshape(40, 48) % 7 == 0, 0, 255).astype(np.uint8)
    for name, pages in ((data.IMAGES_FILE, stack), (data.LABELS_FILE, np.stack([labels, labels])),
                        (data.TEST_FILE, stack)):
        tifffile.imwrite(tmp_path / name, pages, photometric="minisblack")
    out = tmp_path / "submission" / "test-prediction.tif"
    args = ["--challenge", "--data-dir", str(tmp_path), "--model", str(unet_path), "--out", str(out), "--png"]
    assert predict.main(args) == 0
    written = tifffile.imread(out)
    assert written.shape == (2, 40, 48) and written.dtype == np.float32
    masks = sorted(out.parent.glob("*.png"))
    assert [m.name for m in masks] == ["test-prediction-0.png", "test-prediction-1.png"]
    from PIL import Image

    mask = np.asarray(Image.open(masks[0]))
    np.testing.assert_array_equal(mask, np.where(written[0] > 0.5, 255, 0))


def test_no_input_is_a_clear_error(capsys):
    assert predict.main([]) == 1
    assert "no input" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shipped_model():
    if not predict.DEFAULT_MODEL.is_file():
        pytest.skip(f"{predict.DEFAULT_MODEL} not shipped")
    from train import load_model

    return load_model(predict.DEFAULT_MODEL, precision="float32")


def test_tiled_prediction_of_a_real_page_matches_whole_page_prediction(shipped_model, isbi_dir):
    page = data.read_stack(isbi_dir / data.IMAGES_FILE)[0]
    whole = shipped_model.predict_on_batch(data.normalize_images(page)[np.newaxis, ..., np.newaxis])[0, ..., 0]
    tiled = predict.predict_image(shipped_model, page, tile=256, overlap=64)
    inner = (slice(64, -64), slice(64, -64))  # the borders differ by design: mirrored vs zero padding
    assert np.mean(np.abs(tiled[inner] - whole[inner])) < 0.01
    assert np.mean((tiled[inner] > 0.5) == (whole[inner] > 0.5)) > 0.99


def test_no_seams_on_a_constant_image(shipped_model):
    flat = predict.predict_image(shipped_model, np.full((700, 900), 0.6, np.float32), tile=256, overlap=64)
    assert flat.std() < 0.01
