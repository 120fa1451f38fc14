"""Which statistic of the boundary map along an edge the multicut should weigh: a diagnostic.

    .venv/bin/python bench/edge_statistic.py MODEL [MODEL ...]

segment.py weighs each edge between two superpixels by the mean boundary probability along it (elf's
compute_boundary_mean_and_length). This swaps in the median, the 75th or 90th percentile or the maximum
(elf's compute_boundary_features), tunes the multicut per model and statistic on the validation pages 5, 15,
25 (segment.GRIDS) and scores the test pages 0, 10, 20. Writes bench/edge-statistic.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import data  # noqa: E402
import files  # noqa: E402
import hardware  # noqa: E402
import segment  # noqa: E402
from ensemble import cell_maps  # noqa: E402
from scores import cell_scores  # noqa: E402

COLUMNS = {"mean": 0, "median": 1, "p75": 8, "p90": 9, "max": 4}  # of elf's compute_boundary_features


def mean_replaced_by(statistic: str):
    """Return elf's `compute_boundary_mean_and_length` with `statistic` in place of the mean: what
    segment._local_problem weighs the edges by, while the experiment patches it in."""
    from elf.segmentation import features

    def statistic_and_length(rag, superpixels, boundary, n_threads=None):
        found = features.compute_boundary_features(rag, superpixels, boundary, n_threads=n_threads)
        return found[:, [COLUMNS[statistic], -1]]
    return statistic_and_length


def tuned_and_scored(maps: np.ndarray, labels: np.ndarray, validation: list[int], test: list[int]) -> dict:
    """Return the multicut tuned on the first len(validation) of `maps` and scored on the rest (the test pages):
    {"validation": best mean V_rand, "test": V_rand per page, "params": the tuned parameters}."""
    params, rows = segment.tune(maps[: len(validation)], labels[validation], "multicut")
    scores = [cell_scores(segment.multicut_cells(page, params), labels[t])["v_rand"]
              for page, t in zip(maps[len(validation):], test)]
    return {"validation": rows[0]["v_rand"], "test": scores, "params": params.as_dict()}


def shown(model: str, name: str, result: dict) -> str:
    """Return one line of a model's result under one variant."""
    return (f"{model} {name}: validation {result['validation']:.3f}, test "
            f"{' / '.join(f'{x:.3f}' for x in result['test'])} (mean {np.mean(result['test']):.3f})")


def main(argv: list[str] | None = None) -> int:
    from elf.segmentation import features

    models = sys.argv[1:] if argv is None else argv
    images, raw_labels = data.load_isbi(None)
    labels = data.binarize_labels(raw_labels)
    labels = labels[..., 0] if labels.ndim == 4 else labels
    validation, test = list(data.VALIDATION_PAGES), list(data.TEST_PAGES)
    out = {}
    for model in models:
        maps = cell_maps(model, images, validation + test)
        for statistic in COLUMNS:
            features.compute_boundary_mean_and_length = mean_replaced_by(statistic)  # every multicut below
            out.setdefault(model, {})[statistic] = tuned_and_scored(maps, labels, validation, test)
            print(shown(model, statistic, out[model][statistic]), flush=True)
    files.write_atomic(ROOT / "bench" / "edge-statistic.json",
                       json.dumps({"models": out, "machine": hardware.describe()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
