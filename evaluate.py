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


def score_page(label: np.ndarray, prediction: np.ndarray) -> dict:
    """Return one page's scores: pixel difference (percent), accuracy (fraction), and the
    challenge's V_rand and V_info (best over the threshold sweep, with their thresholds)."""
    label, prediction = np.squeeze(label), np.squeeze(prediction)
    challenge = metrics.challenge_scores(prediction, label)
    return {
        "pixel_difference": metrics.pixel_difference_np(label, prediction),
        "accuracy": metrics.accuracy_np(label, prediction),
        "v_rand": challenge["v_rand"],
        "v_rand_threshold": challenge["v_rand_threshold"],
        "v_info": challenge["v_info"],
        "v_info_threshold": challenge["v_info_threshold"],
    }


def score_pages(labels: np.ndarray, predictions: np.ndarray) -> list[dict]:
    """Return `score_page` for each (label, prediction) pair of two (N, H, W, 1) stacks."""
    return [score_page(y, p) for y, p in zip(labels, predictions)]


def evaluate(model_path: str | Path, data_dir: str | Path | None = None, part: str = "test") -> dict:
    """Return {'pages', 'per_page', 'mean', 'images', 'labels', 'predictions'} for one part of the split."""
    from train import load_model

    split = data.load_split(data_dir)
    images, labels = split[part]
    model = load_model(model_path)
    predictions = predict_pages(model, images)
    per_page = score_pages(labels, predictions)
    mean = {key: float(np.mean([page[key] for page in per_page])) for key in per_page[0] if "threshold" not in key}
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
             f"{'page':>6} {'pixel diff %':>13} {'accuracy':>9} {'V_rand':>7} {'V_info':>7}"]
    rows = list(zip(result["pages"], result["per_page"])) + [("mean", result["mean"])]
    for page, s in rows:
        lines.append(
            f"{page:>6} {s['pixel_difference']:>13.2f} {s['accuracy']:>9.4f} {s['v_rand']:>7.4f} {s['v_info']:>7.4f}"
        )
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
