"""predict.py: reading images of any kind, writing predictions atomically, and the command line."""

import numpy as np
import pytest
import tifffile
from conftest import picture, tiff
from PIL import Image

import data
import files
import outputs
import predict
import runtimes
import tiling
from tiling import TileSettings

# ---------------------------------------------------------------- reading and writing


def test_read_images_explains_bad_inputs(tmp_path):
    with pytest.raises(files.DataError, match="missing.tif: no such file"):
        predict.read_images([tmp_path / "missing.tif"])
    (tmp_path / "text.tif").write_text("not a TIFF")
    with pytest.raises(files.DataError, match="text.tif: not a readable TIFF"):
        predict.read_images([tmp_path / "text.tif"])
    (tmp_path / "text.png").write_text("not a PNG")
    with pytest.raises(files.DataError, match="text.png: not a readable image"):
        predict.read_images([tmp_path / "text.png"])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(files.DataError, match="colour.png: RGB image"):
        predict.read_images([tmp_path / "colour.png"])
    tifffile.imwrite(tmp_path / "colour.tif", np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(files.DataError, match="colour.tif: expected 2-D grey pages"):
        predict.read_images([tmp_path / "colour.tif"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(files.DataError, match="no image files"):
        predict.read_images([tmp_path / "empty"])


@pytest.mark.parametrize("uint8, dtype", [(False, np.float32), (True, np.uint8)])
def test_write_prediction_writes_a_multipage_tiff(tmp_path, uint8, dtype):
    probabilities = np.random.default_rng(0).random((3, 10, 12)).astype(np.float32)
    path = outputs.write_prediction(tmp_path / "out" / "p.tif", probabilities, uint8=uint8)
    saved = tifffile.imread(path)
    assert saved.shape == (3, 10, 12) and saved.dtype == dtype
    expected = np.round(probabilities * 255) if uint8 else probabilities
    np.testing.assert_array_equal(saved, expected)
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.tif"]  # no temporary file left


def test_a_missing_default_model_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(runtimes, "DEFAULT_MODEL", tmp_path / "models" / "none.keras")
    with pytest.raises(FileNotFoundError, match="python train.py"):
        runtimes.resolve_model(None)


def test_output_settings_check_their_combinations_and_name_every_file_they_write(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'watershed'"):
        outputs.OutputSettings(cells=True, method="watershed")
    with pytest.raises(ValueError, match="draw the cells: add --cells"):
        outputs.OutputSettings(boundaries=True)
    target = tmp_path / "stack-prediction.tif"
    everything = outputs.OutputSettings(png=True, mask_tiff=True, cells=True, overlay=True, boundaries=True)
    assert [path.name for path in everything.paths(target, 2)] == [
        "stack-prediction.tif", "stack-prediction-0.png", "stack-prediction-1.png", "stack-prediction-mask.tif",
        "stack-cells.tif", "stack-cells.png", "stack-cells-boundaries.tif"]
    assert outputs.OutputSettings().paths(target, 2) == [target]


@pytest.mark.filterwarnings("ignore:.*the prediction is \\(nearly\\) uniform")  # an untrained tiny model
def test_predict_files_takes_its_settings_as_two_bundles(tmp_path, unet_path):
    source = tiff(tmp_path / "page.tif", picture((40, 48)))
    lines = []
    (written,) = predict.predict_files([source], unet_path, tiling=TileSettings(64, 16, batch_size=2),
                                       output=outputs.OutputSettings(uint8=True, mask_tiff=True), say=lines.append)
    assert tifffile.imread(written).dtype == np.uint8 and (tmp_path / "page-prediction-mask.tif").is_file()
    assert any(line.endswith(": tiles 64, overlap 16, batch 2") for line in lines), lines
    with pytest.raises(TypeError):
        predict.predict_files([source], unet_path, tmp_path)  # out and what follows it: keywords only


# ---------------------------------------------------------------- command line

def test_command_line_writes_a_prediction_beside_the_input(tmp_path, unet_path, capsys):
    source = tmp_path / "volume.tif"
    tifffile.imwrite(source, picture((2, 40, 70)), photometric="minisblack")
    assert predict.main([str(source), "--model", str(unet_path), "--tile", "64", "--overlap", "16"]) == 0
    written = tmp_path / "volume-prediction.tif"
    result = tifffile.imread(written)
    assert result.shape == (2, 40, 70) and result.dtype == np.float32
    model = runtimes.load_model(unet_path, precision="auto")
    expected = tiling.predict_image(model, picture((2, 40, 70))[0], tiling=TileSettings(64, 16))
    np.testing.assert_allclose(result[0], expected, atol=1e-6)
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


def test_a_prediction_write_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    target = outputs.write_prediction(tmp_path / "p.tif", np.full((8, 8), 0.25, np.float32))

    def half_then_fail(path, *args, **kwargs):
        open(path, "wb").write(b"II*\x00 truncated")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", half_then_fail)
    with pytest.raises(OSError, match="p.tif: cannot write it"):
        outputs.write_prediction(target, np.zeros((8, 8), np.float32))
    monkeypatch.undo()
    np.testing.assert_array_equal(files.read_stack(target)[0], np.full((8, 8), 0.25, np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["p.tif"]


def test_float_pages_outside_0_1_are_refused_for_prediction(tmp_path):
    path = tiff(tmp_path / "f.tif", np.full((2, 16, 16), 200.0, np.float32))
    with pytest.raises(files.DataError, match=r"f.tif: float pixels must lie in \[0, 1\], found 200 to 200"):
        predict.read_image(path)


def test_read_images_reads_a_multipage_tiff_a_png_and_a_folder(tmp_path):
    folder = tmp_path / "pages"
    folder.mkdir()
    tifffile.imwrite(folder / "stack.tif", picture((3, 20, 30)), photometric="minisblack")
    Image.fromarray(picture((25, 35)).astype(np.uint16) * 257).save(folder / "page.png")
    outputs.write_prediction(folder / "stack-prediction.tif", np.zeros((3, 20, 30)))  # an earlier output
    (folder / "notes.txt").write_text("not an image")
    single = tmp_path / "single.png"
    Image.fromarray(picture((10, 12))).save(single)

    images = dict(predict.read_images([folder, single]))
    assert list(images) == [str(folder / "page.png"), str(folder / "stack.tif"), str(single)]
    assert images[str(folder / "stack.tif")].shape == (3, 20, 30)
    assert images[str(folder / "page.png")].shape == (1, 25, 35)
    assert images[str(folder / "page.png")].dtype == np.uint16
    assert images[str(single)].dtype == np.uint8


# ---------------------------------------------------------------- cells

def test_cells_of_the_shipped_model_on_a_test_page_are_about_as_many_as_the_true_ones(isbi_dir, tmp_path, capsys):
    import scores

    images, labels = data.load_isbi(isbi_dir)
    source = tiff(tmp_path / "page0.tif", images[0])
    assert predict.main([str(source), "--cells", "--overlay", "--cell-boundaries"]) == 0
    cells = tifffile.imread(tmp_path / "page0-cells.tif")
    assert cells.shape == (512, 512) and cells.dtype == np.uint32
    found, true = len(np.unique(cells[cells > 0])), int(scores.segment_cells(labels[0] > 0).max())
    assert 0.7 * true < found < 1.3 * true, (found, true)
    overlay = np.asarray(Image.open(tmp_path / "page0-cells.png"))
    assert overlay.shape == (512, 512, 3)
    submission = tifffile.imread(tmp_path / "page0-cells-boundaries.tif")  # 1 = cell, 0 = between two cells
    np.testing.assert_array_equal(submission, ~scores.label_boundaries(cells))
    assert scores.cell_scores(cells, labels[0])["v_rand"] == pytest.approx(
        scores.challenge_scores(submission, labels[0], thresholds=[0.5])["v_rand"])  # the challenge sees the cells
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'page0-cells.tif'} (multicut; cells per page: {found})" in out


def test_cell_options_without_cells_or_on_zarr_are_refused(tmp_path, unet_path, capsys):
    source = tiff(tmp_path / "page.tif", picture((32, 32)))
    assert predict.main([str(source), "--model", str(unet_path), "--overlay"]) == 1
    assert "--overlay and --cell-boundaries draw the cells: add --cells" in capsys.readouterr().err
    assert predict.main([str(source), "--model", str(unet_path), "--cells", "--overlay", "--out",
                         str(tmp_path / "x.zarr")]) == 1
    assert "--overlay and --cell-boundaries are for TIFF output" in capsys.readouterr().err
    assert not list(tmp_path.glob("*-cells*")) and not (tmp_path / "x.zarr").exists()


def test_cells_of_a_zarr_prediction_are_cut_page_by_page_and_a_rerun_skips_them(isbi_dir, tmp_path, capsys):
    import zarr

    images, _ = data.load_isbi(isbi_dir)
    source = tiff(tmp_path / "two.tif", images[[0, 10], :256, :256])
    out = tmp_path / "two.zarr"
    assert predict.main([str(source), "--out", str(out), "--cells", "--method", "threshold", "--block", "256"]) == 0
    cells = zarr.open_array(str(tmp_path / "two-cells.zarr"), mode="r")
    probabilities = zarr.open_array(str(out), mode="r")
    assert cells.shape == (2, 256, 256) and cells.dtype == np.uint32
    for page in range(2):  # threshold: the 4-connected components of the stored map
        import scores

        np.testing.assert_array_equal(cells[page], scores.segment_cells(probabilities[page] > 0.5))
    assert "2 pages computed, 0 skipped" in capsys.readouterr().out
    assert predict.main([str(source), "--out", str(out), "--cells", "--method", "threshold", "--block", "256"]) == 0
    assert "0 pages computed, 2 skipped" in capsys.readouterr().out


# ---------------------------------------------------------------- nothing lost

SMALL = ["--tile", "64", "--overlap", "16"]


def one_error_line(capsys, *fragments) -> str:
    """Return the error line on stderr, after checking that there is one, holding `fragments`, and no traceback
    (progress bars may come before it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    return lines[0]


def test_an_output_that_would_replace_an_input_is_refused_before_any_work(tmp_path, unet_path, capsys):
    import zarr

    page = tiff(tmp_path / "page.tif", picture((32, 32)))
    before = page.read_bytes()
    (tmp_path / "link.tif").symlink_to(page)
    cells_named = tiff(tmp_path / "b-cells.tif", picture((32, 32), seed=1))
    model = ["--model", str(unet_path), *SMALL]
    for argv in ([str(page), "--out", str(page), "--cells"],  # the prediction over its image
                 [str(page), "--out", str(tmp_path / "link.tif")],  # through a link
                 [str(cells_named), "--out", str(tmp_path / "b.tif"), "--cells"]):  # the cells over the image
        assert predict.main([*argv, *model]) == 1
        one_error_line(capsys, "would overwrite the input")
    assert page.read_bytes() == before and not (tmp_path / "b.tif").exists()
    volume = tmp_path / "v-cells.zarr"
    zarr.create_array(str(volume), data=picture((1, 32, 32)))
    assert predict.main([str(volume), "--out", str(tmp_path / "v.zarr"), "--cells", *model]) == 1
    one_error_line(capsys, "v-cells.zarr: this output would overwrite the input")
    assert not (tmp_path / "v.zarr").exists()  # refused before predicting


def test_a_folder_predicted_twice_takes_only_its_own_images_again(tmp_path, unet_path, capsys):
    folder = tmp_path / "pages"
    folder.mkdir()
    tiff(folder / "stack.tif", picture((2, 32, 48)))
    Image.fromarray(picture((40, 40), seed=1)).save(folder / "page.png")
    argv = [str(folder), "--model", str(unet_path), *SMALL, "--cells", "--method", "threshold", "--overlay",
            "--png", "--mask-tiff", "--cell-boundaries"]
    assert predict.main(argv) == 0
    first = sorted(p.name for p in folder.iterdir())
    assert "stack-prediction-1.png" in first and "page-cells.png" in first and "stack-cells-boundaries.tif" in first
    capsys.readouterr()
    assert predict.main(argv) == 0
    assert "predicting 2 image(s)" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == first
    assert [p.name for p in predict.image_files([folder])] == ["page.png", "stack.tif"]
    assert not predict.is_own_output("cells-prediction-x.tif") and not predict.is_own_output("prediction.tif")


def test_the_mutex_watershed_of_a_membrane_model_is_refused_before_predicting(tmp_path, unet_path, capsys):
    page = tiff(tmp_path / "page.tif", picture((32, 32)))
    model = ["--model", str(unet_path), *SMALL, "--cells", "--method", "mws"]
    assert predict.main([str(page), *model]) == 1
    one_error_line(capsys, "predicts a membrane map", "use --method multicut or threshold")
    assert predict.main([str(page), *model, "--out", str(tmp_path / "p.zarr")]) == 1
    one_error_line(capsys, "predicts a membrane map", "use --method multicut or threshold")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.tif"]


def affinity_model(folder, offsets: str = "1,3"):
    """Return a tiny untrained affinity U-Net saved in `folder` as a run's best.keras, beside the run's
    settings.json that records its `offsets` (distances)."""
    import json

    import affinities
    from model import build_unet

    folder.mkdir(parents=True, exist_ok=True)
    channels = len(affinities.parse_offsets(offsets))
    build_unet((None, None, 1), filters=2, out_channels=channels).save(folder / "best.keras")
    (folder / "settings.json").write_text(json.dumps({"target": "affinities", "offsets": offsets}))
    return folder / "best.keras"


def test_test_time_augmentation_of_an_affinity_model_moves_the_offsets_its_run_recorded(tmp_path, capsys):
    import affinities
    import zarr

    model_path = affinity_model(tmp_path / "run")
    page = tiff(tmp_path / "page.tif", picture((40, 48)))
    assert predict.main([str(page), "--model", str(model_path), *SMALL, "--tta", "--cells"]) == 0
    model = runtimes.load_model(model_path, precision="auto")
    offsets = affinities.parse_offsets("1,3")
    expected = affinities.cell_map(tiling.predict_image(model, picture((40, 48)), tiling=TileSettings(64, 16, tta=True),
                                                        offsets=offsets))
    np.testing.assert_allclose(tifffile.imread(tmp_path / "page-prediction.tif"), expected, atol=1e-5)
    assert "(mws;" in capsys.readouterr().out
    zarr_out = ["--out", str(tmp_path / "p.zarr")]
    assert predict.main([str(page), "--model", str(model_path), *SMALL, "--tta", *zarr_out]) == 0
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "p.zarr"), mode="r")[0], expected, atol=1e-5)


def test_zarr_cells_of_another_models_prediction_are_refused_not_kept(tmp_path, unet_path, capsys):
    import shutil

    import zarr

    from model import build_unet

    model = tmp_path / "model.keras"
    shutil.copy(unet_path, model)
    source = tiff(tmp_path / "two.tif", picture((2, 32, 32)))
    argv = [str(source), "--model", str(model), *SMALL, "--out", str(tmp_path / "two.zarr"), "--cells",
            "--method", "threshold"]
    assert predict.main(argv) == 0
    cells = zarr.open_array(str(tmp_path / "two-cells.zarr"), mode="r")[:]
    build_unet((None, None, 1), filters=4).save(model)  # retrained under the same name
    capsys.readouterr()
    assert predict.main(argv) == 1
    one_error_line(capsys, "two.zarr holds a prediction made with model_sha256=")
    shutil.rmtree(tmp_path / "two.zarr")  # as the message says
    assert predict.main(argv) == 1
    one_error_line(capsys, "two-cells.zarr holds a prediction made with prediction.model_sha256=")
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "two-cells.zarr"), mode="r")[:], cells)


def test_a_context_model_predicts_a_stack_with_neighbours_and_refuses_a_single_page(context_unet_path, tmp_path):
    stack = (picture((3, 64, 64), seed=5) * 255).astype(np.uint8)
    source = tiff(tmp_path / "stack.tif", stack)
    settings = TileSettings(tile=64, overlap=16)
    (target,) = predict.predict_files([source], context_unet_path, tiling=settings)
    model = runtimes.load_model(context_unet_path)
    expected = tiling.predict_stack(model, data.with_context(stack, 3), tiling=settings, progress=False)
    np.testing.assert_allclose(tifffile.imread(target), expected, atol=2e-3)  # the runtime may compute in bf16
    single = tiff(tmp_path / "page.tif", stack[0])
    with pytest.raises(files.DataError, match="one page, but the model sees 3 sections"):
        predict.predict_files([single], context_unet_path, tiling=settings)
