"""Property-based fuzzing of the loaders: whatever the bytes, a file loads as a valid grey stack or
raises data.DataError naming it, never another exception from inside a library."""

import io

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import data
import predict

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def assert_grey_stack_or_data_error(read, path):
    try:
        stack = read(path)
    except data.DataError as err:
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
    pages = data.read_stack(isbi_dir / data.IMAGES_FILE)[:3, :32, :32]
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
    assert_grey_stack_or_data_error(data.read_stack, path)


@FUZZ
@given(st.sampled_from([0, 1]), EDITS, CUTS)
def test_mutated_real_tiffs_load_or_raise_data_error(scratch, seed_files, which, edits, cut):
    path = scratch / "mutated.tif"
    path.write_bytes(mutate(seed_files["tiffs"][which], edits, cut))
    assert_grey_stack_or_data_error(data.read_stack, path)
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
    assert_grey_stack_or_data_error(data.read_stack, path)
    assert_grey_stack_or_data_error(predict.read_image, path)
