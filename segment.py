"""Segmentation: probability maps (1 = cell) or affinity maps (1 = same cell) to label images of cells.

    python segment.py probabilities.tif --out cells.tif                       # multicut, default parameters
    python segment.py probabilities.tif --method threshold --out cells.tif    # connected components at 0.5
    python segment.py probabilities.tif --params tuned.json --out cells.tif   # SegmentParams fields as JSON

Three methods, on python-elf (Beier et al. 2017, "Multicut brings automated neurite segmentation closer to
human performance"; Wolf et al. 2020, "The Mutex Watershed and its Objective"):
- threshold: the 4-connected components of probability > threshold, what the challenge's scoring does;
- multicut: superpixels from a distance-transform watershed of the boundary map, merged by a multicut;
- mws: the mutex watershed of affinities, whose long-range channels keep apart what a gap would join;
- lmc: a lifted multicut of affinities: multicut's superpixels and local edges, plus lifted edges between
  superpixels that a long-range channel compares (Keuper et al. 2015; Beier et al. 2017).
The parameters are tuned on validation pages (`tune`), never on the pages a score is reported for.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

import affinities
import cli
import files
import stitch
from data import normalize_images
from labels import renumbered, size_filtered
from hardware import available_cores
from scores import UNIFORM_CAUSES, cell_scores, label_boundaries, segment_cells, uniform_prediction

METHODS = ("threshold", "multicut", "mws", "lmc")
AFFINITY_METHODS = ("mws", "lmc")  # the methods that need affinities, not a probability map


@dataclass(frozen=True)
class SegmentParams:
    """The parameters of the three methods; each method reads only its own.

    threshold: cell where probability > threshold (threshold and multicut: the watershed's seeds grow from
        the distance to the pixels at or below it). sigma_seeds, sigma_weights: Gaussian smoothing (pixels)
        of the distance transform (seeds) and of the boundary map (watershed heights). min_size: superpixels
        (multicut) or segments (mws) smaller than this many pixels are merged into a neighbour.
        beta: the multicut's boundary bias, higher cuts more. strides: (y, x) subsampling of the mutex
        watershed's long-range edges; random_strides: keep a random one in strides[0] * strides[1] of them
        (seeded, so a page always gives the same cells) rather than those on a grid.
    """

    threshold: float = 0.5
    sigma_seeds: float = 2.0
    sigma_weights: float = 2.0
    min_size: int = 50
    beta: float = 0.4
    strides: tuple = (2, 2)
    random_strides: bool = False

    def __post_init__(self):
        if not 0.0 < _number("threshold", self.threshold) < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {_shown(self.threshold)}")
        for name in ("sigma_seeds", "sigma_weights"):
            if not 0.0 <= _number(name, getattr(self, name)) <= MAX_SIGMA:
                raise ValueError(f"{name} must be >= 0 and at most {MAX_SIGMA:g} (pixels), got "
                                 f"{_shown(getattr(self, name))}")
        if not _whole(self.min_size) or self.min_size < 0:
            raise ValueError(f"min_size must be a whole number of pixels >= 0, got {_shown(self.min_size)}")
        if not 0.0 < _number("beta", self.beta) < 1.0:
            raise ValueError(f"beta must lie in (0, 1), got {_shown(self.beta)}")
        listed = isinstance(self.strides, Sequence) and not isinstance(self.strides, str)
        strides = tuple(self.strides) if listed else ()
        if len(strides) != 2 or not all(_whole(s) and 0 < s <= MAX_STRIDE for s in strides):
            raise ValueError(f"strides must be two positive whole numbers (y, x), at most {MAX_STRIDE}, got "
                             f"{_shown(self.strides)}")
        object.__setattr__(self, "strides", tuple(int(s) for s in strides))  # a JSON list becomes a tuple
        if not isinstance(self.random_strides, (bool, np.bool_)):
            raise ValueError(f"random_strides must be true or false, got {_shown(self.random_strides)}")

    def as_dict(self) -> dict:
        """Return the parameters as a JSON-ready dict."""
        return {**dataclasses.asdict(self), "strides": list(self.strides)}

    @classmethod
    def from_dict(cls, values: Mapping) -> SegmentParams:
        """Return the parameters of a dict such as `as_dict` gives (missing fields take their defaults)."""
        _check_fields(values)
        return cls(**values)


MAX_SIGMA = 100.0  # pixels: far past any useful smoothing; the filter's cost grows with it (1e6: minutes a page)
MAX_STRIDE = 1 << 16  # pixels: past any page's side


def _shown(value) -> str:
    """Return `value` as an error message shows it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _whole(value) -> bool:
    """Return whether `value` is a whole number (an int, not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _number(name: str, value) -> float:
    """Return `value` as a float; ValueError naming the parameter if it is not a number (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {_shown(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer past a float's range
        return float("inf")


def _check_fields(names) -> None:
    """Raise ValueError naming any of `names` that is not a field of SegmentParams."""
    known = [field.name for field in dataclasses.fields(SegmentParams)]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown segmentation parameters {unknown}; known: {known}")


# Small grids (at most a few dozen combinations) for `tune`.
GRIDS = {
    "threshold": {"threshold": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)},
    "multicut": {"beta": (0.3, 0.4, 0.5, 0.6), "sigma_seeds": (1.0, 2.0, 3.0), "threshold": (0.3, 0.5)},
    "mws": {"min_size": (0, 25, 50, 100), "strides": ((1, 1), (2, 2)), "random_strides": (False, True)},
    "lmc": {"beta": (0.3, 0.4, 0.5, 0.6), "sigma_seeds": (1.0, 2.0, 3.0), "threshold": (0.3, 0.5)},
}


def threshold_cells(prob: np.ndarray, params: SegmentParams) -> np.ndarray:
    """Return the (H, W) uint32 cells of a probability map: 4-connected components of prob > threshold, 0 = membrane."""
    return segment_cells(prob > params.threshold).astype(np.uint32)


def _local_problem(prob: np.ndarray, params: SegmentParams):
    """Return (superpixels, their adjacency graph, its edges' costs) of a probability map, the multicut's local
    problem; None when no pixel reaches the threshold (nothing to grow seeds from)."""
    from elf.segmentation import features, multicut, watershed  # here: elf.segmentation loads scikit-learn (3 s)

    boundary = (1.0 - prob).astype(np.float32)
    # elf thresholds the boundary map: membrane where 1 - p > 1 - threshold, so threshold means what it means for
    # the threshold method (cell where p > threshold, up to p == threshold)
    membrane_level = 1.0 - params.threshold
    if not (boundary <= membrane_level).any():
        return None
    superpixels, _ = watershed.distance_transform_watershed(
        boundary, membrane_level, params.sigma_seeds, sigma_weights=params.sigma_weights, min_size=params.min_size)
    rag = features.compute_rag(superpixels)
    if rag.number_of_edges == 0:
        return superpixels, rag, None
    edge_features = features.compute_boundary_mean_and_length(rag, superpixels, boundary)
    return superpixels, rag, multicut.compute_edge_costs(edge_features[:, 0], edge_sizes=edge_features[:, 1],
                                                         beta=params.beta)


def _cells_of_nodes(rag, superpixels: np.ndarray, nodes) -> np.ndarray:
    """Return the (H, W) uint32 cells of a graph solution: each superpixel labelled by its node's component."""
    from elf.segmentation import features

    # + 1: the solver may call a component 0, which would read as "no cell"
    return renumbered(features.project_node_labels_to_pixels(rag, superpixels, np.asarray(nodes) + 1))


def multicut_cells(prob: np.ndarray, params: SegmentParams) -> np.ndarray:
    """Return the (H, W) uint32 cells of a probability map by watershed superpixels and a multicut (0 nowhere,
    unless no pixel reaches the threshold: then 0 everywhere)."""
    from elf.segmentation import multicut

    local = _local_problem(prob, params)
    if local is None or local[2] is None:
        return np.zeros(prob.shape, np.uint32) if local is None else renumbered(local[0])
    superpixels, rag, costs = local
    return _cells_of_nodes(rag, superpixels, multicut.multicut_kernighan_lin(rag, costs))


def _long_range_edges(superpixels: np.ndarray, affs: np.ndarray, offsets, rag, beta: float):
    """Return (costs added to the local edges, lifted edges (M, 2) int64, their costs) from the long-range
    channels of `affs`: per pair of superpixels they compare, the mean probability of a cut over every pair of
    pixels across, as a cost like a local edge's (`compute_edge_costs`, weighted by the number of pairs).
    Touching superpixels get it added to their local edge; others are joined by a lifted edge."""
    from elf.segmentation import multicut

    count = int(superpixels.max()) + 1
    keys, cuts = [], []
    for channel, (dy, dx) in enumerate(offsets):
        if max(abs(dy), abs(dx)) <= 1:
            continue
        height, width = superpixels.shape
        rows, cols = slice(max(-dy, 0), height - max(dy, 0)), slice(max(-dx, 0), width - max(dx, 0))
        first = superpixels[rows, cols].astype(np.int64)
        second = superpixels[max(-dy, 0) + dy : height - max(dy, 0) + dy, max(-dx, 0) + dx : width - max(dx, 0) + dx]
        across = first != second
        low, high = np.minimum(first, second)[across], np.maximum(first, second)[across]
        keys.append(low * count + high)
        cuts.append(1.0 - affs[rows, cols, channel][across])
    local = rag.uvIds().astype(np.int64)
    local_keys = local[:, 0] * count + local[:, 1]
    if not keys:
        return np.zeros(len(local)), np.zeros((0, 2), np.int64), np.zeros(0)
    keys, cuts = np.concatenate(keys), np.concatenate(cuts)
    unique, inverse, sizes = np.unique(keys, return_inverse=True, return_counts=True)
    means = np.clip(np.bincount(inverse, weights=cuts) / sizes, 1e-3, 1 - 1e-3)
    costs = multicut.compute_edge_costs(means, edge_sizes=sizes, beta=beta)
    added = np.zeros(len(local))
    is_local = np.isin(unique, local_keys)
    order = np.argsort(local_keys)
    added[order[np.searchsorted(local_keys[order], unique[is_local])]] = costs[is_local]
    uvs = np.stack([unique // count, unique % count], axis=1)[~is_local]
    return added, uvs, costs[~is_local]


def lifted_cells(affs: np.ndarray, params: SegmentParams, offsets=affinities.OFFSETS) -> np.ndarray:
    """Return the (H, W) uint32 cells of (H, W, K) affinities by a lifted multicut: the multicut's superpixels and
    local edges on the affinities' cell map, with the long-range channels' evidence (`_long_range_edges`)."""
    from elf.segmentation import lifted_multicut

    offsets = affinities.check_offsets(offsets)
    local = _local_problem(affinities.cell_map(affs), params)
    if local is None or local[2] is None:
        return np.zeros(affs.shape[:2], np.uint32) if local is None else renumbered(local[0])
    superpixels, rag, costs = local
    added, uvs, lifted_costs = _long_range_edges(superpixels, affs, offsets, rag, params.beta)
    costs = costs + added
    if len(uvs) == 0:
        from elf.segmentation import multicut

        return _cells_of_nodes(rag, superpixels, multicut.multicut_kernighan_lin(rag, costs))
    nodes = lifted_multicut.lifted_multicut_kernighan_lin(rag, costs, uvs, lifted_costs)
    return _cells_of_nodes(rag, superpixels, nodes)


MWS_TILE = 1024  # pixels: a larger page is cut tile by tile and stitched, so that memory stays bounded


def _mws_tile(affs: np.ndarray, params: SegmentParams, offsets) -> np.ndarray:
    """Return the (H, W) uint32 segments of one tile's (H, W, K) affinities by the mutex watershed, numbered from 1."""
    from elf.segmentation import mutex_watershed  # here: elf.segmentation loads scikit-learn (3 s)

    # elf takes channels first in the boundary convention (1 = cut), and overwrites them
    cuts = np.ascontiguousarray(1.0 - np.asarray(affs).transpose(2, 0, 1), dtype=np.float32)
    strides = list(params.strides)
    if params.random_strides:
        # elf's own randomised strides draw from an unseeded generator (a page's cells would change from run to
        # run). A repulsive edge of weight 0 comes last in the watershed's order, where it no longer decides
        # anything: a seeded draw of which long-range edges to keep, then all edges.
        keep = np.random.default_rng(0).random(cuts[2:].shape) < 1.0 / (strides[0] * strides[1])
        cuts[2:] *= keep
        strides = [1, 1]
    seg = mutex_watershed.mutex_watershed(cuts, [list(o) for o in offsets], strides)
    return renumbered(seg + 1)  # + 1: a segment may be numbered 0


def _mws_stitched(affs, params: SegmentParams, offsets, tile: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (the (H, W) segments, `_boundary_heights`) of a page larger than `tile`, cut by the mutex watershed in
    tiles with a halo as long as the longest offset, `workers` at a time, and stitched (stitch.py)."""
    halo = max(1, *(abs(side) for offset in offsets for side in offset))
    seg, heights = stitch.stitched(
        affs, lambda tile_affs: _mws_tile(tile_affs, params, offsets).astype(np.uint64),
        _heights, tile, halo, workers)  # the heights are exact inside a tile: its halo holds the row below
    return seg.astype(np.uint32), heights  # elf numbers the stitched segments 1..n already


def mws_cells(affs: np.ndarray, params: SegmentParams, offsets=affinities.OFFSETS,
              tile: int = MWS_TILE, workers: int | None = None) -> np.ndarray:
    """Return the (H, W) uint32 cells of (H, W, K) affinities (1 = same cell) by the mutex watershed; no 0 label.

    A page larger than `tile` pixels a side is cut in tiles and stitched (`_mws_stitched`): an 8192² page then
    needs a fraction of the memory of one pass (bench/mws_large.py). `affs` may be any array with numpy
    slicing (a zarr array is read tile by tile). The tiles are cut `workers` at a time (default: one per core this
    process may use)."""
    offsets = affinities.check_offsets(offsets)
    whole = max(affs.shape[:2]) <= tile
    if whole:
        seg, heights = _mws_tile(affs, params, offsets), None
    else:
        seg, heights = _mws_stitched(affs, params, offsets, tile, workers or available_cores())
    if params.min_size > 0:
        seg = size_filtered(seg, _boundary_heights(affs) if heights is None else heights, params.min_size)
    return seg


def _heights(affs: np.ndarray) -> np.ndarray:
    """Return the size filter's (H, W) heights of (H, W, K) affinities: 1 - `affinities.cell_map`."""
    return 1.0 - affinities.cell_map(affs)


def _boundary_heights(affs, rows: int = 1024) -> np.ndarray:
    """Return `_heights` of (H, W, K) affinities as float32 (H, W), `rows` rows at a time (each
    block with the row below it, whose "up" edge it needs), so that a zarr array is never read whole."""
    height = affs.shape[0]
    out = np.empty(affs.shape[:2], np.float32)
    for top in range(0, height, rows):
        block = np.asarray(affs[top : min(top + rows + 1, height)], dtype=np.float32)
        out[top : top + rows] = _heights(block)[: rows]
    return out


def _check_prediction(prediction: np.ndarray, method: str, offsets) -> tuple[np.ndarray, tuple | None]:
    """Return (prediction as float32, offsets checked or None) after checking values, method and channels."""
    if method not in METHODS:
        raise ValueError(f"unknown segmentation method {method!r}; choose one of {METHODS}")
    prediction = np.asarray(prediction, dtype=np.float32)
    if prediction.ndim not in (2, 3) or prediction.size == 0:
        raise ValueError(f"expected an (H, W) probability map or (H, W, K) affinities, got shape {prediction.shape}")
    if not np.isfinite(prediction).all():
        raise ValueError(f"prediction must lie in [0, 1], found {np.count_nonzero(~np.isfinite(prediction)):,} "
                         "NaN or infinite values")
    low, high = float(prediction.min()), float(prediction.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"prediction must lie in [0, 1] (1 = cell, or 1 = same cell), got values in [{low:g}, "
                         f"{high:g}]; divide 8-bit maps by 255")
    if prediction.ndim == 2:
        if method in AFFINITY_METHODS:
            raise ValueError(f"{method} needs (H, W, K) affinities, one channel per offset; got an (H, W) map of "
                             f"shape {prediction.shape}")
        return prediction, None
    if offsets is None and method not in AFFINITY_METHODS:
        if prediction.shape[-1] < 2:
            raise ValueError(f"affinities need at least the 2 nearest-neighbour channels, got shape {prediction.shape}")
        return prediction, None
    offsets = affinities.check_offsets(affinities.OFFSETS if offsets is None else offsets)
    if prediction.shape[-1] != len(offsets):
        raise ValueError(f"the affinities have {prediction.shape[-1]} channels but there are {len(offsets)} offsets "
                         f"({offsets})")
    return prediction, offsets


def _warn_if_uniform(prediction: np.ndarray) -> None:
    """Warn (UserWarning) when the page's map is uniform: there are no cells to separate in it."""
    cell_map = prediction if prediction.ndim == 2 else affinities.cell_map(prediction)
    cause = uniform_prediction(cell_map)
    if cause:
        warnings.warn(f"the map is uniform ({cause}): there are no cells to separate in it; "
                      f"{UNIFORM_CAUSES}", UserWarning, stacklevel=3)


def _segment_checked(prediction: np.ndarray, method: str, params: SegmentParams, offsets) -> np.ndarray:
    """Return `segment` of an already checked prediction."""
    if method == "mws":
        return mws_cells(prediction, params, offsets)
    if method == "lmc":
        return lifted_cells(prediction, params, offsets)
    prob = prediction if prediction.ndim == 2 else affinities.cell_map(prediction)
    return threshold_cells(prob, params) if method == "threshold" else multicut_cells(prob, params)


def segment(prediction: np.ndarray, method: str = "multicut", params: SegmentParams | None = None,
            offsets: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Return the (H, W) uint32 cells of one page, numbered 1..n (0 = membrane: threshold method, or no cell at all).

    Args:
        prediction: (H, W) probabilities, 1 = cell, or (H, W, K) affinities, 1 = same cell, in [0, 1].
            threshold and multicut reduce affinities to their cell map (`affinities.cell_map`).
        method: one of METHODS; mws needs affinities.
        params: SegmentParams (the defaults if None).
        offsets: the affinities' offsets (dy, dx), one per channel; affinities.OFFSETS if None.

    A uniform map (all cell, all membrane, one grey value) gives a UserWarning and still a label image.
    """
    params = SegmentParams() if params is None else params
    prediction, offsets = _check_prediction(prediction, method, offsets)
    _warn_if_uniform(prediction)
    return _segment_checked(prediction, method, params, offsets)


def segment_stack(predictions: np.ndarray, method: str = "multicut", params: SegmentParams | None = None,
                  offsets: Sequence[Sequence[int]] | None = None, progress: bool = False) -> np.ndarray:
    """Return the (N, H, W) uint32 cells of N pages, (N, H, W) probabilities or (N, H, W, K) affinities."""
    predictions = np.asarray(predictions)
    if predictions.ndim not in (3, 4):
        raise ValueError(f"expected (N, H, W) probabilities or (N, H, W, K) affinities, got shape {predictions.shape}")
    for page in predictions:
        _check_prediction(page, method, offsets)  # every page before the slow part
    pages = tqdm(predictions, desc=f"segment ({method})", unit="page", disable=not progress)
    return np.stack([segment(page, method, params, offsets) for page in pages])


def tune(predictions: np.ndarray, labels: np.ndarray, method: str = "multicut",
         grid: Mapping[str, Sequence] | None = None, offsets: Sequence[Sequence[int]] | None = None,
         progress: bool = False) -> tuple[SegmentParams, list[dict]]:
    """Return (the best SegmentParams, the table) of a grid search on labelled VALIDATION pages.

    Every combination of `grid` ({field: values}; GRIDS[method] if None; other fields keep their defaults)
    segments every page and is scored by `scores.cell_scores`. The table has one row per combination,
    its parameters and the mean "v_rand" and "v_info" over the pages, best mean V_rand first (ties keep the
    grid's order); the best is its first row.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim not in (3, 4) or labels.shape != predictions.shape[:3] or len(labels) == 0:
        raise ValueError(f"expected (N, H, W[, K]) predictions and (N, H, W) labels, N >= 1, got shapes "
                         f"{predictions.shape}, {labels.shape}")
    grid = dict(GRIDS.get(method, {}) if grid is None else grid)
    _check_fields(grid)
    if not grid or any(len(values) == 0 for values in grid.values()):
        raise ValueError(f"grid must give at least one value to each field, got {grid}")
    checked = [_check_prediction(page, method, offsets) for page in predictions]
    for page, _ in checked:
        _warn_if_uniform(page)
    combinations = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    rows = []
    for values in tqdm(combinations, desc=f"tune ({method})", unit="setting", disable=not progress):
        params = SegmentParams(**values)
        scores = [cell_scores(_segment_checked(page, method, params, page_offsets), label)
                  for (page, page_offsets), label in zip(checked, labels)]
        rows.append({**params.as_dict(), "v_rand": float(np.mean([s["v_rand"] for s in scores])),
                     "v_info": float(np.mean([s["v_info"] for s in scores]))})
    rows.sort(key=lambda row: -row["v_rand"])
    best = {field.name: rows[0][field.name] for field in dataclasses.fields(SegmentParams)}
    return SegmentParams.from_dict(best), rows


def overlay(image: np.ndarray, cells: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Return an (H, W, 3) uint8 picture of the cells in random colours (seeded) over the grey (H, W) `image`
    (integers scaled by their type's maximum, floats taken in [0, 1]), their outlines dark; label 0 stays grey."""
    image, cells = np.asarray(image), np.asarray(cells)
    if image.shape != cells.shape or image.ndim != 2:
        raise ValueError(f"image and cells must be 2-D of one shape, got {image.shape}, {cells.shape}")
    rgb = np.repeat(np.clip(normalize_images(image).astype(np.float64), 0.0, 1.0)[..., None], 3, axis=-1)
    ids, inverse = np.unique(cells, return_inverse=True)
    colour = np.random.default_rng(0).uniform(0.2, 1.0, (len(ids), 3))[inverse.reshape(cells.shape)]
    rgb = np.where((cells > 0)[..., None], (1.0 - alpha) * rgb + alpha * colour, rgb)
    rgb[label_boundaries(cells) & (cells > 0)] *= 0.3  # outlines: where touching cells meet
    return np.round(255 * rgb).astype(np.uint8)


# ------------------------------------------------------------------ command line

def read_probabilities(path: str | Path) -> np.ndarray:
    """Return a probability TIFF's pages as float32 (N, H, W); integer pages are divided by their type's maximum."""
    return normalize_images(files.read_stack(path))


def build_parser() -> argparse.ArgumentParser:
    """Return segment.py's command line."""
    parser = cli.parser(__doc__)
    parser.add_argument("source", help="a probability TIFF (1 = cell), one page or a stack, as predict.py writes")
    parser.add_argument("--out", required=True, help="the uint32 label TIFF to write (0 = membrane)")
    parser.add_argument("--method", choices=("threshold", "multicut"), default="multicut",
                        help="mws needs affinity maps: call segment.segment from Python")
    parser.add_argument("--params", help="a JSON file of SegmentParams fields (e.g. tuned on validation pages)")
    return parser


def read_params(path: str | Path) -> SegmentParams:
    """Return the SegmentParams in a JSON file of their fields; DataError naming the file if it holds other things."""
    try:
        values = json.loads(Path(path).read_bytes())
    except (ValueError, RecursionError) as err:  # not JSON (or not text), or nested past Python's limit
        raise files.DataError(f"{path}: not a JSON file ({files.error_reason(err)})") from err
    if not isinstance(values, dict):
        raise files.DataError(f"{path}: expected a JSON object of SegmentParams fields, found {type(values).__name__}")
    try:
        return SegmentParams.from_dict(values)
    except ValueError as err:
        raise files.DataError(f"{path}: {err}") from err


def run(args: argparse.Namespace) -> None:
    """Segment the TIFF the parsed command line names and write the label TIFF."""
    files.refuse_overwriting([args.out], [args.source, args.params])
    params = read_params(args.params) if args.params else SegmentParams()
    files.prepare_output(args.out)  # before the slow part
    labels = segment_stack(read_probabilities(args.source), args.method, params, progress=True)
    files.write_atomic(args.out, lambda part: tifffile.imwrite(part, labels, photometric="minisblack"))
    cells = [len(np.unique(page[page > 0])) for page in labels]
    print(f"wrote {args.out}: {len(labels)} page(s), {np.mean(cells):.0f} cells per page ({args.method})")


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
