"""Score a trained model on the held-out pages of the ISBI training stack.

    python evaluate.py runs/cpu/best.keras                 # test pages 0, 10, 20
    python evaluate.py runs/cpu/best.keras --part validation --out scores.json --grid images/unet_results.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import data
import metrics


def predict_pages(model, images: np.ndarray, batch_size: int = 1) -> np.ndarray:
    """Return the model's cell probabilities for (N, H, W, 1) images, float32 (N, H, W, 1)."""
    return np.concatenate(
        [np.asarray(model.predict_on_batch(images[i : i + batch_size]), dtype=np.float32)
         for i in range(0, len(images), batch_size)]
    )


def score_pages(labels: np.ndarray, predictions: np.ndarray) -> list[dict]:
    """Return per-page scores: pixel difference (percent) and accuracy (fraction)."""
    return [
        {
            "pixel_difference": metrics.pixel_difference_np(y, p),
            "accuracy": metrics.accuracy_np(y, p),
        }
        for y, p in zip(labels, predictions)
    ]


def evaluate(model_path: str | Path, data_dir: str | Path | None = None, part: str = "test") -> dict:
    """Return {'pages', 'per_page', 'mean', 'images', 'labels', 'predictions'} for one part of the split."""
    from train import load_model

    split = data.load_split(data_dir)
    images, labels = split[part]
    model = load_model(model_path)
    predictions = predict_pages(model, images)
    per_page = score_pages(labels, predictions)
    mean = {key: float(np.mean([page[key] for page in per_page])) for key in per_page[0]}
    return {
        "model": str(model_path),
        "part": part,
        "pages": data.split_indices(len(data.load_isbi(data_dir)[0]))[part],
        "per_page": per_page,
        "mean": mean,
        "images": images,
        "labels": labels,
        "predictions": predictions,
    }


def report(result: dict) -> str:
    """Return a small text table of the per-page and mean scores."""
    lines = [f"{result['model']} on {result['part']} pages {result['pages']}:",
             f"{'page':>6} {'pixel diff %':>13} {'accuracy':>9}"]
    for page, scores in zip(result["pages"], result["per_page"]):
        lines.append(f"{page:>6} {scores['pixel_difference']:>13.2f} {scores['accuracy']:>9.4f}")
    mean = result["mean"]
    lines.append(f"{'mean':>6} {mean['pixel_difference']:>13.2f} {mean['accuracy']:>9.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a .keras file saved by train.py")
    parser.add_argument("--data-dir")
    parser.add_argument("--part", default="test", choices=("test", "validation", "train"))
    parser.add_argument("--out", help="write the scores to this JSON file")
    parser.add_argument("--grid", help="write the images / labels / predictions grid to this PNG")
    args = parser.parse_args(argv)
    if not Path(args.model).is_file():
        print(f"error: {args.model}: no such model file (train one with `python train.py`)", file=sys.stderr)
        return 1
    try:
        result = evaluate(args.model, args.data_dir, args.part)
    except data.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report(result))
    if args.out:
        keep = {k: result[k] for k in ("model", "part", "pages", "per_page", "mean")}
        Path(args.out).write_text(json.dumps(keep, indent=2))
    if args.grid:
        import figures

        figures.save_results_grid(result["images"], result["labels"], result["predictions"], args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
