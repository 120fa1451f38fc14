"""bench/seeds.py: a recipe trained over seeds, tuned on the validation pages, scored on validation and test pages,
summarised as a distribution; a rerun skips what is done."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import seeds  # noqa: E402


def fake_run(seed: int, test_pages: list[float], validation: float, minutes: float) -> dict:
    def part(values, pages):
        per_page = [{"cell_v_rand": v, "pixel_difference": 10.0 + seed, "accuracy": 0.9} for v in values]
        return {"pages": pages, "per_page": per_page,
                "mean": {"cell_v_rand": sum(values) / len(values), "pixel_difference": 10.0 + seed, "accuracy": 0.9}}

    return {"seed": seed, "test": part(test_pages, [0, 10, 20]), "validation": part([validation] * 3, [5, 15, 25]),
            "minutes": minutes}


def test_the_summary_gives_the_median_of_the_seeds_means_and_the_worst_page_of_any_seed():
    runs = [fake_run(1, [0.97, 0.99, 0.90], 0.95, 8.0), fake_run(2, [0.96, 0.98, 0.96], 0.96, 9.0),
            fake_run(3, [0.95, 0.97, 0.84], 0.93, 10.0)]
    summary = seeds.summarise(runs)
    means = sorted(r["test"]["mean"]["cell_v_rand"] for r in runs)
    assert summary["test"]["cells_v_rand_median_of_means"] == pytest.approx(means[1])
    assert summary["test"]["cells_v_rand_worst_mean"] == pytest.approx(means[0])
    assert summary["test"]["cells_v_rand_worst_page"] == pytest.approx(0.84)
    assert summary["validation"]["cells_v_rand_median_of_means"] == pytest.approx(0.95)
    assert summary["test"]["pixel_difference_median"] == pytest.approx(12.0)
    assert summary["minutes_median"] == 9.0
    text = seeds.table(runs, summary)
    assert text.count("\n| ") == 3 and "| 3 | 0.950 | 0.970 | 0.840 |" in text and "worst page 0.840" in text


@pytest.mark.filterwarnings("ignore:the map is uniform")  # a tiny model trained for 6 steps
def test_a_tiny_recipe_is_trained_tuned_and_scored_and_a_rerun_only_reads_the_results(isbi_dir, tmp_path, capsys):
    out = tmp_path / "seeds.json"
    args = ["--name", "tiny", "--seeds", "1", "--preset", "tiny", "--root", str(tmp_path / "runs"), "--out", str(out),
            "--data-dir", str(isbi_dir)]
    assert seeds.main(args) == 0
    record = json.loads(out.read_text())
    (run,) = record["runs"]
    assert run["seed"] == 1 and record["preset"] == "tiny" and record["machine"]
    assert run["test"]["pages"] == [0, 10, 20] and run["validation"]["pages"] == [5, 15, 25]
    assert all(0 <= page["cell_v_rand"] <= 1 for page in run["test"]["per_page"])
    assert run["segmentation"]["tuned_on"]["pages"] == [5, 15, 25]
    assert record["summary"]["test"]["cells_v_rand_median_of_means"] == run["test"]["mean"]["cell_v_rand"]
    folder = tmp_path / "runs" / "tiny" / "seed-1"
    card = json.loads((folder / "best.json").read_text())
    assert card["segmentation"]["tuned_on"]["pages"] == [5, 15, 25]
    stamps = {path.name: path.stat().st_mtime_ns for path in folder.iterdir() if path.is_file()}
    capsys.readouterr()
    assert seeds.main(args) == 0
    assert "$ " not in capsys.readouterr().out  # no training command was run again
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir() if path.is_file()} == stamps
