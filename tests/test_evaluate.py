import json

import numpy as np
import pytest

import evaluate
import train


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory, isbi_dir):
    run_dir = tmp_path_factory.mktemp("run")
    return train.train(train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(run_dir), epochs=1))["best"]


def test_scores_match_direct_computation():
    labels = np.zeros((2, 4, 4, 1))
    labels[1] = 1
    predictions = np.full((2, 4, 4, 1), 0.25)
    scores = evaluate.score_pages(labels, predictions)
    assert scores[0] == {"pixel_difference": 25.0, "accuracy": 1.0}
    assert scores[1] == {"pixel_difference": 75.0, "accuracy": 0.0}


def test_evaluate_scores_the_three_test_pages(tiny_model_path, isbi_dir, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert evaluate.main([str(tiny_model_path), "--data-dir", str(isbi_dir), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["pages"] == [0, 10, 20]
    assert len(saved["per_page"]) == 3
    assert 0 <= saved["mean"]["pixel_difference"] <= 100
    assert "mean" in capsys.readouterr().out


def test_missing_model_file_is_a_clear_error(tmp_path, capsys):
    assert evaluate.main([str(tmp_path / "none.keras")]) == 1
    assert "no such model file" in capsys.readouterr().err
