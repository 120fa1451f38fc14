"""The lifted multicut (segment.lifted_cells) against the mutex watershed on one affinity model's outputs: each
tuned on the validation pages 5, 15, 25 (segment.tune; the model's card is left as it is), then scored on the
test pages 0, 10, 20 (cells V_rand).

    .venv/bin/python bench/lmc_compare.py runs/seeds/affinities/seed-1/best.keras --out bench/lmc-vs-mws-NAME.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cards  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import scores  # noqa: E402
import segment  # noqa: E402


def compare(model: str, data_dir: str | None = None, methods=("mws", "lmc")) -> dict:
    """Return per method {'params', 'validation' (tuned mean V_rand), 'test' (per page), 'mean', 'seconds'}."""
    images, labels = data.load_isbi(data_dir)
    labels = data.binarize_labels(labels)
    validation, test = list(data.VALIDATION_PAGES), list(data.TEST_PAGES)
    io = cards.model_io(model)
    outputs = evaluate.outputs_for(model, images, validation + test)
    result = {}
    for method in methods:
        began = time.perf_counter()
        params, table = segment.tune(outputs[:3], labels[validation], method, offsets=io.offsets)
        cells = segment.segment_stack(outputs[3:], method, params, io.offsets)
        per_page = [scores.cell_scores(c, label)["v_rand"] for c, label in zip(cells, labels[test])]
        result[method] = {"params": params.as_dict(), "validation": max(row["v_rand"] for row in table),
                          "test": per_page, "mean": float(np.mean(per_page)),
                          "seconds": time.perf_counter() - began}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an affinity model (.keras) with its card or run folder")
    parser.add_argument("--data-dir", help="the ISBI stacks (default: $ISBI_DATA_DIR or data/)")
    parser.add_argument("--out", help="write the comparison as JSON here")
    args = parser.parse_args(argv)
    result = compare(args.model, args.data_dir)
    for method, row in result.items():
        print(f"{method}: validation {row['validation']:.3f}, test {' / '.join(f'{v:.3f}' for v in row['test'])} "
              f"(mean {row['mean']:.3f}), {row['seconds']:.0f} s to tune and cut")
    if args.out:
        import files

        files.write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
