"""Score a trained model on the held-out pages of the ISBI training stack.

    python evaluate.py runs/cpu/best.keras                          # test pages 0, 10, 20
    python evaluate.py runs/cpu/best.keras --pages 5 15 25 --out scores.json --grid images/unet_results.png
    python evaluate.py my-probabilities.tif                         # a probability TIFF (1 = cell)
"""

from __future__ import annotations

import cli

if __name__ == "__main__":
    cli.quiet_native_logs()  # before TensorFlow loads

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

import cards
import data
import files
import runs
import runtimes
import segment
from files import TIFF_SUFFIXES
from scores import accuracy_np, cell_scores, challenge_scores, pixel_difference_np, pixel_error
from tiling import TileSettings, predict_stack


CELL_KEYS = ("v_rand", "rand_split", "rand_merge", "v_info", "info_split", "info_merge", "cells", "true_cells")


def score_page(label: np.ndarray, prediction: np.ndarray | None = None, cells: np.ndarray | None = None) -> dict:
    """Return one page's scores. Of a probability map (1 = cell): pixel difference (percent), accuracy
    (fraction), pixel error and the challenge's V_rand and V_info (best over the threshold sweep, with their
    thresholds). Of a cell label image: 'cell_v_rand', 'cell_v_info' with their split and merge parts
    (`scores.cell_scores`), 'cell_cells' predicted and 'cell_true_cells'."""
    label = np.squeeze(label)
    scores = {}
    if prediction is not None:
        prediction = np.squeeze(prediction)
        challenge = challenge_scores(prediction, label)
        scores.update({
            "pixel_difference": pixel_difference_np(label, prediction),
            "accuracy": accuracy_np(label, prediction),
            "pixel_error": pixel_error(prediction, label),
            "v_rand": challenge["v_rand"],
            "v_rand_threshold": challenge["v_rand_threshold"],
            "v_info": challenge["v_info"],
            "v_info_threshold": challenge["v_info_threshold"],
        })
    if cells is not None:
        found = cell_scores(cells, label)
        scores.update({f"cell_{key}": float(found[key]) for key in CELL_KEYS})
    return scores


def score_pages(labels: np.ndarray, predictions: np.ndarray | None = None, cells: np.ndarray | None = None) -> list[dict]:
    """Return `score_page` for each page of (N, H, W[, 1]) stacks of labels, probabilities and cells (either may be None)."""
    none = [None] * len(labels)
    return [score_page(y, p, c) for y, p, c in zip(labels, none if predictions is None else predictions,
                                                    none if cells is None else cells)]


def _predicted(source: str | Path, images: np.ndarray, pages: list[int], tiling: TileSettings,
               runtime: str | None) -> tuple[np.ndarray, cards.ModelIO]:
    """Return (`outputs_for`, what made them: the model's `cards.ModelIO`; for a TIFF, one map's)."""
    source = Path(source)
    if source.suffix.lower() not in TIFF_SUFFIXES:
        model, _ = runtimes.load_for_prediction(source, runtime)
        io = cards.model_io(source, model)
        inputs = data.with_context(images, io.context)[pages]  # each page with its neighbours in the stack
        return predict_stack(model, inputs, tiling=tiling, desc="predicting", offsets=io.offsets), io
    stack = files.read_stack(source)
    if stack.shape[1:] != images.shape[1:]:
        raise files.DataError(f"{source}: pages of {stack.shape[1:]} pixels, the labels have {images.shape[1:]}")
    if len(stack) == len(images):
        stack = stack[pages]
    elif len(stack) != len(pages):
        raise files.DataError(f"{source}: {len(stack)} pages; expected {len(images)} (the stack) or {len(pages)}")
    if stack.dtype == np.uint8:  # probabilities rounded to 0-255
        return data.normalize_images(stack), cards.ModelIO()
    return stack if np.issubdtype(stack.dtype, np.integer) else stack.astype(np.float32), cards.ModelIO()


def outputs_for(source: str | Path, images: np.ndarray, pages: list[int], *, tiling: TileSettings = TileSettings(),
                runtime: str | None = None) -> np.ndarray:
    """Return the model's outputs for `pages`: (len(pages), H, W) cell probabilities, or (len(pages), H, W, K)
    affinities; or a TIFF's pages, holding either every page of the stack or exactly the pages asked for
    (probabilities as float, or as uint8 0-255 as `predict.py --uint8` writes them; cells as other integer
    labels)."""
    return _predicted(source, images, pages, tiling, runtime)[0]


def cells_for(source: str | Path, outputs: np.ndarray, io: cards.ModelIO,
              method: str | None = None) -> tuple[np.ndarray, str]:
    """Return ((N, H, W) uint32 cells, the method) of the outputs of the model `io` describes, cut as its card
    says (`cards.ModelIO.segmentation`)."""
    how, params, offsets = io.segmentation(source, method)
    return segment.segment_stack(outputs, how, params, offsets), how


def model_for_results(run_dir: str | Path, tune_cells: bool = False, data_dir: str | Path | None = None) -> Path:
    """Return the model whose results to show: the run's best.keras, or the shipped model if the run has none.

    With `tune_cells` (a model of the ISBI stacks in `data_dir`), a run's model whose card does not say yet how
    to cut its output into cells has that chosen first on the validation pages (`tune`), as `make run` does.
    """
    best = runs.RunFolder(run_dir).best
    if best.is_file():
        card = cards.model_card(best) if cards.card_path(best).is_file() else {}
        if tune_cells and "segmentation" not in card:
            tune(best, data_dir)
        return best
    if not runtimes.DEFAULT_MODEL.is_file():
        raise FileNotFoundError(f"{best}: no trained model, and the shipped {runtimes.DEFAULT_MODEL} is missing too")
    shipped = runtimes.DEFAULT_MODEL.relative_to(runtimes.PROJECT_DIR)
    warnings.warn(f"{run_dir} holds no trained model: showing the shipped {shipped}", UserWarning, stacklevel=2)
    return runtimes.DEFAULT_MODEL


def scores_of(source: str | Path, pages: list, images: np.ndarray, labels: np.ndarray, predictions: np.ndarray | None,
              part: str = "test", cells: np.ndarray | None = None, method: str | None = None) -> dict:
    """Return {'source', 'part', 'pages', 'per_page', 'mean', 'images', 'labels', 'predictions', 'cells', 'method'}
    of (N, H, W) stacks; `predictions` (probabilities) or `cells` (labels) may be None."""
    per_page = score_pages(labels, predictions, cells)
    mean = {key: float(np.mean([page[key] for page in per_page])) for key in per_page[0] if "threshold" not in key}
    return {
        "source": str(source),
        "part": part,
        "pages": list(pages),
        "per_page": per_page,
        "mean": mean,
        "method": method,
        "images": images,
        "labels": labels,
        "predictions": predictions,
        "cells": cells,
    }


def _scores_of_outputs(source, pages, images, labels, outputs, io, part, method, with_cells) -> dict:
    """Return `scores_of` a model's or a TIFF's outputs: its probabilities, and its cells (cut here unless it is cells)."""
    if np.issubdtype(outputs.dtype, np.integer):  # a label image: cells only
        return scores_of(source, pages, images, labels, None, part, outputs, "given")
    cells, how = cells_for(source, outputs, io, method) if with_cells else (None, None)
    return scores_of(source, pages, images, labels, io.cell_map(outputs), part, cells, how)


def checked_pages(pages, count: int) -> list[int]:
    """Return `pages` as a list of ints; DataError unless there is one at least and each lies in 0..count - 1."""
    pages = [int(p) for p in pages]
    if not pages or min(pages) < 0 or max(pages) >= count:
        raise files.DataError(f"pages must lie in 0..{count - 1}, got {pages}")
    return pages


def evaluate(source: str | Path, data_dir: str | Path | None = None, pages=data.TEST_PAGES, *,
             tiling: TileSettings = TileSettings(), method: str | None = None, cells: bool = True,
             runtime: str | None = None) -> dict:
    """Return `scores_of` a model (.keras ...), a probability TIFF or a cell label TIFF against the labelled ISBI
    stack's `pages` (default: the test pages 0, 10, 20), a model's predicted with `tiling`; with `cells` the
    model's cells are cut and scored too (by `method`, default the model card's)."""
    raw_images, raw_labels = data.load_isbi(data_dir)
    pages = checked_pages(pages, len(raw_images))
    images = data.normalize_images(raw_images)
    labels = data.binarize_labels(raw_labels)[pages]
    outputs, io = _predicted(source, raw_images, pages, tiling, runtime)
    return _scores_of_outputs(source, pages, images[pages], labels, outputs, io, "test", method, cells)


def evaluate_held_out(source: str | Path, parts: dict, report: dict, *, tiling: TileSettings = TileSettings(),
                      method: str | None = None, cells: bool = True) -> dict:
    """Return `scores_of` a model on the pages held out of training by `train.load_data`: its 'test' part
    (the ISBI test pages) if there is one, else the 'validation' part (a lab's own data)."""
    part = "test" if "test" in parts else "validation"
    images, labels = (stack[..., 0] for stack in parts[part])
    model, _ = runtimes.load_for_prediction(source)
    io = cards.model_io(source, model)
    outputs = predict_stack(model, images, tiling=tiling, desc="predicting", offsets=io.offsets)
    return _scores_of_outputs(source, report["split_pages"][part], images, labels, outputs, io, part, method, cells)


def tune(source: str | Path, data_dir: str | Path | None = None, pages=data.VALIDATION_PAGES, *,
         method: str | None = None, runtime: str | None = None, tiling: TileSettings = TileSettings()) -> dict:
    """Choose the segmentation parameters of a model on the validation `pages` (`segment.tune`, never the test
    pages), predicted with `tiling`, and record them in its card (`cards.card_path`); return the card's
    'segmentation' entry."""
    raw_images, raw_labels = data.load_isbi(data_dir)
    pages = checked_pages(pages, len(raw_images))
    outputs, io = _predicted(source, raw_images, pages, tiling, runtime)
    how, _, offsets = io.segmentation(source, method)
    labels = data.binarize_labels(raw_labels)[pages]
    params, table = segment.tune(outputs, labels, how, offsets=offsets)
    best = max(table, key=lambda row: row["v_rand"])
    chosen = {"method": how, "params": params.as_dict(), "tuned_on": {"pages": pages, "v_rand": best["v_rand"],
                                                                      "v_info": best["v_info"]},
              "offsets": None if offsets is None else [list(o) for o in offsets]}
    card = cards.model_card(source) if cards.card_path(source).is_file() else {}
    card["segmentation"] = chosen
    files.write_atomic(cards.card_path(source), json.dumps(card, indent=2) + "\n")
    return chosen


def report(result: dict) -> str:
    """Return a small text table of the per-page and mean scores (of the probabilities and of the cells)."""
    lines = [f"{result['source']} on pages {result['pages']}:"]
    rows = list(zip(result["pages"], result["per_page"])) + [("mean", result["mean"])]
    if result.get("predictions") is not None:
        lines.append(f"{'page':>6} {'pixel diff %':>13} {'accuracy':>9} {'pixel error':>11} {'V_rand':>7} {'(thr)':>5} "
                     f"{'V_info':>7} {'(thr)':>5}")
        for page, s in rows:
            thresholds = [f"{s[k]:>5.1f}" if k in s else " " * 5 for k in ("v_rand_threshold", "v_info_threshold")]
            lines.append(
                f"{page:>6} {s['pixel_difference']:>13.2f} {s['accuracy']:>9.4f} {s['pixel_error']:>11.4f} "
                f"{s['v_rand']:>7.4f} {thresholds[0]} {s['v_info']:>7.4f} {thresholds[1]}"
            )
    if result.get("cells") is not None:
        lines.append(f"cells ({result.get('method')}):")
        lines.append(f"{'page':>6} {'V_rand':>7} {'split':>7} {'merge':>7} {'V_info':>7} {'split':>7} {'merge':>7} "
                     f"{'cells':>6} {'truth':>6}")
        for page, s in rows:
            lines.append(f"{page:>6} " + " ".join(f"{s['cell_' + k]:>7.4f}" for k in CELL_KEYS[:6])
                         + f" {s['cell_cells']:>6.0f} {s['cell_true_cells']:>6.0f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Return evaluate.py's command line."""
    parser = cli.parser(__doc__)
    parser.add_argument("source", help="a .keras model saved by train.py (or an export of one), a probability TIFF "
                                       "(float, 1 = cell) or a cell label TIFF (uint16/uint32 labels)")
    parser.add_argument("--data-dir")
    parser.add_argument("--pages", type=int, nargs="+", default=list(data.TEST_PAGES),
                        help="page indices of the labelled stack (default: the test pages 0 10 20)")
    parser.add_argument("--tta", action="store_true", help="predict with the 8 flips and quarter turns averaged")
    parser.add_argument("--out", help="write the scores to this JSON file")
    parser.add_argument("--grid", help="write the images / labels / predictions grid to this PNG")
    parser.add_argument("--method", choices=segment.METHODS,
                        help="how the model's output is cut into cells (default: its card's, else multicut for a "
                             "membrane model, mws for an affinity model)")
    parser.add_argument("--no-cells", dest="cells", action="store_false", help="score the probabilities only")
    parser.add_argument("--runtime", choices=runtimes.RUNTIMES, help="keras, onnx or auto (see predict.py --runtime)")
    parser.add_argument("--tune", action="store_true",
                        help="choose the segmentation parameters on the validation pages 5 15 25 (never the test "
                             "pages) and keep them in the model's card (<model>.json), then score")
    return parser


def _check_source(source: str) -> None:
    """Raise DataError unless `source` is a TIFF file or a model `runtimes.resolve_model` takes."""
    missing = files.DataError(f"{source}: no such model or TIFF file (train a model with `python train.py`)")
    if Path(source).suffix.lower() in TIFF_SUFFIXES:
        if not Path(source).is_file():
            raise missing
        return
    try:
        runtimes.resolve_model(source)
    except FileNotFoundError as err:
        raise missing from err


def run(args: argparse.Namespace) -> None:
    """Score what the parsed command line names; print the table, write the files asked for."""
    _check_source(args.source)
    folder = data.find_data_dir(args.data_dir)
    card = [cards.card_path(args.source)] if runtimes.is_model(args.source) else []  # read, and --tune writes it
    files.refuse_overwriting([args.out, args.grid], [args.source, *card, folder / data.IMAGES_FILE,
                                                     folder / data.LABELS_FILE])
    for output in filter(None, (args.out, args.grid)):
        files.prepare_output(output)  # before the slow part
    checked_pages(args.pages, len(data.load_isbi(folder)[0]))  # before --tune writes the card
    if args.tune:
        chosen = tune(args.source, args.data_dir, method=args.method, runtime=args.runtime)
        print(f"segmentation chosen on validation pages {chosen['tuned_on']['pages']}: {chosen['method']} "
              f"{chosen['params']} (V_rand {chosen['tuned_on']['v_rand']:.4f}); kept in "
              f"{cards.card_path(args.source)}")
    result = evaluate(args.source, args.data_dir, args.pages, tiling=TileSettings(tta=args.tta), method=args.method,
                      cells=args.cells, runtime=args.runtime)
    print(report(result))
    if args.out:
        keep = {k: result[k] for k in ("source", "pages", "per_page", "mean", "method")}
        files.write_atomic(args.out, json.dumps(keep, indent=2))
    if args.grid:
        import figures

        titles = [f"page {page}" for page in result["pages"]]
        figures.save_results_grid(result["images"], result["labels"], result["predictions"], args.grid, titles,
                                  cells=result["cells"])


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
