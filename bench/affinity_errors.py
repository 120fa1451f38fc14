"""Where an affinity model fails: per offset, how far its affinities are from the true ones on the validation
pages, and which edges let each merge of two true cells happen on a page (page 20 by default).

    .venv/bin/python bench/affinity_errors.py runs/seeds/affinities/seed-1/best.keras [--pages 5 15 25]
        [--merge-page 20] [--out bench/affinity-errors-NAME.json]

Per offset (dy, dx): the mean absolute error, the share of true cuts (membrane between the two pixels) the
model calls "same cell" (missed cuts), and the share of same-cell pairs it cuts (false cuts), at 0.5.
For the merge page: the cells of the model's tuned method (its card's, `evaluate.py --tune`), the pairs of
adjacent true cells that fall mostly into one segment, and for each pair its true boundary's edges: how many
the model calls "same cell" (the gap) and, per long-range offset, how many of the pairs across it it cuts
(the repulsion the mutex watershed could have used).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import affinities  # noqa: E402

MIN_CELL = 200  # pixels: smaller true cells are left out of the merge analysis (specks at the border)
MAJORITY = 0.5  # share of a true cell inside one segment for that segment to be the cell's
NEAR = 2  # pixels: a cut this close to the true one counts (a boundary one pixel off still separates the cells)


def _pairs(cells: np.ndarray, offset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (valid, first, second): where p + offset lies in the image, and the cells at p and p + offset."""
    height, width = cells.shape
    dy, dx = offset
    rows, cols = np.arange(height) + dy, np.arange(width) + dx
    valid = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None, :]
    partner = cells[np.clip(rows, 0, height - 1)][:, np.clip(cols, 0, width - 1)]
    return valid, cells, partner


def channel_errors(predicted: np.ndarray, label: np.ndarray, offsets) -> list[dict]:
    """Return per offset {'offset', 'mae', 'missed_cuts', 'missed_cuts_near', 'false_cuts', 'cut_share'} of
    (N, H, W, K) predicted affinities against binary (N, H, W) labels (1 = cell), over pairs whose partner is
    inside the page; shares are fractions of pairs, 0.5 the threshold. 'missed_cuts_near' counts a true cut as
    found when the channel cuts within NEAR pixels of it."""
    rows = []
    for channel, offset in enumerate(offsets):
        errors, missed, near, cuts, false, same = 0.0, 0, 0, 0, 0, 0
        count = 0
        for page, pred in zip(label, predicted):
            cells = affinities.cells_of(page)
            valid, first, second = _pairs(cells, offset)
            truth = (first == second)[valid]
            value = pred[..., channel][valid]
            lowest = ndimage.minimum_filter(pred[..., channel], size=2 * NEAR + 1)[valid]
            errors += float(np.abs(value - truth).sum())
            count += truth.size
            cuts += int((~truth).sum())
            missed += int(((value >= 0.5) & ~truth).sum())
            near += int(((lowest >= 0.5) & ~truth).sum())
            same += int(truth.sum())
            false += int(((value < 0.5) & truth).sum())
        rows.append({"offset": list(offset), "mae": errors / max(count, 1), "missed_cuts": missed / max(cuts, 1),
                     "missed_cuts_near": near / max(cuts, 1), "false_cuts": false / max(same, 1),
                     "cut_share": cuts / max(count, 1)})
    return rows


def merged_pairs(segments: np.ndarray, label: np.ndarray, min_cell: int = MIN_CELL) -> list[tuple[int, int, int]]:
    """Return (a, b, segment) for each pair of touching true cells a < b (4-connected components of the cell
    pixels of the binary `label`, numbered by `affinities.cells_of`) whose majorities lie in one segment."""
    cells = affinities.cells_of(label)
    sizes = np.bincount(cells.ravel())
    home = {}
    for cell in np.unique(cells):
        if sizes[cell] < min_cell:
            continue
        values, counts = np.unique(segments[cells == cell], return_counts=True)
        if counts.max() > MAJORITY * sizes[cell]:
            home[int(cell)] = int(values[counts.argmax()])
    touching = set()
    for offset in ((-1, 0), (0, -1)):
        valid, first, second = _pairs(cells, offset)
        differ = valid & (first != second)
        touching |= {tuple(sorted(pair)) for pair in zip(first[differ].tolist(), second[differ].tolist())}
    return sorted((a, b, home[a]) for a, b in touching if a in home and b in home and home[a] == home[b])


def boundary_evidence(predicted: np.ndarray, label: np.ndarray, pair: tuple[int, int], offsets) -> dict:
    """Return what the (H, W, K) predicted affinities say across the true boundary of cells `pair`: per offset
    the number of pairs of pixels (one in each cell), and the share the model cuts (affinity < 0.5); for the
    nearest-neighbour offsets together, 'gap' = the share with no cut within NEAR pixels (the predicted cell map,
    `affinities.cell_map`, at least 0.5 all around), 'weakest' = the highest of those lowest cell-map values."""
    cells = affinities.cells_of(label)
    lowest = ndimage.minimum_filter(affinities.cell_map(predicted), size=2 * NEAR + 1)
    a, b = pair
    per_offset, near = [], []
    for channel, offset in enumerate(offsets):
        valid, first, second = _pairs(cells, offset)
        across = valid & (((first == a) & (second == b)) | ((first == b) & (second == a)))
        values = predicted[..., channel][across]
        per_offset.append({"offset": list(offset), "pairs": int(values.size),
                           "cut": float((values < 0.5).mean()) if values.size else None})
        if max(abs(offset[0]), abs(offset[1])) == 1:
            near.append(lowest[across])
    near = np.concatenate(near) if near else np.zeros(0)
    return {"cells": [int(a), int(b)], "sizes": [int((cells == a).sum()), int((cells == b).sum())],
            "gap": float((near >= 0.5).mean()) if near.size else None,
            "weakest": float(near.max()) if near.size else None, "per_offset": per_offset}


def gap_mask(predicted: np.ndarray, label: np.ndarray, pairs) -> np.ndarray:
    """Return the (H, W) bool mask of the pixels on the true boundaries of the merged `pairs` with no predicted
    cut within NEAR pixels (for a picture)."""
    cells = affinities.cells_of(label)
    lowest = ndimage.minimum_filter(affinities.cell_map(predicted), size=2 * NEAR + 1)
    mask = np.zeros(cells.shape, bool)
    for a, b, *_ in pairs:
        for offset in ((-1, 0), (0, -1)):
            valid, first, second = _pairs(cells, offset)
            across = valid & (((first == a) & (second == b)) | ((first == b) & (second == a)))
            mask |= across & (lowest >= 0.5)
    return ndimage.binary_dilation(mask, iterations=2)


def analyse(model: str, pages: list[int], merge_page: int, data_dir: str | None) -> dict:
    """Return the per-offset errors on `pages` and the merges of `merge_page` for the affinity model `model`."""
    import cards
    import data
    import evaluate
    import runtimes

    images, labels = data.load_isbi(data_dir)
    labels = data.binarize_labels(labels)
    shown = sorted(set(pages) | {merge_page})
    io = cards.model_io(model)
    if not io.is_affinities:
        raise ValueError(f"{model}: a membrane model; this analysis needs an affinity model")
    outputs = dict(zip(shown, evaluate.outputs_for(model, images, shown)))
    offsets = io.offsets
    cells, method = evaluate.cells_for(model, outputs[merge_page][np.newaxis], io)
    pairs = merged_pairs(cells[0], labels[merge_page])
    gaps = gap_mask(outputs[merge_page], labels[merge_page], pairs)
    return {"picture": (images[merge_page], cells[0], gaps), "model": model, "offsets": [list(o) for o in offsets], "pages": pages,
            "channels": channel_errors(np.stack([outputs[p] for p in pages]), labels[pages], offsets),
            "merge_page": merge_page, "method": method,
            "merges": [boundary_evidence(outputs[merge_page], labels[merge_page], (a, b), offsets)
                       for a, b, _ in pairs]}


def table(result: dict) -> str:
    """Return the analysis as markdown: the per-offset table, then one line per merge."""
    lines = [f"{result['model']}: validation pages {result['pages']}", "",
             f"| offset | MAE | missed cuts | none within {NEAR} px | false cuts | true cuts |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {tuple(row['offset'])} | {row['mae']:.3f} | {row['missed_cuts']:.1%} | "
              f"{row['missed_cuts_near']:.1%} | {row['false_cuts']:.1%} | {row['cut_share']:.1%} |"
              for row in result["channels"]]
    lines += ["", f"page {result['merge_page']}, {result['method']}: {len(result['merges'])} merged pair(s)"]
    for merge in result["merges"]:
        far = ", ".join(f"{tuple(o['offset'])} {o['cut']:.0%}" for o in merge["per_offset"][2:] if o["pairs"])
        lines.append(f"- cells {merge['cells']} ({merge['sizes'][0]} and {merge['sizes'][1]} px): "
                     f"{merge['gap']:.0%} of the boundary with no cut within {NEAR} px (weakest {merge['weakest']:.2f}); "
                     f"long-range pairs cut: {far or 'none across'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an affinity model (.keras) with its card or run folder")
    parser.add_argument("--pages", type=int, nargs="+", default=[5, 15, 25], help="pages for the per-offset errors")
    parser.add_argument("--merge-page", type=int, default=20, help="the page whose merges are explained")
    parser.add_argument("--data-dir", help="the ISBI stacks (default: $ISBI_DATA_DIR or data/)")
    parser.add_argument("--out", help="write the analysis as JSON here")
    parser.add_argument("--picture", help="write a PNG of the merge page: its cells, the unseen boundaries in red")
    args = parser.parse_args(argv)
    result = analyse(args.model, args.pages, args.merge_page, args.data_dir)
    image, cells, gaps = result.pop("picture")
    print(table(result))
    if args.picture:
        import files
        import segment
        from PIL import Image

        picture = segment.overlay(image, cells)
        picture[gaps] = (255, 0, 0)
        files.write_atomic(args.picture, Image.fromarray(picture).save)
    if args.out:
        import files

        files.write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
