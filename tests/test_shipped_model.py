"""The model shipped in models/ loads, segments the test pages, and reproduces the scores on its card."""

import json

import pytest

import data
import evaluate
import export
import predict

CARD = predict.DEFAULT_MODEL.with_suffix(".json")


@pytest.fixture(scope="module")
def shipped_scores(isbi_dir):
    return evaluate.evaluate(predict.DEFAULT_MODEL, isbi_dir, pages=data.TEST_PAGES)


def test_the_shipped_model_segments_the_test_pages_well(shipped_scores):
    # Floors below what it reaches (README: mean V_rand 0.949, worst page 0.888, accuracy 0.907), far above
    # an untrained network's (V_rand 0.06-0.09 on these pages, 16 filters, seed 0).
    assert shipped_scores["mean"]["v_rand"] > 0.93
    assert min(page["v_rand"] for page in shipped_scores["per_page"]) > 0.85
    assert shipped_scores["mean"]["accuracy"] > 0.89


def test_the_shipped_model_reproduces_the_scores_on_its_card(shipped_scores):
    card = json.loads(CARD.read_text())
    assert card["sha256"] == export.sha256(predict.DEFAULT_MODEL)
    assert card["test_pages"] == list(data.TEST_PAGES)
    for key, value in card["test_scores"]["mean"].items():
        # The card was measured on the machine that trained it; another CPU's rounding moves the last digits.
        assert shipped_scores["mean"][key] == pytest.approx(value, rel=0.01, abs=0.002), key
