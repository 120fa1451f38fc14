"""files.py: whatever the bytes, a file loads as a valid grey stack or raises one DataError naming it (property-
based fuzzing and known bad cases), and an interrupted write never replaces a good file."""

import io
import os

import numpy as np
import pytest
import tifffile
from conftest import png_bytes, tiff
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import data
import files
import predict
import train

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def assert_grey_stack_or_data_error(read, path):
    try:
        stack = read(path)
    except files.DataError as err:
        assert str(err).startswith(str(path)) and "\n" not in str(err)
        return
    assert stack.ndim == 3 and stack.size > 0, stack.shape
    assert stack.dtype.kind in "buif", stack.dtype
    assert stack.dtype.kind != "f" or np.isfinite(stack).all()
    images = data.normalize_images(stack)
    assert np.isfinite(images).all()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def seed_files(isbi_dir):
    """Small real TIFFs (3 pages of 32x32 crops: plain and deflate-compressed) and a real PNG page, as bytes."""
    pages = files.read_stack(isbi_dir / data.IMAGES_FILE)[:3, :32, :32]
    tiffs = []
    for compression in (None, "zlib"):
        out = io.BytesIO()
        tifffile.imwrite(out, pages, photometric="minisblack", compression=compression)
        tiffs.append(out.getvalue())
    png = io.BytesIO()
    Image.fromarray(pages[0]).save(png, format="PNG")
    return {"tiffs": tiffs, "png": png.getvalue()}


def mutate(original: bytes, edits, cut) -> bytes:
    """Return `original` with each (position, byte) of `edits` overwritten, cut to `cut` of its length."""
    buffer = bytearray(original)
    for position, value in edits:
        buffer[position % len(buffer)] = value
    return bytes(buffer[: max(1, int(len(buffer) * cut))])


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)


CUTS = st.one_of(st.just(1.0), st.floats(0.0, 1.0))


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_named_tif_load_or_raise_data_error(scratch, content):
    path = scratch / "any.tif"
    path.write_bytes(content)
    assert_grey_stack_or_data_error(files.read_stack, path)


@FUZZ
@given(st.sampled_from([0, 1]), EDITS, CUTS)
def test_mutated_real_tiffs_load_or_raise_data_error(scratch, seed_files, which, edits, cut):
    path = scratch / "mutated.tif"
    path.write_bytes(mutate(seed_files["tiffs"][which], edits, cut))
    assert_grey_stack_or_data_error(files.read_stack, path)
    assert_grey_stack_or_data_error(predict.read_image, path)


@FUZZ
@given(EDITS, CUTS)
def test_mutated_real_pngs_load_or_raise_data_error(scratch, seed_files, edits, cut):
    path = scratch / "mutated.png"
    path.write_bytes(mutate(seed_files["png"], edits, cut))
    assert_grey_stack_or_data_error(predict.read_image, path)


@FUZZ
@given(st.sampled_from(["uint8", "uint16", "int16", "int32", "float32", "float64", "bool"]),
       st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2 ** 32 - 1))
def test_generated_stacks_of_any_pixel_type_load_or_raise_data_error(scratch, dtype, pages, height, width, seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(0, 300, (pages, height, width))
    if rng.random() < 0.2 and dtype.startswith("float"):
        values[0, 0, 0] = np.nan
    path = scratch / "generated.tif"
    tifffile.imwrite(path, values.astype(dtype), photometric="minisblack")
    assert_grey_stack_or_data_error(files.read_stack, path)
    assert_grey_stack_or_data_error(predict.read_image, path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(files.DataError, match="absent.tif: file not found"):
        files.read_stack(tmp_path / "absent.tif")


def test_non_tiff_is_refused_with_its_name(tmp_path):
    fake = tmp_path / "train-volume.tif"
    fake.write_text("this is not an image")
    with pytest.raises(files.DataError, match="train-volume.tif: not a readable TIFF"):
        files.read_stack(fake)


def test_colour_pages_are_refused(tmp_path):
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, np.zeros((2, 16, 16, 3), np.uint8), photometric="rgb")
    with pytest.raises(files.DataError, match="2-D grey pages"):
        files.read_stack(path)


def test_a_write_killed_midway_leaves_the_previous_model_loadable(tmp_path, monkeypatch):
    from keras.src.saving import saving_lib

    model = train.build_unet((None, None, 1), filters=4)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.optimizer.build(model.trainable_variables)
    path = files.write_atomic(tmp_path / "last.keras", model.save)
    before = [w.copy() for w in model.get_weights()]

    def half_then_interrupt(model, fileobj, weights_format):
        fileobj.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # as a Ctrl-C (or a kill) in the middle of Keras' write

    monkeypatch.setattr(saving_lib, "_save_model_to_fileobj", half_then_interrupt)
    model.set_weights([w + 1 for w in before])
    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(path, model.save)
    monkeypatch.undo()
    for got, want in zip(train.load_checkpoint(path).get_weights(), before):
        np.testing.assert_array_equal(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.keras"]  # no temporary file left behind


@pytest.fixture(scope="module")
def real_tiff_bytes(isbi_dir):
    return (isbi_dir / data.IMAGES_FILE).read_bytes()


def unknown_photometric(path):
    """Return the bytes of the TIFF at `path` with its photometric tag (262) set to the unknown value 99."""
    content = path.read_bytes()
    entry = (262).to_bytes(2, "little") + (3).to_bytes(2, "little") + (1).to_bytes(4, "little")
    assert entry in content
    at = content.index(entry) + len(entry)
    return content[:at] + (99).to_bytes(2, "little") + content[at + 2:]


BAD_TIFFS = {
    "empty": (lambda p, real: p.write_bytes(b""), "not a readable TIFF file"),
    "random bytes": (lambda p, real: p.write_bytes(np.random.default_rng(0).bytes(5000)), "not a readable TIFF"),
    "truncated": (lambda p, real: p.write_bytes(real[: len(real) // 2]), "not a readable TIFF file"),
    "header only": (lambda p, real: p.write_bytes(real[:8]), "not a readable TIFF file"),
    "rgb": (lambda p, real: tiff(p, np.zeros((16, 16, 3), np.uint8), photometric="rgb"), "convert to greyscale"),
    "no pixels": (lambda p, real: tiff(p, np.zeros((0, 16, 16), np.uint8)), "no pixels"),
    "nan floats": (lambda p, real: tiff(p, np.full((2, 16, 16), np.nan, np.float32)), "NaN or infinite"),
    "negative integers": (lambda p, real: tiff(p, np.full((2, 16, 16), -3, np.int16)), "negative pixel values"),
    "unknown photometric": (lambda p, real: p.write_bytes(unknown_photometric(tiff(p, np.zeros((2, 4, 3, 8),
                                                                                               np.uint8)))),
                            "expected 2-D grey pages"),
    "complex": (lambda p, real: tiff(p, np.zeros((2, 16, 16), np.complex64)), "not supported"),
}


@pytest.mark.filterwarnings("ignore:.*writing zero-size array")
@pytest.mark.parametrize("case", BAD_TIFFS)
def test_bad_tiffs_give_one_data_error_naming_the_file(case, tmp_path, real_tiff_bytes):
    make, message = BAD_TIFFS[case]
    path = tmp_path / "bad.tif"
    make(path, real_tiff_bytes)
    for read in (files.read_stack, predict.read_image):
        with pytest.raises(files.DataError, match=message) as error:
            read(path)
        assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


GOOD_TIFFS = {
    "single page": (np.arange(256, dtype=np.uint8).reshape(16, 16), np.uint8),
    "16-bit": (np.linspace(0, 65535, 512).astype(np.uint16).reshape(2, 16, 16), np.uint16),
    "float in [0, 1]": (np.linspace(0, 1, 512, dtype=np.float32).reshape(2, 16, 16), np.float32),
}


@pytest.mark.parametrize("case", GOOD_TIFFS)
def test_single_page_16_bit_and_float_tiffs_load_and_normalise_to_0_1(case, tmp_path):
    array, dtype = GOOD_TIFFS[case]
    pages = predict.read_image(tiff(tmp_path / "ok.tif", array))
    assert pages.dtype == dtype
    assert pages.shape == ((1, 16, 16) if array.ndim == 2 else array.shape)
    images = data.normalize_images(pages)
    assert images.min() >= 0 and images.max() == pytest.approx(1.0, abs=1e-3)


BAD_IMAGES = {
    "empty png": (lambda p: p.write_bytes(b""), "not a readable image file"),
    "random png": (lambda p: p.write_bytes(np.random.default_rng(1).bytes(3000)), "not a readable image file"),
    "truncated png": (lambda p: p.write_bytes(png_bytes(np.zeros((64, 64), np.uint8) + 7)[:60]),
                      "not a readable image file"),
    "rgb png": (lambda p: Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p), "RGB image"),
    "palette png": (lambda p: Image.fromarray(np.zeros((8, 8), np.uint8)).convert("P").save(p), "P image"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_pngs_give_one_data_error_naming_the_file(case, tmp_path):
    make, message = BAD_IMAGES[case]
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(files.DataError, match=message) as error:
        predict.read_image(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_a_16_bit_png_loads_as_uint16(tmp_path):
    path = tmp_path / "deep.png"
    path.write_bytes(png_bytes((np.arange(256) * 200).astype(np.uint16).reshape(16, 16)))
    pages = predict.read_image(path)
    assert pages.dtype == np.uint16 and pages.shape == (1, 16, 16) and pages.max() == 255 * 200


# ---------------------------------------------------------------- outputs that would replace their inputs

def test_an_output_that_is_an_input_by_any_name_or_link_is_refused(tmp_path):
    source = tmp_path / "page.tif"
    source.write_bytes(b"the user's data")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.tif").symlink_to(source)
    os.link(source, tmp_path / "hard.tif")
    (tmp_path / "alias").symlink_to(tmp_path)  # a folder reached by another name
    for output in (source, tmp_path / "sub" / ".." / "page.tif", tmp_path / "link.tif", tmp_path / "hard.tif",
                   tmp_path / "alias" / "page.tif"):
        with pytest.raises(files.DataError, match="would overwrite the input .*page.tif; choose another"):
            files.refuse_overwriting([tmp_path / "other.tif", output], [None, source])
    files.refuse_overwriting([tmp_path / "page-prediction.tif", tmp_path / "new" / "page.tif", None], [source])
    assert source.read_bytes() == b"the user's data"
