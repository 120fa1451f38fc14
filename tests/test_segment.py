"""segment.py: probability and affinity maps to cells, on synthetic pages whose cells are known."""

import json
import re
import warnings

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segment
from affinities import OFFSETS, cells_of, label_affinities
from scores import cell_scores, segment_cells
from segment import GRIDS, SegmentParams


def grid_label(shape=(96, 96), step=32, gap=False) -> np.ndarray:
    """Return a binary label (255 = cell) of a grid of cells between 3-pixel membranes; with `gap`, a 6-pixel
    hole in the membrane between the first two cells of the first column."""
    label = np.full(shape, 255, np.uint8)
    for start in range(step - 2, max(shape), step):
        label[start : start + 3, :] = 0
        label[:, start : start + 3] = 0
    if gap:
        label[step - 2 : step + 1, 10:16] = 255
    return label


def probability(label, seed=0) -> np.ndarray:
    """Return a probability map of a label: 0.95 in cells, 0.05 on membranes, with mild noise."""
    rng = np.random.default_rng(seed)
    return np.clip(np.where(label > 0, 0.95, 0.05) + rng.normal(0, 0.03, label.shape), 0, 1)


def same_partition(a, b) -> bool:
    """Return whether two label images cut the pixels the same way, whatever their numbers."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(pairs[0]) == len(np.unique(a)) == len(np.unique(b))


def test_multicut_separates_two_cells_that_threshold_merges_across_a_membrane_gap():
    truth = grid_label()
    prob = probability(grid_label(gap=True))
    by_threshold = cell_scores(segment.segment(prob, "threshold"), truth)
    by_multicut = cell_scores(segment.segment(prob, "multicut"), truth)
    assert by_threshold["cells"] == truth_cells(truth) - 1
    assert by_threshold["rand_merge"] < 1.0
    assert by_multicut["cells"] == truth_cells(truth)
    assert by_multicut["v_rand"] > by_threshold["v_rand"]


def truth_cells(label) -> int:
    return int(segment_cells(label).max())


def test_threshold_is_the_connected_components_of_the_map():
    prob = probability(grid_label(gap=True))
    cells = segment.segment(prob, "threshold", SegmentParams(threshold=0.6))
    assert cells.dtype == np.uint32
    np.testing.assert_array_equal(cells, segment_cells(prob > 0.6))


def test_mws_on_exact_affinities_returns_the_cells_up_to_renumbering():
    label = grid_label()
    cells = segment.segment(label_affinities(label), "mws", SegmentParams(min_size=0, strides=(1, 1)))
    assert cells.dtype == np.uint32 and cells.min() == 1
    assert same_partition(cells, cells_of(label))


def test_mws_keeps_cells_apart_where_only_the_nearest_neighbour_affinities_miss_a_membrane():
    label = grid_label()
    affs = label_affinities(label)
    gap = affs[24:40, 5:20, :2]  # across the membrane between the first two cells of the first column
    gap[gap == 0] = 0.8  # the nearest-neighbour channels miss the membrane there; the long-range ones do not
    cells = segment.segment(affs, "mws")
    assert same_partition(cells, cells_of(label))
    merged = segment.segment(affs, "threshold")  # the nearest-neighbour channels alone join them
    assert cell_scores(merged, label)["cells"] == truth_cells(label) - 1


def test_random_strides_keep_the_cells_and_give_the_same_cells_every_run():
    label = grid_label()
    affs = label_affinities(label)
    noisy = np.clip(affs + np.random.default_rng(2).normal(0, 0.3, affs.shape), 0, 1).astype(np.float32)
    params = SegmentParams(min_size=0, strides=(3, 3), random_strides=True)
    assert same_partition(segment.segment(affs, "mws", params), cells_of(label))
    first = segment.segment(noisy, "mws", params)
    np.testing.assert_array_equal(segment.segment(noisy, "mws", params), first)
    grid = segment.segment(noisy, "mws", SegmentParams(min_size=0, strides=(3, 3)))
    assert not np.array_equal(first, grid)  # another set of long-range edges: other cells on a noisy page


def test_multicut_segments_affinities_through_their_nearest_neighbour_channels():
    label = grid_label()
    affs = np.clip(label_affinities(label) + np.random.default_rng(1).normal(0, 0.03, (96, 96, 8)), 0, 1)
    scores = cell_scores(segment.segment(affs, "multicut"), label)
    assert scores["cells"] == truth_cells(label)
    assert scores["v_rand"] > 0.99


def test_mws_drops_segments_below_min_size_into_their_neighbours():
    label = grid_label()
    affs = label_affinities(label)
    affs[50:53, 50:53] = 0.0  # a 3x3 island cut off from everything
    assert len(np.unique(segment.segment(affs, "mws", SegmentParams(min_size=0)))) > truth_cells(label)
    assert same_partition(segment.segment(affs, "mws", SegmentParams(min_size=20)), cells_of(label))


@pytest.mark.parametrize(
    "prediction, method, match",
    [
        (np.full((16, 16), 1.5), "multicut", r"must lie in \[0, 1\].*1\.5"),
        (np.full((16, 16), -0.1), "threshold", r"must lie in \[0, 1\]"),
        (np.where(np.eye(16) > 0, np.nan, 0.5), "multicut", r"must lie in \[0, 1\].*16 NaN"),
        (np.full((16, 16, 4), 0.5), "mws", "4 channels but there are 8 offsets"),
        (np.full((16, 16), 0.5), "mws", r"mws needs \(H, W, K\) affinities"),
        (np.full((16, 16), 0.5), "watershed", "unknown segmentation method 'watershed'"),
        (np.full((16,), 0.5), "multicut", "shape"),
    ],
)
def test_bad_predictions_are_refused_with_a_clear_error(prediction, method, match):
    with pytest.raises(ValueError, match=match):
        segment.segment(prediction, method)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("threshold", 1.0, r"threshold must lie in \(0, 1\)"),
        ("threshold", 0.0, r"threshold must lie in \(0, 1\)"),
        ("sigma_seeds", -1.0, "sigma_seeds must be >= 0"),
        ("sigma_weights", float("nan"), "sigma_weights must be >= 0"),
        ("min_size", -5, "min_size must be a whole number"),
        ("min_size", 2.5, "min_size must be a whole number"),
        ("beta", 1.2, r"beta must lie in \(0, 1\)"),
        ("strides", (0, 2), "strides must be two positive whole numbers"),
        ("strides", (2,), "strides must be two positive whole numbers"),
    ],
)
def test_parameters_out_of_range_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        SegmentParams(**{field: value})


def test_parameters_go_through_json_and_refuse_unknown_keys():
    params = SegmentParams(threshold=0.3, beta=0.6, strides=(1, 3))
    assert SegmentParams.from_dict(json.loads(json.dumps(params.as_dict()))) == params
    with pytest.raises(ValueError, match=r"unknown segmentation parameters \['sigma'\]"):
        SegmentParams.from_dict({"sigma": 2.0})


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("method", ["threshold", "multicut"])
def test_a_uniform_map_warns_and_still_gives_a_label_image(value, method):
    with pytest.warns(UserWarning, match="uniform.*likely causes"):
        cells = segment.segment(np.full((64, 64), value), method)
    assert cells.shape == (64, 64) and cells.dtype == np.uint32
    assert len(np.unique(cells)) == 1  # one cell, or none


def test_a_map_with_cells_does_not_warn():
    label = grid_label()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        segment.segment(probability(label), "multicut")
        segment.segment(label_affinities(label), "mws")


@pytest.mark.parametrize("method", ["threshold", "multicut"])
def test_tune_scores_every_combination_of_its_grid_best_first(method):
    labels = np.stack([grid_label(), grid_label(step=24)])
    predictions = np.stack([probability(grid_label(gap=True), 0), probability(labels[1], 1)])
    best, table = segment.tune(predictions, labels, method)
    grid = GRIDS[method]
    assert len(table) == int(np.prod([len(values) for values in grid.values()]))
    combinations = {tuple(row[name] for name in grid) for row in table}
    assert len(combinations) == len(table)
    assert [row["v_rand"] for row in table] == sorted((row["v_rand"] for row in table), reverse=True)
    assert all(getattr(best, name) in values for name, values in grid.items())
    assert best.as_dict() == {name: table[0][name] for name in best.as_dict()}
    assert 0.0 < table[-1]["v_rand"] <= table[0]["v_rand"] <= 1.0 and "v_info" in table[0]


def test_tune_refuses_an_unknown_grid_field_and_mismatched_labels():
    label = grid_label()
    with pytest.raises(ValueError, match="unknown segmentation parameters"):
        segment.tune(probability(label)[None], label[None], "multicut", grid={"alpha": (0.1,)})
    with pytest.raises(ValueError, match="shapes"):
        segment.tune(probability(label)[None], label[None, :50], "multicut")


def test_segment_stack_gives_uint32_pages_for_maps_and_affinities():
    label = grid_label()
    probs = np.stack([probability(label, seed) for seed in range(3)])
    assert segment.segment_stack(probs, "threshold").shape == (3, 96, 96)
    cells = segment.segment_stack(probs, "multicut")
    assert cells.dtype == np.uint32 and cells.shape == (3, 96, 96)
    affs = np.stack([label_affinities(label)] * 2)
    cells = segment.segment_stack(affs, "mws", offsets=OFFSETS)
    assert cells.dtype == np.uint32 and cells.shape == (2, 96, 96)


@pytest.mark.parametrize("image", [np.full((96, 96), 128, np.uint8), np.full((96, 96), 0.5)])
def test_overlay_colours_the_cells_and_leaves_membranes_grey(image):
    cells = segment_cells(grid_label())
    picture = segment.overlay(image, cells)
    assert picture.shape == (96, 96, 3) and picture.dtype == np.uint8
    assert np.all(picture[cells == 0] == 128)
    assert len(np.unique(picture[cells > 0].reshape(-1, 3), axis=0)) == cells.max()
    with pytest.raises(ValueError, match="shape"):
        segment.overlay(image[:50], cells)


def test_command_line_writes_a_uint32_label_tiff(tmp_path, capsys):
    source = tmp_path / "probabilities.tif"
    tifffile.imwrite(source, np.round(255 * np.stack([probability(grid_label())] * 2)).astype(np.uint8))
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"beta": 0.5}))
    out = tmp_path / "cells.tif"
    assert segment.main([str(source), "--out", str(out), "--params", str(params)]) == 0
    cells = tifffile.imread(out)
    assert cells.dtype == np.uint32 and cells.shape == (2, 96, 96)
    assert cells.max() == truth_cells(grid_label())
    assert "cells per page" in capsys.readouterr().out


def test_command_line_refuses_bad_input_with_one_line_and_writes_nothing(tmp_path, capsys):
    source = tmp_path / "probabilities.tif"
    tifffile.imwrite(source, np.full((2, 16, 16), 3.0, np.float32))
    out = tmp_path / "cells.tif"
    assert segment.main([str(source), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "[0, 1]" in err[0]
    assert not out.exists()


# ---------------------------------------------------------------- the command line's parameters and files

def error_lines(capsys) -> list[str]:
    """Return the error lines on stderr, after checking that it holds no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("content, message", [
    ({"threshold": "0.5"}, "threshold must be a number, got '0.5'"),
    ({"beta": None}, "beta must be a number, got None"),
    ({"sigma_seeds": True}, "sigma_seeds must be a number, got True"),
    ({"sigma_weights": 1e6}, "sigma_weights must be >= 0 and at most 100 (pixels)"),
    ({"min_size": 2.5}, "min_size must be a whole number"),
    ({"min_size": None}, "min_size must be a whole number"),
    ({"strides": "22"}, "strides must be two positive whole numbers"),
    ({"strides": [1, None]}, "strides must be two positive whole numbers"),
    ({"threshold": 10 ** 400}, "threshold must lie in (0, 1)"),
    ([0.5], "expected a JSON object of SegmentParams fields, found list"),
    ("{not json", "not a JSON file"),
])
def test_parameters_of_the_wrong_type_or_file_are_refused_with_one_line(tmp_path, capsys, content, message):
    source = tmp_path / "probabilities.tif"
    tifffile.imwrite(source, probability(grid_label()).astype(np.float32))
    params = tmp_path / "params.json"
    params.write_text(content if isinstance(content, str) else json.dumps(content))
    out = tmp_path / "cells.tif"
    assert segment.main([str(source), "--out", str(out), "--params", str(params)]) == 1
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"error: {params}: ") and message in lines[0], lines
    assert not out.exists()
    if isinstance(content, dict):
        with pytest.raises(ValueError, match=re.escape(message.split(",")[0])):
            SegmentParams(**content)


def test_an_output_over_the_map_or_the_parameters_is_refused(tmp_path, capsys):
    source = tmp_path / "probabilities.tif"
    tifffile.imwrite(source, probability(grid_label()).astype(np.float32))
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"beta": 0.5}))
    before = source.read_bytes(), params.read_bytes()
    for out in (source, params):
        assert segment.main([str(source), "--out", str(out), "--params", str(params)]) == 1
        lines = error_lines(capsys)
        assert len(lines) == 1 and f"{out}: this output would overwrite the input {out}" in lines[0]
    assert (source.read_bytes(), params.read_bytes()) == before


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
FIELD_VALUES = JSON_VALUES | st.floats(-1, 120) | st.integers(-3, 400) | st.lists(st.integers(-1, 4), max_size=3)
PARAMS_FILES = st.one_of(
    st.dictionaries(st.sampled_from([*segment.SegmentParams.__dataclass_fields__, "alpha"]), FIELD_VALUES,
                    max_size=4).map(json.dumps),
    JSON_VALUES.map(json.dumps),
    st.binary(max_size=40))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(content=PARAMS_FILES, method=st.sampled_from(["threshold", "multicut"]))
def test_any_params_file_segments_or_gives_one_error_line(tmp_path, capsys, content, method):
    source = tmp_path / "probabilities.tif"
    if not source.exists():
        tifffile.imwrite(source, np.stack([probability(grid_label((40, 48), step=16))] * 2).astype(np.float32))
    params, out = tmp_path / "params.json", tmp_path / "cells.tif"
    params.write_bytes(content.encode() if isinstance(content, str) else content)
    out.unlink(missing_ok=True)
    code = segment.main([str(source), "--out", str(out), "--params", str(params), "--method", method])
    lines = error_lines(capsys)
    if code == 0:
        assert not lines and tifffile.imread(out).shape == (2, 40, 48)
    else:
        assert code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {params}: ") and not out.exists()


def test_a_page_larger_than_the_tile_is_cut_in_tiles_and_stitched_into_the_same_cells(isbi_dir, tmp_path):
    import zarr

    import data
    from affinities import cell_map

    label = data.binarize_labels(data.load_isbi(isbi_dir)[1][5])[:320, :288]
    noisy = np.clip(label_affinities(label) + np.random.default_rng(0).normal(0, 0.1, (320, 288, 8)), 0, 1)
    noisy = noisy.astype(np.float32)
    params = SegmentParams(min_size=20)
    whole = segment.mws_cells(noisy, params)
    tiled = segment.mws_cells(noisy, params, tile=128)  # 3 x 3 tiles with a 27-pixel halo
    assert cell_scores(whole, label)["v_rand"] > 0.97
    assert cell_scores(tiled, label)["v_rand"] > cell_scores(whole, label)["v_rand"] - 0.01
    assert tiled.min() == 1 and len(np.unique(tiled)) == tiled.max()
    stored = zarr.open(str(tmp_path / "affs.zarr"), mode="w", shape=noisy.shape, chunks=(64, 64, 8), dtype="f4")
    stored[:] = noisy
    np.testing.assert_array_equal(segment.mws_cells(stored, params, tile=128), tiled)  # read tile by tile
    for workers in (1, 3):  # tiles cut one at a time or several in threads: the same cells
        np.testing.assert_array_equal(segment.mws_cells(stored, params, tile=128, workers=workers), tiled)
    np.testing.assert_allclose(segment._boundary_heights(noisy, rows=7), 1 - cell_map(noisy), atol=1e-6)
    _, heights = segment._mws_stitched(stored, params, OFFSETS, 128, 2)  # the size filter's, from the tiles
    np.testing.assert_array_equal(heights, segment._boundary_heights(noisy))


def test_the_lifted_multicut_keeps_apart_cells_whose_faint_membrane_only_long_range_edges_see():
    truth = cells_of(grid_label())
    affs = label_affinities(grid_label())
    faint = affs[25:36, :30, :2]
    faint[faint == 0] = 0.7  # the nearest-neighbour channels barely see the wall between the first two cells
    params = SegmentParams(min_size=0, threshold=0.8)  # superpixels still stop at the faint wall
    assert same_partition(segment.segment(affs, "lmc", params), truth)
    merged = segment.segment(affs, "multicut", params)  # the cell map alone: the faint wall joins the two cells
    assert len(np.unique(merged)) == len(np.unique(truth)) - 1
    with pytest.raises(ValueError, match="lmc needs"):
        segment.segment(probability(grid_label()).astype(np.float32), "lmc")
