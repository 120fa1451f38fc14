"""Whether the multicut should weigh each edge by its length: a diagnostic.

    .venv/bin/python bench/multicut_weighting.py --out bench/multicut-weighting-NAME.json MODEL [MODEL ...]

segment.py gives every edge between two superpixels one vote, whatever its length: elf's compute_edge_costs
receives the lengths but, without a weighting scheme, ignores them. A long, faint stretch of membrane between
two large cells (page 20's merge) then counts no more than a short edge between two fragments. This tunes the
multicut per model on the validation pages 5, 15, 25 (segment.GRIDS) with each weighting (none; the length
over the longest edge's, to the power 1 or 0.5) and scores the test pages 0, 10, 20.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import data  # noqa: E402
import files  # noqa: E402
import hardware  # noqa: E402
from edge_statistic import shown, tuned_and_scored  # noqa: E402
from ensemble import cell_maps  # noqa: E402

WEIGHTINGS = {"none": (None, 1.0), "length": ("all", 1.0), "sqrt-length": ("all", 0.5)}


def weighted_costs(scheme, exponent):
    """Return elf's compute_edge_costs with the weighting scheme and exponent fixed: what segment._local_problem
    calls while the experiment patches it in."""
    from elf.segmentation import multicut

    original = multicut.compute_edge_costs.__wrapped__ if hasattr(multicut.compute_edge_costs, "__wrapped__") \
        else multicut.compute_edge_costs

    def costs(probs, edge_sizes=None, beta=0.5, **_):
        return original(probs, edge_sizes=edge_sizes, beta=beta, weighting_scheme=scheme,
                        weighting_exponent=exponent)
    costs.__wrapped__ = original
    return costs


def main(argv: list[str] | None = None) -> int:
    from elf.segmentation import multicut

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    images, raw_labels = data.load_isbi(None)
    labels = data.binarize_labels(raw_labels)
    labels = labels[..., 0] if labels.ndim == 4 else labels
    validation, test = list(data.VALIDATION_PAGES), list(data.TEST_PAGES)
    out = {}
    for model in args.models:
        maps = cell_maps(model, images, validation + test)
        for name, (scheme, exponent) in WEIGHTINGS.items():
            multicut.compute_edge_costs = weighted_costs(scheme, exponent)  # every multicut below
            out.setdefault(model, {})[name] = tuned_and_scored(maps, labels, validation, test)
            print(shown(model, name, out[model][name]), flush=True)
    summary = {name: {"validation_median": statistics.median(out[m][name]["validation"] for m in out),
                      "test_median_of_means": statistics.median(float(np.mean(out[m][name]["test"])) for m in out),
                      "test_worst_page": min(min(out[m][name]["test"]) for m in out)} for name in WEIGHTINGS}
    for name, row in summary.items():
        print(f"{name}: validation median {row['validation_median']:.3f}; test median {row['test_median_of_means']:.3f}, "
              f"worst page {row['test_worst_page']:.3f}")
    files.write_atomic(Path(args.out), json.dumps({"models": out, "summary": summary,
                                                   "machine": hardware.describe()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
