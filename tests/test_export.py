"""export.py: shipping a run's best model with its card, and the bioimage.io, ONNX and SavedModel exports, each
checked against the Keras model."""

import contextlib
import json
import os
import subprocess

import numpy as np
import pytest
from conftest import ROOT, tiff
import tifffile
import zarr

import data
import export
import files
import predict
import runtimes
import tiling
from model import build_unet


def test_shipped_model_is_compact_float32_without_optimizer_and_predicts_like_the_run(tiny_run, isbi_dir, tmp_path):
    dest = tmp_path / "shipped.npz"
    card = export.ship_model(tiny_run["best"].parent, dest, isbi_dir)
    with np.load(dest) as stored:
        assert stored["q0"].dtype == np.int8  # the first kernel, in 8 bits
    shipped = runtimes.load_model(dest)
    assert shipped.get_layer("CNT_1_conv_1").compute_dtype == "float32"
    assert getattr(shipped, "optimizer", None) is None
    original = runtimes.load_model(tiny_run["best"])
    x = np.random.default_rng(0).random((1, 64, 64, 1), dtype=np.float32)
    np.testing.assert_allclose(shipped.predict_on_batch(x), original.predict_on_batch(x), atol=0.02)
    saved = json.loads(dest.with_suffix(".json").read_text())
    assert saved["sha256"] == files.sha256(dest) == card["sha256"]
    assert saved["test_pages"] == [0, 10, 20]
    assert saved["training"]["settings"]["filters"] == 4
    assert 0 <= saved["test_scores"]["mean"]["v_rand"] <= 1


def test_no_file_in_the_repository_is_larger_than_a_shipped_model_may_be():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode:
        pytest.skip("not a git checkout")
    names = [name for name in listed.stdout.decode().split("\0") if name and (ROOT / name).is_file()]
    sizes = {name: (ROOT / name).stat().st_size / 2**20 for name in names}
    assert sizes[runtimes.DEFAULT_MODEL.relative_to(ROOT).as_posix()] > 1  # the shipped model is tracked
    assert {name: size for name, size in sizes.items() if size > export.MAX_MB} == {}


def test_export_of_a_run_without_model_is_a_clear_error(tmp_path, capsys):
    assert export.main([str(tmp_path)]) == 1
    assert "no best model" in capsys.readouterr().err


PAGE = 128  # pixels: a crop of an ISBI test page, a valid size (multiple of 16, at least export.MIN_SIZE)


@pytest.fixture(scope="session")  # built once per worker process, whatever ran in between
def test_page(tmp_path_factory, isbi_dir):
    """Return the path of a one-page TIFF: the top left PAGE x PAGE pixels of ISBI test page 0."""
    path = tmp_path_factory.mktemp("page") / "page.tif"
    tifffile.imwrite(path, files.read_stack(isbi_dir / data.TEST_FILE)[0, :PAGE, :PAGE])
    return path


@pytest.fixture(scope="session")  # built once per worker process, whatever ran in between
def package(unet_path, test_page, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "tiny.zip"
    before = dict(os.environ)
    result = export.export_model(unet_path, "bioimageio", out, test_image=test_page)
    result["environment_changes"] = {k: v for k, v in os.environ.items() if before.get(k) != v}
    return out, result


def keras_prediction(model_path, page_path):
    """Return the float32 Keras model's tiled prediction of the page, as predict.py makes it."""
    model = runtimes.load_model(model_path, precision="float32")
    return tiling.predict_stack(model, files.read_stack(page_path))[0]


@pytest.mark.xdist_group("package")  # with the other tests of its module fixture
def test_bioimageio_package_passes_spec_validation_and_the_core_model_test(package, test_page, tmp_path):
    from bioimageio.core import test_model
    from bioimageio.spec import load_model_description

    out, result = package
    assert result["model_test"] == "passed" and result["largest_difference"] <= export.TOLERANCE
    # bioimageio.core and tf2onnx set TensorFlow's variables for the process; the export puts them back
    assert set(result["environment_changes"]) <= {"KERAS_BACKEND"}, result["environment_changes"]
    assert result["weight_formats_tested"] == ["keras_v3", "onnx", "tensorflow_saved_model_bundle"]
    assert not list(out.parent.glob("*.tmp*"))

    descr = load_model_description(out, format_version="latest")
    assert descr.validation_summary.status in ("passed", "valid-format")
    (tensor,) = descr.inputs
    assert [str(axis.id) for axis in tensor.axes] == ["batch", "y", "x", "channel"]
    y_size = tensor.axes[1].size
    assert (y_size.min, y_size.step) == (export.MIN_SIZE, 16)
    gains = [step.kwargs.gain for step in tensor.preprocessing if step.id == "scale_linear"]
    assert gains == [pytest.approx(1 / 255)]
    assert {str(entry.doi) for entry in descr.cite} == {"10.1007/978-3-319-24574-4_28", "10.3389/fnana.2015.00142"}
    test_input = np.load(tensor.test_tensor.get_reader())
    np.testing.assert_array_equal(test_input[0, ..., 0], files.read_stack(test_page)[0])

    with contextlib.chdir(tmp_path):  # bioimageio.core unzips SavedModel weights into the working folder
        summary = test_model(out)
    assert summary.status == "passed", summary.format()


@pytest.mark.parametrize("fmt, name", [("onnx", "tiny.onnx"), ("savedmodel", "tiny-savedmodel"),
                                       ("keras", "tiny-float32.keras")])
def test_onnx_savedmodel_and_keras_exports_predict_like_the_keras_model(fmt, name, unet_path, test_page, tmp_path):
    out = tmp_path / name
    result = export.export_model(unet_path, fmt, out, test_image=test_page)
    assert result["largest_difference"] <= export.TOLERANCE
    x = np.random.default_rng(0).random((2, 96, 160, 1), dtype=np.float32)  # another size than the test page
    expected = runtimes.load_model(unet_path).predict_on_batch(x)
    exported = runtimes.load_model(out).predict_on_batch(x)
    assert exported.shape == expected.shape
    np.testing.assert_allclose(exported, expected, atol=export.TOLERANCE)
    assert expected.std() > 1e-3  # the comparison is between varied outputs, not two constants


@pytest.mark.parametrize("input_shape, side", [((None, None, 1), 100), ((128, 128, 1), 96)])
def test_package_whose_test_input_does_not_fit_the_model_is_refused_before_writing(
    input_shape, side, isbi_dir, tmp_path, capsys
):
    model_path = tmp_path / "model.keras"
    build_unet(input_shape, filters=2).save(model_path)
    page = tmp_path / "page.tif"
    tifffile.imwrite(page, files.read_stack(isbi_dir / data.TEST_FILE)[0, :side, :side])
    out = tmp_path / "dist" / "package.zip"
    assert export.main(["--format", "bioimageio", "--model", str(model_path), "--out", str(out),
                        "--test-image", str(page)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f"{side}x{side}" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "dist").exists()


def test_unwritable_output_path_is_one_clear_error(unet_path, test_page, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "tiny.onnx"
    assert export.main(["--format", "onnx", "--model", str(unet_path), "--out", str(out),
                        "--test-image", str(test_page)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out}: cannot write here") and len(err.splitlines()) == 1


def test_savedmodel_export_never_replaces_a_folder_of_other_files(unet_path, test_page, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert export.main(["--format", "savedmodel", "--model", str(unet_path), "--out", str(tmp_path),
                        "--test-image", str(test_page)]) == 1
    assert "is not a SavedModel folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.xdist_group("package")  # with the other tests of its module fixture
def test_predict_with_exported_onnx_or_package_matches_keras_to_tiff_and_zarr(package, unet_path, test_page, tmp_path):
    onnx = tmp_path / "tiny.onnx"
    export.export_model(unet_path, "onnx", onnx, test_image=test_page)
    expected = keras_prediction(unet_path, test_page)
    for model in (onnx, package[0]):
        target = tmp_path / f"{model.suffix[1:]}.tif"
        assert predict.main([str(test_page), "--model", str(model), "--out", str(target)]) == 0
        np.testing.assert_allclose(tifffile.imread(target), expected, atol=export.TOLERANCE)
        # block by block into zarr too (blocks.py loads the model the same way)
        volume = tmp_path / f"{model.suffix[1:]}.zarr"
        assert predict.main([str(test_page), "--model", str(model), "--out", str(volume), "--block", "64"]) == 0
        np.testing.assert_allclose(zarr.open_array(volume)[0], expected, atol=export.TOLERANCE)


def test_only_a_keras_model_is_exported_and_anything_else_is_named_before_writing(tmp_path, capsys):
    onnx = tmp_path / "tiny.onnx"
    onnx.write_bytes(b"refused by its kind, never read")
    for model, words in ((onnx, "tiny.onnx: not a .keras (or compact .npz) model"), (tmp_path / "none.keras", "no such model file")):
        assert export.main(["--format", "onnx", "--model", str(model), "--out", str(tmp_path / "out.onnx")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


def test_a_context_model_exports_with_its_sections_named_and_checked(context_unet_path, isbi_dir, tmp_path):
    from bioimageio.spec import load_model_description

    tiff(tmp_path / "stack.tif", files.read_stack(isbi_dir / data.TEST_FILE)[:3, :PAGE, :PAGE])
    out = tmp_path / "context.zip"
    result = export.export_model(context_unet_path, "bioimageio", out, test_image=tmp_path / "stack.tif")
    assert result["model_test"] == "passed" and result["largest_difference"] <= export.TOLERANCE
    (tensor,) = load_model_description(out, format_version="latest").inputs
    assert [str(name) for name in tensor.axes[3].channel_names] == ["section_m1", "section_0", "section_p1"]
    test_input = np.load(tensor.test_tensor.get_reader())
    pages = files.read_stack(tmp_path / "stack.tif")
    np.testing.assert_array_equal(test_input[0], np.stack([pages[1], pages[0], pages[1]], -1))  # page -1 mirrored
    onnx = export.export_model(context_unet_path, "onnx", tmp_path / "context.onnx", test_image=tmp_path / "stack.tif")
    assert onnx["largest_difference"] <= export.TOLERANCE
    assert runtimes.load_model(tmp_path / "context.onnx").input_shape[-1] == 3
