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

import data
import files
import metrics
import runs
import runtimes
import tiling


def score_page(label: np.ndarray, prediction: np.ndarray) -> dict:
    """Return one page's scores: pixel difference (percent), accuracy (fraction), and the
    challenge's V_rand and V_info (best over the threshold sweep, with their thresholds)."""
    label, prediction = np.squeeze(label), np.squeeze(prediction)
    challenge = metrics.challenge_scores(prediction, label)
    return {
        "pixel_difference": metrics.pixel_difference_np(label, prediction),
        "accuracy": metrics.accuracy_np(label, prediction),
        "pixel_error": metrics.pixel_error(prediction, label),
        "v_rand": challenge["v_rand"],
        "v_rand_threshold": challenge["v_rand_threshold"],
        "v_info": challenge["v_info"],
        "v_info_threshold": challenge["v_info_threshold"],
    }


def score_pages(labels: np.ndarray, predictions: np.ndarray) -> list[dict]:
    """Return `score_page` for each (label, prediction) pair of two (N, H, W, 1) stacks."""
    return [score_page(y, p) for y, p in zip(labels, predictions)]


def probabilities_for(source: str | Path, images: np.ndarray, pages: list[int], tta: bool = False) -> np.ndarray:
    """Return cell probabilities (len(pages), H, W) for `pages`: predicted by a .keras model, or read
    from a probability TIFF holding either every page of the stack or exactly the pages asked for."""
    source = Path(source)
    if source.suffix.lower() in (".tif", ".tiff"):
        stack = files.read_stack(source).astype(np.float32)
        if stack.shape[1:] != images.shape[1:]:
            raise files.DataError(f"{source}: pages of {stack.shape[1:]} pixels, the labels have {images.shape[1:]}")
        if len(stack) == len(images):
            return stack[pages]
        if len(stack) == len(pages):
            return stack
        raise files.DataError(f"{source}: {len(stack)} pages; expected {len(images)} (the stack) or {len(pages)}")
    return tiling.predict_stack(runtimes.load_model(source, precision="auto"), images[pages], tta=tta, desc="predicting")


def model_for_results(run_dir: str | Path) -> Path:
    """Return the model whose results to show: the run's best.keras, or the shipped model if the run has none."""
    best = runs.RunFolder(run_dir).best
    if best.is_file():
        return best
    if not runtimes.DEFAULT_MODEL.is_file():
        raise FileNotFoundError(f"{best}: no trained model, and the shipped {runtimes.DEFAULT_MODEL} is missing too")
    shipped = runtimes.DEFAULT_MODEL.relative_to(runtimes.PROJECT_DIR)
    warnings.warn(f"{run_dir} holds no trained model: showing the shipped {shipped}", UserWarning, stacklevel=2)
    return runtimes.DEFAULT_MODEL


def scores_of(source: str | Path, pages: list, images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
              part: str = "test") -> dict:
    """Return {'source', 'part', 'pages', 'per_page', 'mean', 'images', 'labels', 'predictions'} of (N, H, W) stacks."""
    per_page = score_pages(labels, predictions)
    mean = {key: float(np.mean([page[key] for page in per_page])) for key in per_page[0] if "threshold" not in key}
    return {
        "source": str(source),
        "part": part,
        "pages": list(pages),
        "per_page": per_page,
        "mean": mean,
        "images": images,
        "labels": labels,
        "predictions": predictions,
    }


def evaluate(source: str | Path, data_dir: str | Path | None = None, pages=data.TEST_PAGES, tta: bool = False) -> dict:
    """Return `scores_of` a model (.keras) or probability TIFF against the labelled ISBI stack's `pages`
    (default: the test pages 0, 10, 20)."""
    raw_images, raw_labels = data.load_isbi(data_dir)
    pages = [int(p) for p in pages]
    if not pages or min(pages) < 0 or max(pages) >= len(raw_images):
        raise files.DataError(f"pages must lie in 0..{len(raw_images) - 1}, got {pages}")
    images = data.normalize_images(raw_images)
    labels = data.binarize_labels(raw_labels)[pages]
    predictions = probabilities_for(source, raw_images, pages, tta)
    return scores_of(source, pages, images[pages], labels, predictions)


def evaluate_held_out(source: str | Path, parts: dict, report: dict, tta: bool = False) -> dict:
    """Return `scores_of` a model on the pages held out of training by `train.load_data`: its 'test' part
    (the ISBI test pages) if there is one, else the 'validation' part (a lab's own data)."""
    part = "test" if "test" in parts else "validation"
    images, labels = (stack[..., 0] for stack in parts[part])
    predictions = tiling.predict_stack(runtimes.load_model(source, precision="auto"), images, tta=tta, desc="predicting")
    return scores_of(source, report["split_pages"][part], images, labels, predictions, part)


def report(result: dict) -> str:
    """Return a small text table of the per-page and mean scores."""
    lines = [f"{result['source']} on pages {result['pages']}:",
             f"{'page':>6} {'pixel diff %':>13} {'accuracy':>9} {'pixel error':>11} {'V_rand':>7} {'(thr)':>5} "
             f"{'V_info':>7} {'(thr)':>5}"]
    rows = list(zip(result["pages"], result["per_page"])) + [("mean", result["mean"])]
    for page, s in rows:
        thresholds = [f"{s[k]:>5.1f}" if k in s else " " * 5 for k in ("v_rand_threshold", "v_info_threshold")]
        lines.append(
            f"{page:>6} {s['pixel_difference']:>13.2f} {s['accuracy']:>9.4f} {s['pixel_error']:>11.4f} "
            f"{s['v_rand']:>7.4f} {thresholds[0]} {s['v_info']:>7.4f} {thresholds[1]}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Return evaluate.py's command line."""
    parser = cli.parser(__doc__)
    parser.add_argument("source", help="a .keras model saved by train.py, or a probability TIFF (1 = cell)")
    parser.add_argument("--data-dir")
    parser.add_argument("--pages", type=int, nargs="+", default=list(data.TEST_PAGES),
                        help="page indices of the labelled stack (default: the test pages 0 10 20)")
    parser.add_argument("--tta", action="store_true", help="predict with the 8 flips and quarter turns averaged")
    parser.add_argument("--out", help="write the scores to this JSON file")
    parser.add_argument("--grid", help="write the images / labels / predictions grid to this PNG")
    return parser


def run(args: argparse.Namespace) -> None:
    """Score what the parsed command line names; print the table, write the files asked for."""
    if not Path(args.source).is_file():
        raise files.DataError(f"{args.source}: no such model or TIFF file (train a model with `python train.py`)")
    for output in filter(None, (args.out, args.grid)):
        files.prepare_output(output)  # before the slow part
    result = evaluate(args.source, args.data_dir, args.pages, args.tta)
    print(report(result))
    if args.out:
        keep = {k: result[k] for k in ("source", "pages", "per_page", "mean")}
        files.write_atomic(args.out, json.dumps(keep, indent=2))
    if args.grid:
        import figures

        titles = [f"page {page}" for page in result["pages"]]
        figures.save_results_grid(result["images"], result["labels"], result["predictions"], args.grid, titles)


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
