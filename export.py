"""Package a trained run as a model to ship: a small float32 .keras file and a JSON card beside it.

    python export.py runs/cpu                      # writes models/unet-isbi-cpu.keras and .json
    python export.py runs/original --dest models/unet-isbi-original.keras
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import data
from model import with_dtype_policy

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_DEST = PROJECT_DIR / "models" / "unet-isbi-cpu.keras"
MAX_MB = 10


def sha256(path: str | Path) -> str:
    """Return the hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ship_model(run_dir: str | Path, dest: str | Path = DEFAULT_DEST, data_dir: str | Path | None = None) -> dict:
    """Write the run's best model (float32, no optimizer) to `dest` and its card to `dest`.json; return the card.

    The card holds how it was trained (the run's settings.json and
    summary.json) and its scores on the test pages (from `evaluate.evaluate`).
    """
    import evaluate
    from train import load_model, run_paths

    paths = run_paths(run_dir)
    if not paths["best"].is_file():
        raise FileNotFoundError(f"{paths['best']}: no best model in this run; train it first")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    model = with_dtype_policy(load_model(paths["best"]), "float32")
    tmp = dest.with_name(dest.stem + ".tmp.keras")
    model.save(tmp)
    os.replace(tmp, dest)
    size_mb = dest.stat().st_size / 2**20
    if size_mb > MAX_MB:
        raise ValueError(f"{dest} is {size_mb:.1f} MB, more than the {MAX_MB} MB a shipped model may take")

    scores = evaluate.evaluate(dest, data_dir, pages=data.TEST_PAGES)
    card = {
        "model": dest.name,
        "sha256": sha256(dest),
        "size_mb": round(size_mb, 2),
        "parameters": model.count_params(),
        "input": "grey EM image, any size (tiled by predict.py), scaled to [0, 1]",
        "output": "probability of cell (1) against membrane (0), float32",
        "training": {
            "settings": json.loads(paths["settings"].read_text()) if paths["settings"].is_file() else None,
            "summary": json.loads(paths["summary"].read_text()) if paths["summary"].is_file() else None,
        },
        "test_pages": scores["pages"],
        "test_scores": {"mean": scores["mean"], "per_page": scores["per_page"]},
    }
    dest.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder written by train.py")
    parser.add_argument("--dest", default=str(DEFAULT_DEST))
    parser.add_argument("--data-dir")
    args = parser.parse_args(argv)
    try:
        card = ship_model(args.run_dir, args.dest, args.data_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.dest} ({card['size_mb']} MB) and its card; test scores: {card['test_scores']['mean']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
