"""A picture of where models merge cells: one row per model, over a window of one labelled page.

    .venv/bin/python bench/merge_view.py MODEL [MODEL ...] --out images/page20-merge.png --page 20 \
        --window 300 512 40 380 --names NAME [NAME ...]

Each row: the model's probability of cell, and its cells (the multicut with the parameters tuned on the
validation pages, read from the model's card) with the label's cell borders drawn over them and the page's
V_rand in the title. The first column shows the image, then the label.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import cards  # noqa: E402
import data  # noqa: E402
import segment  # noqa: E402
from ensemble import cell_maps  # noqa: E402
from scores import cell_scores, segment_cells  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--page", type=int, default=20)
    parser.add_argument("--window", type=int, nargs=4, default=(0, 512, 0, 512), metavar=("Y0", "Y1", "X0", "X1"))
    parser.add_argument("--names", nargs="+", help="one title per model (default: the paths)")
    args = parser.parse_args(argv)
    images, raw_labels = data.load_isbi(None)
    labels = data.binarize_labels(raw_labels)
    image, label = images[args.page].squeeze(), labels[args.page].squeeze()
    borders = find_boundaries(segment_cells(label > 0.5))
    y0, y1, x0, x1 = args.window
    names = args.names or args.models
    fig, axes = plt.subplots(len(args.models), 3, figsize=(12, 3.6 * len(args.models)), squeeze=False)
    for row, (model, name) in enumerate(zip(args.models, names)):
        prob = cell_maps(model, images, [args.page])[0]
        _, params, _ = cards.model_io(model).segmentation(model, "multicut")
        cells = segment.multicut_cells(prob, params)
        score = cell_scores(cells, label)["v_rand"]
        left = (image, "gray", f"page {args.page}") if row == 0 else (label, "gray", "label (white: cell)")
        axes[row, 0].imshow(left[0], cmap=left[1])
        axes[row, 0].set_title(left[2])
        axes[row, 1].imshow(prob, cmap="gray", vmin=0, vmax=1)
        axes[row, 1].set_title(f"{name}: probability of cell")
        axes[row, 2].imshow(cells % 20, cmap="tab20", interpolation="nearest")
        axes[row, 2].contour(borders, [0.5], colors="k", linewidths=0.6)
        axes[row, 2].set_title(f"cells (label borders black), V_rand {score:.3f}")
        for axis in axes[row]:
            axis.set_xlim(x0, x1)
            axis.set_ylim(y1, y0)
            axis.set_xticks([])
            axis.set_yticks([])
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
