"""The README's table of cells: V_rand and V_info per test page for each model and method, as markdown.

    .venv/bin/python bench/cells_table.py MODEL [MODEL ...] [--pages 0 10 20] [--out bench/cells.json]

For each model: the probability map's best threshold (the challenge's sweep), then `threshold` at 0.5,
`multicut`, and `mws` for an affinity model, each with the parameters of the model's card where the card
chose that method on the validation pages (`evaluate.py --tune`), else the defaults. Seconds are the
segmentation's per page on this machine, which the output names.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import cards  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import hardware  # noqa: E402
import segment  # noqa: E402


SHOWN = {"threshold": ("threshold",), "multicut": ("threshold", "sigma_seeds", "min_size", "beta"),
         "mws": ("min_size", "strides")}  # the parameters each method reads


def rows_for(model: str, pages: list[int], data_dir: str | None) -> list[dict]:
    """Return one row per method: {'model', 'method', 'v_rand', 'v_info' (lists per page), 'seconds'}."""
    raw_images, raw_labels = data.load_isbi(data_dir)
    labels = data.binarize_labels(raw_labels)[pages]
    outputs = evaluate.outputs_for(model, raw_images, pages, runtime="keras")
    io = cards.model_io(model)
    by_threshold = evaluate.score_pages(labels, io.cell_map(outputs))
    rows = [{"model": model, "method": "best threshold (sweep)", "v_rand": [p["v_rand"] for p in by_threshold],
             "v_info": [p["v_info"] for p in by_threshold], "seconds": None}]
    for method in ("threshold", "multicut") + (("mws",) if io.is_affinities else ()):
        how, params, offsets = io.segmentation(model, method)
        began = time.perf_counter()
        cells = segment.segment_stack(outputs, how, params, offsets)
        seconds = (time.perf_counter() - began) / len(pages)
        scores = evaluate.score_pages(labels, cells=cells)
        shown = ", ".join(f"{key} {params.as_dict()[key]}" for key in SHOWN[how])
        rows.append({"model": model, "method": f"{how} ({shown})", "seconds": seconds,
                     "v_rand": [p["cell_v_rand"] for p in scores], "v_info": [p["cell_v_info"] for p in scores]})
    return rows


def markdown(rows: list[dict]) -> str:
    """Return the rows as a markdown table."""
    lines = ["| model | method | V_rand per page (mean) | V_info per page (mean) | s per page |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [" / ".join(f"{v:.3f}" for v in row[key]) + f" ({np.mean(row[key]):.3f})" for key in ("v_rand", "v_info")]
        seconds = "–" if row["seconds"] is None else f"{row['seconds']:.2f}"
        lines.append(f"| `{row['model']}` | {row['method']} | {cells[0]} | {cells[1]} | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--pages", type=int, nargs="+", default=list(data.TEST_PAGES))
    parser.add_argument("--data-dir")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = [row for model in args.models for row in rows_for(model, args.pages, args.data_dir)]
    print(f"pages {args.pages}, on {hardware.describe()}")
    print(markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": hardware.describe(), "pages": args.pages, "rows": rows},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
