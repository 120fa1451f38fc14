"""Predict cell probabilities for EM images of any size with a trained U-Net.

    python predict.py test-volume.tif                        # writes test-volume-prediction.tif beside it
    python predict.py images/ page.png --model runs/cpu/best.keras --out predictions/
    python predict.py big.tif --tile 256 --overlap 64 --tta --uint8
    python predict.py --challenge --out submission/test-volume-prediction.tif   # the challenge's submission
    python predict.py page.png --png                         # also page-prediction.png, a 0/255 mask
    python predict.py stack.tif --mask-tiff                  # also stack-prediction-mask.tif, 0/255 masks
    python predict.py big.zarr --block 1024 --workers 4      # block by block into big-prediction.zarr (blocks.py)
    python predict.py stack.tif --cells --overlay            # also stack-cells.tif (uint32 labels) and a picture
    python predict.py --challenge --cells --cell-boundaries  # a submission made of the cells

Images are cut into overlapping tiles as in the U-Net paper (Ronneberger et
al. 2015, Fig. 2): the borders are extrapolated by mirroring, each tile is
predicted on its own, and the tile predictions are blended with a smooth
window so that no seams show. The output is a multipage TIFF of float32
probabilities of "cell" (1) against membrane (0), the size of the input.
With --cells the cells themselves are written too, as a uint32 label image
(segment.py: multicut on a membrane map, mutex watershed on affinities,
with the parameters tuned for the model and kept in its card).
A .zarr input or output (larger than memory, resumable, optionally on a Dask
cluster) is predicted block by block into a zarr array: see blocks.py.
"""

from __future__ import annotations

import cli

if __name__ == "__main__":
    cli.quiet_native_logs()  # before TensorFlow loads

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import cards
import data
import files
import runtimes
import scores
import segment
from files import TIFF_SUFFIXES, ZARR_SUFFIX, PathLike, is_zarr
from outputs import (CELLS_SUFFIX, PREDICTION_SUFFIX, OutputSettings, cells_path, output_path, write_cell_boundaries,
                     write_cells, write_mask_tiff, write_masks, write_overlay, write_prediction)
from tiling import DEFAULT_BATCH_SIZE, DEFAULT_OVERLAP, DEFAULT_TILE, TileSettings, predict_stack

IMAGE_SUFFIXES = TIFF_SUFFIXES + (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
OWN_ENDINGS = (PREDICTION_SUFFIX, PREDICTION_SUFFIX + "-mask", CELLS_SUFFIX, CELLS_SUFFIX + "-boundaries")


# ---------------------------------------------------------------- reading and writing

def read_image(path: PathLike) -> np.ndarray:
    """Return the grey pages of one image file (multipage TIFF, PNG, ...) as (pages, H, W) in the file's dtype."""
    path = Path(path)
    if not path.is_file():
        raise files.DataError(f"{path}: file not found")
    pages = files.read_stack(path) if path.suffix.lower() in TIFF_SUFFIXES else files.read_picture(path)
    files.check_float_range(pages, str(path))
    return pages


def is_own_output(path: PathLike) -> bool:
    """Return whether a file's name is one this script gives what it writes: <stem>-prediction, its masks
    (-prediction-mask, -prediction-<page>), the cells (-cells, their picture, -cells-boundaries)."""
    stem = Path(path).stem
    head, _, page = stem.rpartition("-")
    return stem.endswith(OWN_ENDINGS) or (page.isascii() and page.isdigit() and head.endswith(PREDICTION_SUFFIX))


def image_files(paths: Sequence[PathLike]) -> list[Path]:
    """Return the image files named by `paths`: files as given, folders as their images sorted by name.

    Files in a folder named as this script's outputs (`is_own_output`) are
    left out, so that a second run does not predict predictions or cells.
    """
    chosen = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not is_own_output(p)
            )
            if not found:
                raise files.DataError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            chosen.extend(found)
        elif path.is_file():
            chosen.append(path)
        else:
            raise files.DataError(f"{path}: no such file or folder")
    return chosen


def read_images(paths: Sequence[PathLike]) -> list[tuple[str, np.ndarray]]:
    """Return (file name, pages) for every image named by `paths` (files or folders); pages are (N, H, W)."""
    return [(str(path), read_image(path)) for path in image_files(paths)]


def warn_if_uniform(name: str, probabilities: np.ndarray) -> str | None:
    """Warn (UserWarning) naming the likely causes if a prediction is empty or uniform; return the message or None."""
    problem = scores.uniform_prediction(probabilities)
    if problem is None:
        return None
    message = f"{name}: the prediction is (nearly) uniform: {problem}; {scores.UNIFORM_CAUSES}"
    warnings.warn(message, UserWarning, stacklevel=2)
    return message


# ---------------------------------------------------------------- the job

def runtime_line(chosen: dict) -> str:
    """Return the line that says which runtime predicts, and why."""
    seconds = ", ".join(f"{name} {value:.3f} s" for name, value in chosen.get("seconds", {}).items())
    why = f" (per 576x576 tile: {seconds}{'; measured before on this machine' if chosen['cached'] else ''})" \
        if seconds else ""
    return f"runtime: {chosen['runtime']}{why}"


def _silent(line: str) -> None:
    """Say nothing (the default of the jobs' `say`)."""


def _cutting(model_path: Path, io: cards.ModelIO, method: str | None):
    """Return (method, params, offsets) to cut the outputs of the model `io` describes into cells
    (`cards.ModelIO.segmentation`), checked before anything is predicted."""
    how, params, offsets = io.segmentation(model_path, method)
    if how in segment.AFFINITY_METHODS and not io.is_affinities:
        raise ValueError(f"{model_path} predicts a membrane map, which {how} cannot cut: it needs an affinity "
                         "model; use --method multicut or threshold")
    return how, params, offsets


def _zarr_cutting(model_path: Path, method: str | None) -> tuple[str, segment.SegmentParams]:
    """Return (method, params) to cut a zarr prediction into cells: `method`, else the card's. The mutex watershed
    cuts the affinities the zarr then keeps (`blocks.predict_volume(affinities=True)`), threshold and multicut a
    cell map; ValueError for the mutex watershed of a membrane model and for the lifted multicut."""
    io = cards.model_io(model_path)
    if method == "mws" and not io.is_affinities:
        raise ValueError(f"--method mws cuts affinities, and {model_path} predicts a membrane map: use --method "
                         "multicut or threshold")
    how, params, _ = io.segmentation(model_path, method)
    if how == "lmc":
        raise ValueError("the lifted multicut cuts a whole page's affinities in memory; for zarr output use --method "
                         "mws or multicut, or predict to TIFF")
    return how, params


def _refuse_shared_outputs(targets: list[Path], what: str) -> None:
    """Raise ValueError if two inputs would be written to the same output `what` (file, array)."""
    repeated = {str(t) for t in targets if targets.count(t) > 1}
    if repeated:
        raise ValueError(f"two inputs would write the same {what} ({', '.join(sorted(repeated))}); predict them apart")


def _tiff_targets(names: list[str], out: PathLike | None) -> list[Path]:
    """Return where the prediction TIFF of each image goes: `out` when it is a .tif name (one image only), else
    `output_path` in folder `out`; ValueError when two images would share one."""
    if out is not None and Path(out).suffix.lower() in TIFF_SUFFIXES:
        if len(names) != 1:
            raise ValueError(f"--out {out} is a file name, but there are {len(names)} input images; give a folder")
        return [Path(out)]
    targets = [output_path(name, out) for name in names]
    _refuse_shared_outputs(targets, "file")
    return targets


def _zarr_targets(inputs: Sequence[PathLike], out: PathLike | None) -> list[Path]:
    """Return where the zarr prediction of each input goes: `out` when it is a .zarr name (one input only), else
    `output_path` in folder `out`; ValueError when two inputs would share one."""
    if out is not None and is_zarr(out):
        if len(inputs) != 1:
            raise ValueError(f"--out {out} is one zarr array, but there are {len(inputs)} inputs; give a folder")
        return [Path(out)]
    targets = [output_path(path, out, ZARR_SUFFIX) for path in inputs]
    _refuse_shared_outputs(targets, "array")
    return targets


def _write_cells(target: Path, pages: np.ndarray, outputs: np.ndarray, cutting, output: OutputSettings,
                 say: Callable[[str], None]) -> None:
    """Cut the model's `outputs` of `pages` into cells as `cutting` says, write them (and their overlay and
    boundaries if `output` asks) beside `target`, and say what was written."""
    how, params, offsets = cutting
    labels = segment.segment_stack(outputs, how, params, offsets)
    count = ", ".join(str(len(np.unique(page[page > 0]))) for page in labels[:5])
    say(f"wrote {write_cells(target, labels)} ({how}; cells per page: {count}" + (", ..." if len(labels) > 5 else "")
        + ")")
    if output.overlay:
        say(f"wrote {write_overlay(target, pages[0], labels[0])}")
    if output.boundaries:
        say(f"wrote {write_cell_boundaries(target, labels)}")


def _write_outputs(name: str, pages: np.ndarray, outputs: np.ndarray, target: Path, io: cards.ModelIO,
                   output: OutputSettings, cutting, say: Callable[[str], None]) -> None:
    """Write what `output` asks of the model's `outputs` for the image `name` (its `pages`) beside `target`."""
    probabilities = io.cell_map(outputs)
    pages_out = probabilities if len(probabilities) > 1 else probabilities[0]  # one page: a 2-D TIFF
    write_prediction(target, pages_out, output.uint8)
    warn_if_uniform(name, probabilities)
    if output.png:
        for path in write_masks(target, probabilities):
            say(f"wrote {path}")
    if output.mask_tiff:
        say(f"wrote {write_mask_tiff(target, pages_out)}")
    if output.cells:
        _write_cells(target, pages, outputs, cutting, output, say)
    say(f"wrote {target} ({len(pages)} page(s) of {pages.shape[1]}x{pages.shape[2]}, "
        f"{'uint8 0-255' if output.uint8 else 'float32 probabilities'})")


def _check_sections(images: list[tuple[str, np.ndarray]], context: int) -> None:
    """Raise DataError if a model that sees `context` sections at once is given a single page (no neighbours)."""
    single = [name for name, pages in images if len(pages) < 2]
    if context > 1 and single:
        raise files.DataError(f"{single[0]}: one page, but the model sees {context} sections at once (each page "
                              "with its neighbours in the stack); give the stack, a multipage TIFF")


def predict_files(
    inputs: Sequence[PathLike],
    model_path: PathLike | None = None,
    *,
    out: PathLike | None = None,
    tiling: TileSettings = TileSettings(),
    output: OutputSettings = OutputSettings(),
    runtime: str | None = None,
    say: Callable[[str], None] | None = None,
) -> list[Path]:
    """Predict every image named by `inputs` (files or folders) and write one TIFF each; return their paths.

    `tiling`: how images are cut into tiles (`tiling.TileSettings`). `output`: what else is written beside each
    prediction (`OutputSettings`): the 0/255 masks (threshold 0.5), the cells (`segment.segment`, a uint32
    `-cells.tif`), a `-cells.png` picture of the first page's and their boundary map `-cells-boundaries.tif`
    (a challenge submission of the cells). An affinity model's prediction TIFF holds its cell map
    (`cards.ModelIO.cell_map`). `runtime`: keras, onnx, or auto (the faster on this machine,
    `runtimes.load_for_prediction`; None: its default). A prediction that is (nearly) uniform gets a warning
    naming the likely causes. `say` receives a line per step and per file written (the command line prints them).

    `out` is a folder for the predictions (default: beside each input), or a
    .tif/.tiff file name when there is exactly one input image. Before anything is predicted, an output that
    would replace an input (`files.refuse_overwriting`) and a method that cannot cut the model's output are refused.
    """
    model_path = runtimes.resolve_model(model_path)
    images = read_images(inputs)
    _check_sections(images, cards.model_io(model_path).context)
    targets = _tiff_targets([name for name, _ in images], out)
    files.refuse_overwriting([path for (_, pages), target in zip(images, targets)
                              for path in output.paths(target, len(pages))],
                             [*(name for name, _ in images), model_path])
    say = say or _silent
    model, chosen = runtimes.load_for_prediction(model_path, runtime)
    say(runtime_line(chosen))
    io = cards.model_io(model_path, model)
    cutting = _cutting(model_path, io, output.method) if output.cells else None
    say(f"predicting {len(images)} image(s) with {model_path}: {tiling.describe()}")
    for (name, pages), target in zip(images, targets):
        outputs = predict_stack(model, data.with_context(pages, io.context), tiling=tiling, desc=Path(name).name,
                                offsets=io.offsets)
        _write_outputs(name, pages, outputs, target, io, output, cutting, say)
    return targets


def predict_volumes(
    inputs: Sequence[PathLike],
    model_path: PathLike | None = None,
    *,
    out: PathLike | None = None,
    tiling: TileSettings = TileSettings(),
    uint8: bool = False,
    cells: bool = False,
    method: str | None = None,
    block: int | None = None,
    workers: int | None = None,
    dask: str | None = None,
    runtime: str | None = None,
    say: Callable[[str], None] | None = None,
) -> list[Path]:
    """Predict each .zarr or TIFF input block by block into a zarr array (`blocks.predict_volume`); return their paths.

    With `cells` each prediction is then cut into cells page by page (`blocks.segment_volume`, resumable too)
    into `<stem>-cells.zarr` beside it, by `method` (else the model card's): threshold or multicut on the
    stored cell map, or the mutex watershed on the stored affinities of an affinity model.

    `out` is a folder (default: beside each input, as `<stem>-prediction.zarr`), or a .zarr name when there is
    one input. With `workers` (a local cluster of that many processes) or `dask` (a scheduler's address) the
    blocks run on Dask.
    `say` receives a line per step and per array written. An output that would replace an input, and a method
    the model's output cannot take, are refused before anything is predicted.
    """
    import blocks

    model_path = runtimes.resolve_model(model_path)
    block = blocks.DEFAULT_BLOCK if block is None else block
    if block < 1:
        raise ValueError(f"--block must be a positive number of pixels, got {block}")
    for path in map(Path, inputs):
        if not (is_zarr(path) or path.suffix.lower() in TIFF_SUFFIXES):
            raise files.DataError(f"{path}: zarr output needs .zarr or TIFF inputs; predict other images to TIFF")
        blocks.open_volume(path)  # readable, grey
    targets = _zarr_targets(inputs, out)
    files.refuse_overwriting([*targets, *(cells_path(t, ZARR_SUFFIX) for t in targets if cells)],
                             [*inputs, model_path])
    how, params = _zarr_cutting(model_path, method) if cells else (None, None)
    say = say or _silent
    say(f"predicting {len(inputs)} volume(s) with {model_path}: blocks {block}, {tiling.describe()}")
    with blocks.dask_client(workers, dask) as client:
        for source, target in zip(inputs, targets):
            target.parent.mkdir(parents=True, exist_ok=True)
            stats = blocks.predict_volume(model_path, str(source), target, block=block, tiling=tiling, uint8=uint8,
                                          affinities=how == "mws", client=client, runtime=runtime)
            say(f"wrote {target}: {stats['computed']} blocks computed, {stats['skipped']} skipped, "
                f"{stats['seconds']:.1f} s")
            if cells:
                labels = cells_path(target, ZARR_SUFFIX)
                done = blocks.segment_volume(target, labels, how, params)
                say(f"wrote {labels} ({how}): {done['computed']} pages computed, {done['skipped']} skipped, "
                    f"{done['seconds']:.1f} s")
    return targets


def build_parser() -> argparse.ArgumentParser:
    """Return predict.py's command line."""
    parser = cli.parser(__doc__)
    add = parser.add_argument
    add("inputs", nargs="*", metavar="INPUT", help="image files (TIFF, PNG, ...) or folders of them")
    add("--challenge", action="store_true",
        help=f"predict the challenge's {data.TEST_FILE} (found as the training data are) for submission")
    add("--data-dir", help="with --challenge: the folder holding the ISBI stacks")
    add("--model", help=f"a .keras file saved by train.py, or an export of one (.onnx, bioimage.io .zip, SavedModel "
                       f"folder; see export.py) (default: {runtimes.DEFAULT_MODEL.relative_to(runtimes.PROJECT_DIR)})")
    add("--out", help="folder for the predictions (default: beside each input), or a .tif file name")
    add("--tile", type=int, default=DEFAULT_TILE, help="tile side in pixels, a multiple of 16 (default %(default)s)")
    add("--overlap", type=int, default=DEFAULT_OVERLAP, help="pixels shared by neighbouring tiles (default %(default)s)")
    add("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="tiles per model call (default %(default)s)")
    add("--tta", action="store_true", help="average over the 8 flips and quarter turns of each tile (8x slower)")
    add("--uint8", action="store_true", help="write 0-255 uint8 instead of float32 probabilities")
    add("--png", action="store_true", help="also write a 0/255 PNG mask per page (threshold 0.5)")
    add("--mask-tiff", action="store_true", help="also write the 0/255 masks (threshold 0.5) as <name>-mask.tif")
    add("--cells", action="store_true", help="also write the cells as a uint32 label image <name>-cells.tif")
    add("--method", choices=segment.METHODS,
        help="with --cells: how to cut the prediction into cells (default: the model card's, else multicut for "
             "a membrane model and mws for an affinity model)")
    add("--overlay", action="store_true", help="with --cells: also <name>-cells.png, the first page's cells in colour")
    add("--cell-boundaries", action="store_true",
        help="with --cells: also <name>-cells-boundaries.tif, float32 1 = cell, 0 = boundary (a challenge submission)")
    add("--runtime", choices=runtimes.RUNTIMES,
        help="what runs a .keras model: keras, onnx (onnxruntime on a cached conversion), or auto (default: the "
             f"faster on this machine, timed once and remembered; ${runtimes.RUNTIME_ENV} sets the default)")
    volumes = parser.add_argument_group("zarr output, block by block (a .zarr input or --out NAME.zarr)")
    volumes.add_argument("--block", type=int, help="block side in pixels, also the output's chunks (default 1024)")
    volumes.add_argument("--workers", type=int, metavar="N",
                         help="predict the blocks on a local Dask cluster of N processes")
    volumes.add_argument("--dask", metavar="ADDRESS",
                         help="predict the blocks on the Dask scheduler at this address (its scheduler and workers "
                              "need this project on PYTHONPATH, see blocks.py)")
    return parser


def run(args: argparse.Namespace) -> None:
    """Predict what the parsed command line names."""
    if args.challenge:
        args.inputs = [*args.inputs, data.find_data_dir(args.data_dir) / data.TEST_FILE]
    if not args.inputs:
        raise ValueError("no input: name image files or folders, or use --challenge")
    tiling = TileSettings(args.tile, args.overlap, args.batch_size, args.tta)
    if any(is_zarr(path) for path in [*args.inputs, args.out or ""]):
        if args.png or args.mask_tiff or args.overlay or args.cell_boundaries:
            raise ValueError("--png, --mask-tiff, --overlay and --cell-boundaries are for TIFF output; a zarr "
                             "output can be thresholded or drawn later")
        predict_volumes(args.inputs, args.model, out=args.out, tiling=tiling, uint8=args.uint8,
                        cells=args.cells, method=args.method, block=args.block, workers=args.workers, dask=args.dask,
                        runtime=args.runtime, say=print)
        return
    for flag in ("block", "workers", "dask"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag} is for zarr output: give a .zarr input or --out NAME.zarr")
    output = OutputSettings(args.uint8, args.png, args.mask_tiff, args.cells, args.method, args.overlay,
                            args.cell_boundaries)
    if args.out and Path(args.out).suffix.lower() in TIFF_SUFFIXES:
        files.prepare_output(args.out)
    predict_files(args.inputs, args.model, out=args.out, tiling=tiling, output=output, runtime=args.runtime,
                  say=print)


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
