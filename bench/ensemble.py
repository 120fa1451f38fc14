"""What averaging several trained models buys: their probabilities averaged, then tuned and scored as one.

    .venv/bin/python bench/ensemble.py --name context3 runs/seeds/context3/seed-{1,2,3}/best.keras --size 2

For every combination of `--size` of the given models (all of them by default): each model predicts the
validation pages 5, 15, 25 and the test pages 0, 10, 20, the probabilities (cell maps) are averaged, the
cells' parameters are tuned on the validation pages (`evaluate.tune`, on the averaged maps written as a TIFF)
and the maps and cells are scored on both parts. Writes bench/ensemble-NAME.json and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import evaluate  # noqa: E402
import files  # noqa: E402
import hardware  # noqa: E402

PAGES = {"validation": list(data.VALIDATION_PAGES), "test": list(data.TEST_PAGES)}


def cell_maps(model: str, images: np.ndarray, pages: list[int]) -> np.ndarray:
    """Return the model's (len(pages), H, W) cell probabilities of the stack's `pages`."""
    import cards

    outputs = evaluate.outputs_for(model, images, pages)
    return cards.model_io(model).cell_map(outputs)


def score_average(maps: list[np.ndarray], shape: tuple, pages: list[int], data_dir: str | None, folder: Path) -> dict:
    """Return the tuned segmentation and the scores of the mean of `maps` (each (len(pages), H, W))."""
    stack = np.zeros(shape, np.float32)
    stack[pages] = np.mean(maps, axis=0)
    source = folder / "average.tif"
    tifffile.imwrite(source, stack)
    chosen = evaluate.tune(source, data_dir, PAGES["validation"], method="multicut")
    out = {"segmentation": chosen}
    for part, part_pages in PAGES.items():
        result = evaluate.evaluate(source, data_dir, part_pages, method="multicut")
        out[part] = {"pages": part_pages, "per_page": result["per_page"], "mean": result["mean"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--size", type=int, nargs="+", help="members per ensemble (default: all the models)")
    parser.add_argument("--data-dir")
    args = parser.parse_args(argv)
    images, _ = data.load_isbi(args.data_dir)
    pages = PAGES["validation"] + PAGES["test"]
    maps = {m: cell_maps(m, images, pages) for m in args.models}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.size or [len(args.models)]:
            for members in itertools.combinations(args.models, size):
                scored = score_average([maps[m] for m in members], images.shape, pages, args.data_dir, Path(tmp))
                results.append({"members": list(members), **scored})
                line = " / ".join(f"{p['cell_v_rand']:.3f}" for p in scored["test"]["per_page"])
                print(f"{size}: {members}: validation {scored['validation']['mean']['cell_v_rand']:.3f}, "
                      f"test {line} (mean {scored['test']['mean']['cell_v_rand']:.3f})", flush=True)
    summary = {}
    for size in sorted({len(r["members"]) for r in results}):
        rows = [r for r in results if len(r["members"]) == size]
        summary[size] = {part: {"median_of_means": statistics.median(r[part]["mean"]["cell_v_rand"] for r in rows),
                                "worst_page": min(p["cell_v_rand"] for r in rows for p in r[part]["per_page"])}
                         for part in PAGES}
    record = {"name": args.name, "models": args.models, "summary": summary, "runs": results,
              "scored_on": hardware.describe()}
    out = ROOT / "bench" / f"ensemble-{args.name}.json"
    files.write_atomic(out, json.dumps(record, indent=2, default=float) + "\n")
    print(json.dumps(summary, indent=2), f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
