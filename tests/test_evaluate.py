import json

import numpy as np
import pytest

import tifffile

import data
import evaluate
import train


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory, isbi_dir):
    run_dir = tmp_path_factory.mktemp("run")
    return train.train(train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(run_dir), epochs=1))["best"]


def test_page_scores_match_direct_computation():
    labels = np.ones((2, 16, 16, 1))
    labels[:, 8, :] = 0  # two cells split by a membrane row
    predictions = np.stack([labels[0] * 0.75 + 0.25 * (1 - labels[0]), np.full_like(labels[0], 0.25)])
    perfect, poor = evaluate.score_pages(labels, predictions)
    assert perfect["pixel_difference"] == pytest.approx(25.0)
    assert perfect["accuracy"] == 1.0
    assert perfect["v_rand"] == pytest.approx(1.0) and perfect["v_info"] == pytest.approx(1.0)
    assert poor["pixel_difference"] == pytest.approx(100 * (15 * 0.75 + 0.25) / 16)
    assert poor["v_rand"] < 1


def test_evaluate_scores_the_three_test_pages(tiny_model_path, isbi_dir, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert evaluate.main([str(tiny_model_path), "--data-dir", str(isbi_dir), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["pages"] == [0, 10, 20]
    assert len(saved["per_page"]) == 3
    assert 0 <= saved["mean"]["pixel_difference"] <= 100
    assert 0 <= saved["mean"]["v_rand"] <= 1 and 0 <= saved["mean"]["v_info"] <= 1
    assert "mean" in capsys.readouterr().out


def test_perfect_probability_tiff_scores_one(isbi_dir, tmp_path):
    _, labels = data.load_isbi(isbi_dir)
    perfect = tmp_path / "perfect.tif"
    tifffile.imwrite(perfect, (labels == 255).astype("float32"), photometric="minisblack")
    result = evaluate.evaluate(perfect, isbi_dir, pages=[0, 10])
    assert result["mean"]["v_rand"] == pytest.approx(1.0)
    assert result["mean"]["v_info"] == pytest.approx(1.0)
    assert result["mean"]["pixel_difference"] == 0 and result["mean"]["pixel_error"] == 0


def test_probability_tiff_of_the_wrong_size_is_refused(isbi_dir, tmp_path):
    wrong = tmp_path / "wrong.tif"
    tifffile.imwrite(wrong, np.zeros((3, 100, 100), "float32"), photometric="minisblack")
    with pytest.raises(data.DataError, match="wrong.tif: pages of"):
        evaluate.evaluate(wrong, isbi_dir)
    with pytest.raises(data.DataError, match="pages must lie in"):
        evaluate.evaluate(wrong, isbi_dir, pages=[30])


def test_missing_model_file_is_a_clear_error(tmp_path, capsys):
    assert evaluate.main([str(tmp_path / "none.keras")]) == 1
    assert "no such model or TIFF file" in capsys.readouterr().err


def test_results_come_from_the_runs_best_model_or_else_the_shipped_one(tmp_path, capsys):
    import predict

    assert evaluate.model_for_results(tmp_path) == predict.DEFAULT_MODEL
    assert "showing the shipped" in capsys.readouterr().out
    (tmp_path / "best.keras").write_bytes(b"")
    assert evaluate.model_for_results(tmp_path) == tmp_path / "best.keras"
