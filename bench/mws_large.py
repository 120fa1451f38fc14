"""The mutex watershed on one large page: peak memory and seconds, whole or tile by tile (segment.mws_cells).

    .venv/bin/python bench/mws_large.py [--size 8192] [--tile 1024] [--workers N] [--offsets field] [--in-memory]
                                        [--out bench/mws-large.json]

The page is ISBI training label 20 repeated to --size pixels a side; its true affinities (--offsets)
plus Gaussian noise of 0.2, clipped to [0, 1], are written to a zarr array first (not measured). A fresh
process then cuts them with the default SegmentParams, reading the zarr tile by tile, --workers tiles at a
time (or loading it whole with --in-memory, as predict.py holds a page), and reports its own peak resident memory (ru_maxrss) and
wall seconds, with the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NOISE = 0.2
ROWS = 1024  # rows of the page written at a time


def write_affinities(path: Path, size: int, offsets, data_dir: str | None) -> None:
    """Write the noisy true affinities of label page 20 repeated to size x size pixels to the zarr `path`."""
    import zarr

    import affinities
    import data

    label = data.binarize_labels(data.load_isbi(data_dir)[1])[20]
    reps = -(-size // label.shape[0])
    stored = zarr.open(str(path), mode="w", shape=(size, size, len(offsets)),
                       chunks=(ROWS, ROWS, len(offsets)), dtype="float32")
    halo = max(abs(side) for offset in offsets for side in offset)
    for top in range(0, size, ROWS):
        rows = np.arange(max(top - halo, 0), min(top + ROWS + halo, size)) % label.shape[0]
        strip = np.tile(label[rows], (1, reps))[:, :size]
        affs = affinities.label_affinities(strip, offsets)[top - max(top - halo, 0):][:ROWS]
        noisy = affs + np.random.default_rng(top).normal(0, NOISE, affs.shape)
        stored[top : top + ROWS] = np.clip(noisy, 0, 1).astype(np.float32)


def measure(path: str, tile: int, in_memory: bool, offsets, workers: int | None) -> dict:
    """Return {'seconds', 'peak_gb', 'segments'} of segment.mws_cells on the zarr at `path` (run in a fresh process)."""
    import resource
    import time

    import zarr

    import segment

    stored = zarr.open(path, mode="r")
    source = np.asarray(stored[:]) if in_memory else stored
    began = time.perf_counter()
    cells = segment.mws_cells(source, segment.SegmentParams(), offsets, tile=tile, workers=workers)
    return {"seconds": round(time.perf_counter() - began, 1),
            "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "segments": int(cells.max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="the page's side, pixels (default 8192)")
    parser.add_argument("--tile", type=int, default=1024,
                        help="segment.mws_cells' tile side (default 1024, segment.MWS_TILE)")
    parser.add_argument("--workers", type=int, help="tiles cut at a time (default: one per core)")
    parser.add_argument("--offsets", default="field", help="affinities.parse_offsets (default field, as "
                        "train.py --target affinities)")
    parser.add_argument("--in-memory", action="store_true", help="load the affinities whole first")
    parser.add_argument("--data-dir", help="the ISBI stacks (default: $ISBI_DATA_DIR or data/)")
    parser.add_argument("--out", help="write the result as JSON here")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: the zarr to cut
    args = parser.parse_args(argv)
    import affinities

    offsets = affinities.parse_offsets(args.offsets)
    if args.measure:
        print(json.dumps(measure(args.measure, args.tile, args.in_memory, offsets, args.workers)))
        return 0
    import hardware

    with tempfile.TemporaryDirectory(prefix="mws-large-") as tmp:
        path = Path(tmp) / "affinities.zarr"
        write_affinities(path, args.size, offsets, args.data_dir)
        command = [sys.executable, __file__, "--measure", str(path), "--tile", str(args.tile), "--offsets", args.offsets]
        command += ["--workers", str(args.workers)] if args.workers else []
        child = subprocess.run(command + (["--in-memory"] if args.in_memory else []), check=True,
                               capture_output=True, text=True)
    result = {"size": args.size, "tile": args.tile, "in_memory": args.in_memory, "noise": NOISE,
              "offsets": args.offsets, "workers": args.workers or hardware.available_cores(),
              **json.loads(child.stdout.strip().splitlines()[-1]), "machine": hardware.describe()}
    print(f"{args.size}² page, offsets {args.offsets}, tile {args.tile}{' (in memory)' if args.in_memory else ' (zarr)'}, "
          f"{result['workers']} worker(s): "
          f"{result['seconds']} s, peak {result['peak_gb']} GB, {result['segments']} segments; {result['machine']}")
    if args.out:
        import files

        files.write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
