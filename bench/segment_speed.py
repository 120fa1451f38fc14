"""Speed and memory of segment.py's methods on ISBI 2012 pages, and peak memory on one large tiled map.

    .venv/bin/python bench/segment_speed.py                                    # synthetic maps from the labels
    .venv/bin/python bench/segment_speed.py --model models/unet-isbi-cpu.npz   # + the model's maps of 3 pages
    .venv/bin/python bench/segment_speed.py --out bench/segment-speed.json

Without a model the maps are made from the labels: a probability map is the label smoothed (Gaussian,
sigma 1.5 px) plus noise; affinities are the exact ones (`affinities.label_affinities`) plus noise. Each large
map runs in a fresh process, so that its peak resident memory (VmHWM, or getrusage's maxrss) is its own; the
process's memory after its imports is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
from scipy import ndimage

import affinities
import files
import segment
from scores import cell_scores

NOISE = 0.05


def synthetic_probability(label: np.ndarray, seed: int = 0) -> np.ndarray:
    """Return a float32 probability map (1 = cell) made from a binary label: smoothed, with noise."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter((label > 0).astype(np.float32), 1.5)
    return np.clip(smooth + rng.normal(0, NOISE, label.shape), 0, 1).astype(np.float32)


def synthetic_affinities(label: np.ndarray, seed: int = 0) -> np.ndarray:
    """Return float32 (H, W, 8) affinities made from a binary label: exact, with noise."""
    rng = np.random.default_rng(seed)
    affs = affinities.label_affinities(label)
    return np.clip(affs + rng.normal(0, NOISE, affs.shape), 0, 1).astype(np.float32)


def maxrss_mib(current: bool = False) -> float:
    """Return this process's peak (or `current`) resident memory, MiB.

    Linux: VmHWM / VmRSS of /proc/self/status. getrusage's ru_maxrss would also count the memory of the
    parent that forked this process before it started this script.
    """
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        key = "VmRSS:" if current else "VmHWM:"
        return next(int(line.split()[1]) for line in status if line.startswith(key)) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def timed(function, *args, repeats: int = 1) -> tuple[float, object]:
    """Return (the median seconds of `repeats` calls, the last result)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*args)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds)), result


def inputs_for(method: str, labels: np.ndarray) -> np.ndarray:
    """Return the synthetic maps of `labels` that `method` takes: affinities for mws, else probabilities."""
    make = synthetic_affinities if method == "mws" else synthetic_probability
    return np.stack([make(label, seed) for seed, label in enumerate(labels)])


def page_and_volume(labels: np.ndarray) -> dict:
    """Return the seconds per 512 x 512 page (median of 3 on page 0) and for the whole stack, per method."""
    out = {}
    for method in segment.METHODS:
        maps = inputs_for(method, labels)
        page_s, _ = timed(segment.segment, maps[0], method, None, None, repeats=3)
        volume_s, stack = timed(segment.segment_stack, maps, method)
        scores = [cell_scores(page, label) for page, label in zip(stack, labels)]
        out[method] = {"page_s": round(page_s, 4), "volume_s": round(volume_s, 2), "pages": len(labels),
                       "mean_v_rand": round(float(np.mean([s["v_rand"] for s in scores])), 4),
                       "mean_v_info": round(float(np.mean([s["v_info"] for s in scores])), 4)}
    return out


def model_pages(model_path: str, images: np.ndarray, labels: np.ndarray, pages=(0, 10, 20)) -> dict:
    """Return the seconds and scores per method on one prediction of the model on `pages` (TensorFlow once)."""
    import runtimes
    import tiling

    start = time.perf_counter()
    outputs = tiling.predict_stack(runtimes.load_model(model_path, precision="auto"), images[list(pages)],
                                   progress=False)
    out = {"predict_s": round(time.perf_counter() - start, 2), "pages": list(pages)}
    methods = segment.METHODS if outputs.ndim == 4 else ("threshold", "multicut")
    for method in methods:
        rows = []
        for output, label in zip(outputs, labels[list(pages)]):
            seconds, cells = timed(segment.segment, output, method)
            rows.append({"s": round(seconds, 4), **{k: round(v, 4) for k, v in cell_scores(cells, label).items()
                                                    if k in ("v_rand", "v_info", "cells", "true_cells")}})
        out[method] = rows
    return out


def big_map(method: str, size: int, label: np.ndarray) -> dict:
    """Return the seconds and peak memory of `method` on a size x size map tiled from one page (in this process)."""
    reps = -(-size // label.shape[0])
    before = maxrss_mib(current=True)
    page = inputs_for(method, label[None])[0]
    tiled = np.tile(page, (reps, reps) + (1,) * (page.ndim - 2))[:size, :size]
    seconds, cells = timed(segment.segment, tiled, method)
    return {"method": method, "size": size, "s": round(seconds, 2), "cells": int(cells.max()),
            "input_mib": round(tiled.nbytes / 2**20), "rss_after_imports_mib": round(before),
            "peak_rss_mib": round(maxrss_mib())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("ISBI_DATA_DIR", "data"))
    parser.add_argument("--model", help="also time the methods on this model's prediction of pages 0, 10, 20")
    parser.add_argument("--size", type=int, default=8192, help="side of the large map (threshold, multicut)")
    parser.add_argument("--mws-size", type=int, default=4096, help="side of the large affinity map (mws, 8 channels)")
    parser.add_argument("--out", help="write the results to this JSON file")
    parser.add_argument("--big", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    labels = files.read_stack(Path(args.data_dir) / "train-labels.tif")
    if args.big:
        print(json.dumps(big_map(args.big[0], int(args.big[1]), labels[0])))
        return
    result = {"cpus": os.cpu_count(), "page": labels.shape[1:], "synthetic": page_and_volume(labels)}
    print(json.dumps(result["synthetic"], indent=1), flush=True)
    if args.model:
        images = files.read_stack(Path(args.data_dir) / "train-volume.tif")
        result["model"] = model_pages(args.model, images, labels)
        print(json.dumps(result["model"], indent=1), flush=True)
    result["large"] = []
    for method, size in (("threshold", args.size), ("multicut", args.size), ("mws", args.mws_size)):
        child = subprocess.run([sys.executable, __file__, "--data-dir", args.data_dir, "--big", method, str(size)],
                               capture_output=True, text=True, check=True)
        result["large"].append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(result["large"][-1]), flush=True)
    if args.out:
        files.write_atomic(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
