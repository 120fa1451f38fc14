"""blocks.py: volumes predicted block by block into zarr equal the whole prediction, resume after an interruption,
refuse an output made with other settings, and run on a Dask cluster."""

import numpy as np
import pytest
import tifffile
import zarr

import blocks
import files
import predict
import runtimes
import tiling
from tiling import TileSettings, predict_stack

TILE, OVERLAP = 64, 16  # many tiles on the small pages below
TILING = TileSettings(TILE, OVERLAP, batch_size=3)
SETTINGS = dict(tiling=TILING, progress=False)


@pytest.fixture(scope="module")
def block_model(unet_path):
    return runtimes.load_model(unet_path, precision="auto")  # as predict_volume loads it (runtime keras in the tests)


@pytest.fixture(scope="module")
def volume():
    return np.random.default_rng(0).integers(0, 256, (2, 150, 230)).astype(np.uint8)


@pytest.fixture(scope="module")
def expected(block_model, volume):
    return tiling.predict_stack(block_model, volume, tiling=TILING, progress=False)


@pytest.fixture
def source(tmp_path, volume):
    path = tmp_path / "volume.zarr"
    zarr.create_array(str(path), data=volume, chunks=(1, 64, 64))
    return path


def read(path):
    return zarr.open_array(str(path), mode="r")[:]


# ---------------------------------------------------------------- regions

@pytest.mark.parametrize("size", [1, 2, 3, 5, 40])
@pytest.mark.parametrize("pad", [0, 1, 3, 39, 100])
def test_reflect_indices_equal_numpy_reflect_padding(size, pad):
    line = np.arange(size) * 10
    expected = np.pad(line, (pad, pad + 2), mode="reflect")
    np.testing.assert_array_equal(line[tiling.reflect_indices(-pad, size + pad + 2, size)], expected)


@pytest.mark.parametrize(
    "region", [((0, 150), (0, 230)), ((0, 1), (0, 1)), ((149, 150), (229, 230)), ((0, 48), (182, 230)),
               ((37, 101), (55, 56)), ((100, 150), (0, 100)), ((60, 61), (0, 230))],
)
def test_a_region_gets_the_values_of_the_whole_page_prediction(block_model, volume, expected, region):
    (y0, y1), (x0, x1) = region
    result = tiling.predict_region(block_model, volume[1], region, tiling=TILING)
    assert result.shape == (y1 - y0, x1 - x0) and result.dtype == np.float32
    np.testing.assert_allclose(result, expected[1, y0:y1, x0:x1], atol=1e-5)


def test_a_region_of_a_page_smaller_than_its_padding(block_model):
    page = np.random.default_rng(1).integers(0, 256, (5, 7)).astype(np.uint8)  # mirrored several times over
    whole = tiling.predict_image(block_model, page, tiling=TILING)
    np.testing.assert_allclose(tiling.predict_region(block_model, page, ((2, 5), (1, 4)), tiling=TILING),
                               whole[2:, 1:4], atol=1e-5)


def test_a_region_outside_the_page_is_refused(block_model, volume):
    with pytest.raises(ValueError, match="not inside the page"):
        tiling.predict_region(block_model, volume[0], ((0, 151), (0, 10)), tiling=TILING)
    with pytest.raises(ValueError, match="empty"):
        tiling.predict_region(block_model, volume[0], ((5, 5), (0, 10)), tiling=TILING)


# ---------------------------------------------------------------- volumes

@pytest.mark.parametrize("block", [48, 100])
def test_a_volume_predicted_block_by_block_equals_the_whole_prediction(unet_path, source, expected, tmp_path, block):
    target = tmp_path / "out.zarr"
    stats = blocks.predict_volume(unet_path, source, target, block=block, **SETTINGS)
    blocks_per_page = -(-150 // block) * -(-230 // block)
    assert stats["computed"] == stats["blocks"] == 2 * blocks_per_page and stats["skipped"] == 0
    out = zarr.open_array(str(target), mode="r")
    assert out.chunks == (1, block, block) and out.dtype == np.float32
    np.testing.assert_allclose(out[:], expected, atol=1e-5)


def test_a_numpy_volume_and_uint8_output(unet_path, volume, expected, tmp_path):
    target = tmp_path / "out.zarr"
    blocks.predict_volume(unet_path, volume, target, block=100, uint8=True, **SETTINGS)
    result = read(target)
    assert result.dtype == np.uint8
    assert np.abs(result.astype(int) - tiling.to_uint8(expected)).max() <= 1  # rounding at exactly .5


def test_an_interrupted_prediction_resumes_with_the_blocks_left(unet_path, source, expected, tmp_path):
    target = tmp_path / "out.zarr"
    done = []

    def stop_after_three(index):
        done.append(index)
        if len(done) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        blocks.predict_volume(unet_path, source, target, block=100, on_block=stop_after_three, **SETTINGS)
    stats = blocks.predict_volume(unet_path, source, target, block=100, on_block=done.append, **SETTINGS)
    assert stats == {**stats, "blocks": 12, "computed": 9, "skipped": 3}
    assert sorted(done) == blocks.block_layout((2, 150, 230), 100)  # each block once
    np.testing.assert_allclose(read(target), expected, atol=1e-5)

    again = blocks.predict_volume(unet_path, source, target, block=100, **SETTINGS)
    assert (again["computed"], again["skipped"]) == (0, 12)


def test_a_block_without_its_marker_is_predicted_again(unet_path, source, expected, tmp_path):
    target = tmp_path / "out.zarr"
    blocks.predict_volume(unet_path, source, target, block=100, **SETTINGS)
    out = zarr.open_array(str(target), mode="r+")
    out[1, 100:150, 200:230] = 0  # as if a write had been cut off
    (target / blocks.DONE_FOLDER / "1_1_2").unlink()
    stats = blocks.predict_volume(unet_path, source, target, block=100, **SETTINGS)
    assert (stats["computed"], stats["skipped"]) == (1, 11)
    np.testing.assert_allclose(read(target), expected, atol=1e-5)


@pytest.mark.parametrize("change, saved_as", [
    (dict(tiling=TileSettings(128, OVERLAP, 3)), "tile"), (dict(tiling=TileSettings(TILE, 8, 3)), "overlap"),
    (dict(tiling=TileSettings(TILE, OVERLAP, 3, tta=True)), "tta"), (dict(block=50), "block"),
    (dict(uint8=True), "dtype"),
])
def test_resuming_with_other_settings_is_refused(unet_path, source, tmp_path, change, saved_as):
    target = tmp_path / "out.zarr"
    settings = {**SETTINGS, "block": 100}
    with pytest.raises(KeyboardInterrupt):  # one block written
        blocks.predict_volume(unet_path, source, target, on_block=_interrupt, **settings)
    with pytest.raises(ValueError, match=f"holds a prediction made with {saved_as}="):
        blocks.predict_volume(unet_path, source, target, **{**settings, **change})


def _interrupt(index):
    raise KeyboardInterrupt


def test_another_input_into_the_same_output_is_refused(unet_path, source, volume, tmp_path):
    target = tmp_path / "out.zarr"
    blocks.predict_volume(unet_path, source, target, block=100, **SETTINGS)
    other = tmp_path / "other.zarr"
    zarr.create_array(str(other), data=volume[:1])
    with pytest.raises(ValueError, match="made with source="):
        blocks.predict_volume(unet_path, other, target, block=100, **SETTINGS)


def test_the_blocks_run_on_a_dask_cluster(unet_path, source, expected, tmp_path):
    with blocks.dask_client(workers=2) as client:  # what `predict.py ... --workers 2` runs on
        target = tmp_path / "out.zarr"
        stats = blocks.predict_volume(unet_path, str(source), target, block=100, client=client, **SETTINGS)
        assert (stats["computed"], stats["skipped"]) == (12, 0)
        loads = client.run(lambda: blocks.cached_model.cache_info().misses)
        assert sorted(loads.values()) in ([1, 1], [0, 1])  # at most once per worker
        with pytest.raises(ValueError, match="path"):
            blocks.predict_volume(unet_path, np.zeros((1, 8, 8)), tmp_path / "x.zarr", client=client, **SETTINGS)
    # Other processes, other thread counts: in bfloat16 oneDNN's sums round differently (seen: 1.4e-4).
    np.testing.assert_allclose(read(target), expected, atol=1e-3)


# ---------------------------------------------------------------- inputs

def test_open_volume_reads_zarr_arrays_groups_and_tiffs(tmp_path, volume):
    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    group.create_array("raw", data=volume)
    assert blocks.open_volume(tmp_path / "group.zarr").shape == volume.shape
    group.create_array("labels", data=volume)
    with pytest.raises(files.DataError, match="2 arrays \\(labels, raw\\); name one"):
        blocks.open_volume(tmp_path / "group.zarr")
    np.testing.assert_array_equal(blocks.open_volume(tmp_path / "group.zarr" / "raw")[1, 3:5], volume[1, 3:5])

    tifffile.imwrite(tmp_path / "page.tif", volume[0], photometric="minisblack")
    page = blocks.open_volume(tmp_path / "page.tif")
    assert blocks.volume_shape(page) == (1, 150, 230)
    np.testing.assert_array_equal(blocks.PageView(page, 0)[10:20, 5:9], volume[0, 10:20, 5:9])


def test_open_volume_explains_bad_inputs(tmp_path):
    with pytest.raises(files.DataError, match="missing.zarr: no such file"):
        blocks.open_volume(tmp_path / "missing.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(files.DataError, match="empty.zarr: not a readable zarr array"):
        blocks.open_volume(tmp_path / "empty.zarr")
    (tmp_path / "text.tif").write_text("not a TIFF")
    with pytest.raises(files.DataError, match="text.tif: not a readable TIFF"):
        blocks.open_volume(tmp_path / "text.tif")
    tifffile.imwrite(tmp_path / "colour.tif", np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(files.DataError, match="colour.tif: expected grey pages"):
        blocks.open_volume(tmp_path / "colour.tif")
    (tmp_path / "page.png").write_bytes(b"")
    with pytest.raises(files.DataError, match="expected a .zarr array or a TIFF"):
        blocks.open_volume(tmp_path / "page.png")
    zarr.create_array(str(tmp_path / "4d.zarr"), shape=(1, 2, 3, 4), dtype="uint8")
    with pytest.raises(files.DataError, match="expected grey pages"):
        blocks.open_volume(tmp_path / "4d.zarr")


# ---------------------------------------------------------------- command line

def test_command_line_predicts_a_tiff_into_zarr_and_resumes(tmp_path, unet_path, volume, expected, capsys):
    tifffile.imwrite(tmp_path / "volume.tif", volume, photometric="minisblack")
    args = [str(tmp_path / "volume.tif"), "--model", str(unet_path), "--tile", "64", "--overlap", "16",
            "--out", str(tmp_path / "out.zarr"), "--block", "100"]
    assert predict.main(args) == 0
    assert "out.zarr: 12 blocks computed, 0 skipped" in capsys.readouterr().out
    np.testing.assert_allclose(read(tmp_path / "out.zarr"), expected, atol=1e-5)
    assert predict.main(args) == 0
    assert "out.zarr: 0 blocks computed, 12 skipped" in capsys.readouterr().out
    assert predict.main([*args, "--tile", "128"]) == 1
    assert "made with tile=64, not 128" in capsys.readouterr().err


def test_command_line_runtime_reaches_a_zarr_prediction(tmp_path, unet_path, volume, monkeypatch, capsys):
    asked = []
    load = runtimes.load_for_prediction
    monkeypatch.setattr(runtimes, "load_for_prediction", lambda path, runtime=None: asked.append(runtime)
                        or load(path, runtime))
    tifffile.imwrite(tmp_path / "volume.tif", volume, photometric="minisblack")
    assert predict.main([str(tmp_path / "volume.tif"), "--model", str(unet_path), "--tile", "64", "--overlap", "16",
                         "--out", str(tmp_path / "out.zarr"), "--runtime", "keras"]) == 0
    assert asked and set(asked) == {"keras"}


def test_command_line_writes_a_zarr_input_beside_it(tmp_path, unet_path, source, capsys):
    assert predict.main([str(source), "--model", str(unet_path), "--tile", "64", "--overlap", "16", "--uint8"]) == 0
    assert read(tmp_path / "volume-prediction.zarr").dtype == np.uint8


def test_command_line_explains_zarr_errors(tmp_path, unet_path, source, capsys):
    model = ["--model", str(unet_path)]
    (tmp_path / "page.png").write_bytes(b"")
    assert predict.main([str(tmp_path / "page.png"), *model, "--out", str(tmp_path / "out.zarr")]) == 1
    assert "zarr output needs .zarr or TIFF inputs" in capsys.readouterr().err
    tifffile.imwrite(tmp_path / "page.tif", np.zeros((8, 8), np.uint8))
    assert predict.main([str(tmp_path / "page.tif"), *model, "--workers", "2"]) == 1
    assert "--workers is for zarr output" in capsys.readouterr().err
    assert predict.main([str(source), *model, "--workers", "1", "--dask", "tcp://localhost:1"]) == 1
    assert "not both" in capsys.readouterr().err
    assert predict.main([str(source), *model, "--block", "0"]) == 1
    assert "--block must be a positive" in capsys.readouterr().err
    assert predict.main([str(source), str(tmp_path / "page.tif"), *model, "--out", str(tmp_path / "o.zarr")]) == 1
    assert "one zarr array, but there are 2 inputs" in capsys.readouterr().err


def test_cells_record_their_prediction_and_refuse_one_of_another_model(unet_path, source, tmp_path):
    import shutil

    from model import build_unet

    prediction, cells = tmp_path / "out.zarr", tmp_path / "cells.zarr"
    blocks.predict_volume(unet_path, source, prediction, block=100, **SETTINGS)
    blocks.segment_volume(prediction, cells, "threshold", progress=False)
    assert zarr.open_array(str(cells), mode="r").attrs[blocks.SETTINGS_KEY]["prediction"]["model_sha256"] == \
        files.sha256(unet_path)
    again = blocks.segment_volume(prediction, cells, "threshold", progress=False)
    assert (again["computed"], again["skipped"]) == (0, 2)  # the same prediction: resumed
    other = tmp_path / "other.keras"
    build_unet((None, None, 1), filters=2).save(other)
    shutil.rmtree(prediction)
    blocks.predict_volume(other, source, prediction, block=100, **SETTINGS)
    with pytest.raises(ValueError, match="cells.zarr holds a prediction made with prediction.model="):
        blocks.segment_volume(prediction, cells, "threshold", progress=False)


# ---------------------------------------------------------------- models

def test_a_savedmodel_folder_is_taken_alike_by_predict_and_blocks(unet_path, volume, tmp_path, capsys):
    import export

    saved = export.write_savedmodel(runtimes.load_model(unet_path), tmp_path / "tiny-savedmodel")
    page = tmp_path / "page.tif"
    tifffile.imwrite(page, volume[0], photometric="minisblack")
    assert predict.main([str(page), "--model", str(saved), "--tile", str(TILE), "--overlap", str(OVERLAP),
                         "--out", str(tmp_path / "page-prediction.tif")]) == 0
    stats = blocks.predict_volume(saved, volume[:1], tmp_path / "page.zarr", block=100, **SETTINGS)
    assert stats["computed"] == 6
    np.testing.assert_allclose(read(tmp_path / "page.zarr")[0], tifffile.imread(tmp_path / "page-prediction.tif"),
                               atol=1e-6)
    recorded = blocks.made_with(zarr.open_array(str(tmp_path / "page.zarr"), mode="r"))
    assert recorded["model"] == str(saved.resolve()) and recorded["model_sha256"] == blocks.model_digest(saved)
    # a folder that holds no SavedModel: both refuse it with the resolver's words
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no such model file"):
        predict.predict_files([page], tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="empty: no such model file"):
        blocks.predict_volume(tmp_path / "empty", volume, tmp_path / "other.zarr", **SETTINGS)


def test_a_retrained_savedmodel_gets_another_digest(unet_path, tmp_path):
    import export

    from model import build_unet

    first = export.write_savedmodel(runtimes.load_model(unet_path), tmp_path / "first")
    other = export.write_savedmodel(build_unet((None, None, 1), filters=3), tmp_path / "other")
    assert blocks.model_digest(first) != blocks.model_digest(other)
    assert blocks.model_digest(unet_path) == files.sha256(unet_path)


def test_a_context_model_predicts_each_zarr_page_with_its_neighbours(context_unet_path, tmp_path):
    import data

    stack = np.random.default_rng(4).integers(0, 256, (3, 48, 40), dtype=np.uint8)
    zarr.open(str(tmp_path / "in.zarr"), mode="w", shape=stack.shape, dtype="uint8")[:] = stack
    settings = TileSettings(32, 8)
    blocks.predict_volume(context_unet_path, str(tmp_path / "in.zarr"), tmp_path / "out.zarr", block=24,
                          tiling=settings, progress=False)
    model = runtimes.load_model(context_unet_path, precision="auto")  # as predict_volume loads it
    expected = predict_stack(model, data.with_context(data.normalize_images(stack), 3), tiling=settings, progress=False)
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[:], expected, atol=1e-5)
    with pytest.raises(ValueError, match="neighbouring sections"):  # one page has no neighbours
        blocks.predict_volume(context_unet_path, stack[0], tmp_path / "one.zarr", progress=False)


def test_an_affinity_zarr_keeps_its_affinities_and_is_cut_by_the_mutex_watershed(tmp_path):
    import affinities
    import segment
    from test_predict import affinity_model

    model_path = affinity_model(tmp_path / "run")
    stack = np.random.default_rng(5).integers(0, 256, (2, 40, 48), dtype=np.uint8)
    settings = TileSettings(32, 8)
    blocks.predict_volume(model_path, stack, tmp_path / "affs.zarr", block=32, tiling=settings, affinities=True,
                          progress=False)
    stored = zarr.open_array(str(tmp_path / "affs.zarr"), mode="r")
    offsets = affinities.parse_offsets("1,3")
    expected = predict_stack(runtimes.load_model(model_path, precision="auto"), stack.astype(np.float32) / 255, tiling=settings,
                             offsets=offsets, progress=False)
    assert stored.shape == (2, 40, 48, 4) and stored.attrs["prediction"]["offsets"] == [list(o) for o in offsets]
    np.testing.assert_allclose(stored[:], expected, atol=1e-5)
    params = segment.SegmentParams(min_size=10)
    blocks.segment_volume(tmp_path / "affs.zarr", tmp_path / "cells.zarr", "mws", params, progress=False)
    cells = zarr.open_array(str(tmp_path / "cells.zarr"), mode="r")[:]
    for page, expected_page in zip(cells, expected):
        np.testing.assert_array_equal(page, segment.mws_cells(expected_page, params, offsets))
    page = blocks.AffinityPage(stored, 1)  # a page larger than the tiles: read in strips of its chunks' rows
    assert page.chunks == (32, 32, 4)
    np.testing.assert_array_equal(segment.mws_cells(page, params, offsets, tile=16),
                                  segment.mws_cells(np.asarray(page), params, offsets, tile=16))
    with pytest.raises(ValueError, match="holds affinities: cut it with mws"):
        blocks.segment_volume(tmp_path / "affs.zarr", tmp_path / "other.zarr", "multicut", progress=False)
