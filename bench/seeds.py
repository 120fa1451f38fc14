"""The same recipe over several seeds: what a user can count on, not what one lucky run scored.

    .venv/bin/python bench/seeds.py --name cpu --seeds 1 2 3                       # train.py --preset auto
    .venv/bin/python bench/seeds.py --name head16 --seeds 1 2 3 -- --head-filters 16 --lr-schedule cosine

For each seed: `train.py --preset PRESET --seed S --run-dir ROOT/NAME/seed-S [ARGS]` (a killed benchmark rerun
resumes each run where it stopped, and skips what is finished), then the cells' parameters tuned on the
validation pages 5, 15, 25 (`evaluate.tune`, recorded in the run's card), then the probabilities and cells
scored on the validation and the test pages 0, 10, 20. Writes bench/seeds-NAME.json (every page of every seed,
the machine, the precision, the minutes) and prints the table: per seed the test pages' cells V_rand, their
mean and worst page, pixel difference and accuracy; then the median and the worst over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import files  # noqa: E402
import hardware  # noqa: E402
import runs  # noqa: E402


def train_run(run_dir: Path, seed: int, preset: str, extra: list[str]) -> None:
    """Train (or resume, or leave alone when finished) the run of `seed` in `run_dir`, in its own process."""
    if runs.RunFolder(run_dir).read_json(runs.RunFolder(run_dir).summary):
        return
    command = [sys.executable, str(ROOT / "train.py"), "--preset", preset, "--seed", str(seed),
               "--run-dir", str(run_dir), *extra]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def score_run(run_dir: Path, data_dir: str | None, tta: bool = False) -> dict:
    """Return the run's tuned segmentation and its scores on the validation and the test pages (predicted with
    test-time augmentation if `tta`, for the tuning too)."""
    import evaluate  # loads TensorFlow: after the training processes have been started
    from tiling import TileSettings

    model, tiling = runs.RunFolder(run_dir).best, TileSettings(tta=tta)
    chosen = evaluate.tune(model, data_dir, tiling=tiling)
    parts = {}
    for part, pages in (("validation", data.VALIDATION_PAGES), ("test", data.TEST_PAGES)):
        result = evaluate.evaluate(model, data_dir, pages, tiling=tiling)
        parts[part] = {"pages": list(pages), "per_page": result["per_page"], "mean": result["mean"]}
    summary = runs.RunFolder(run_dir).read_json(runs.RunFolder(run_dir).summary)
    return {"segmentation": chosen, "tta": tta, **parts, "minutes": summary["seconds"] / 60, "machine": summary["machine"],
            "precision": summary["precision"], "commit": summary.get("commit"),
            "epochs": summary["epochs_done"], "steps_per_epoch": summary["steps_per_epoch"]}


def seed_result(run_dir: Path, seed: int, preset: str, extra: list[str], data_dir: str | None,
                tta: bool = False) -> dict:
    """Return the scores of `seed`'s run, training and scoring it unless its seed-scores json says it was done."""
    done = run_dir / ("seed-scores-tta.json" if tta else "seed-scores.json")
    if done.is_file() and (run_dir / "best.keras").stat().st_mtime <= done.stat().st_mtime:
        return json.loads(done.read_text())
    train_run(run_dir, seed, preset, extra)
    result = {"seed": seed, **score_run(run_dir, data_dir, tta)}
    files.write_atomic(done, json.dumps(result, indent=2))
    return result


def summarise(results: list[dict]) -> dict:
    """Return the distribution over seeds: per part, each seed's mean and worst page (cells V_rand), the
    median and worst of those, and the median pixel difference and accuracy."""
    out = {}
    for part in ("validation", "test"):
        means = [r[part]["mean"]["cell_v_rand"] for r in results]
        worst = [min(p["cell_v_rand"] for p in r[part]["per_page"]) for r in results]
        out[part] = {
            "cells_v_rand_median_of_means": statistics.median(means),
            "cells_v_rand_worst_mean": min(means),
            "cells_v_rand_worst_page": min(worst),
            "pixel_difference_median": statistics.median(r[part]["mean"]["pixel_difference"] for r in results),
            "accuracy_median": statistics.median(r[part]["mean"]["accuracy"] for r in results),
        }
    out["minutes_median"] = statistics.median(r["minutes"] for r in results)
    return out


def table(results: list[dict], summary: dict, part: str = "test") -> str:
    """Return the per-seed table of `part` as markdown, then the distribution's line."""
    pages = results[0][part]["pages"]
    head = ["seed"] + [f"page {p}" for p in pages] + ["mean", "worst", "pixel diff %", "accuracy", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        v = [p["cell_v_rand"] for p in r[part]["per_page"]]
        cells = [f"{x:.3f}" for x in v] + [f"{r[part]['mean']['cell_v_rand']:.3f}", f"{min(v):.3f}",
                                           f"{r[part]['mean']['pixel_difference']:.2f}",
                                           f"{r[part]['mean']['accuracy']:.4f}", f"{r['minutes']:.1f}"]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    s = summary[part]
    lines.append(f"{part}: median of the seeds' means {s['cells_v_rand_median_of_means']:.3f}, worst mean "
                 f"{s['cells_v_rand_worst_mean']:.3f}, worst page {s['cells_v_rand_worst_page']:.3f}; median pixel "
                 f"difference {s['pixel_difference_median']:.2f} %, accuracy {s['accuracy_median']:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the recipe's name: runs in ROOT/NAME, results in --out")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--preset", default="auto", help="train.py's preset (default auto)")
    parser.add_argument("--root", default="runs/seeds", help="folder of the recipes' run folders")
    parser.add_argument("--data-dir", help="the ISBI stacks (default: $ISBI_DATA_DIR or data/)")
    parser.add_argument("--out", help="the JSON written (default bench/seeds-NAME.json)")
    parser.add_argument("--tta", action="store_true", help="predict with test-time augmentation (8 flips and "
                        "turns averaged), to tune and to score; its scores are kept apart from those without")
    parser.add_argument("train_args", nargs="*", help="after --: more train.py arguments, the same for every seed")
    args = parser.parse_args(argv)
    extra = args.train_args + (["--data-dir", args.data_dir] if args.data_dir else [])
    results = []
    for seed in args.seeds:
        results.append(seed_result(Path(args.root) / args.name / f"seed-{seed}", seed, args.preset, extra,
                                   args.data_dir, args.tta))
        print(f"seed {seed}: test cells V_rand {results[-1]['test']['mean']['cell_v_rand']:.4f}", flush=True)
    summary = summarise(results)
    machine = results[0]["machine"]
    record = {"name": args.name, "preset": args.preset, "train_args": args.train_args, "seeds": args.seeds,
              "tta": args.tta,
              "machine": machine, "precision": results[0]["precision"], "summary": summary, "runs": results,
              "scored_on": hardware.describe()}
    out = Path(args.out or ROOT / "bench" / f"seeds-{args.name}.json")
    files.write_atomic(out, json.dumps(record, indent=2) + "\n")
    print(f"{args.name}: train.py --preset {args.preset} {' '.join(args.train_args)}, seeds {args.seeds}, "
          f"on {machine}, {results[0]['precision']}")
    for part in ("validation", "test"):
        print(table(results, summary, part))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
