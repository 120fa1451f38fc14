"""runtimes.py: the model card beside a model, and the segmentation it names (the loaders are tested in test_export)."""

import json

import pytest

import affinities
import runtimes
import segment


def test_card_path_sits_beside_the_model():
    assert runtimes.card_path("models/unet-isbi-cpu.keras").as_posix() == "models/unet-isbi-cpu.json"
    assert runtimes.card_path("dist/savedmodel").as_posix() == "dist/savedmodel.json"


def test_without_a_card_a_membrane_model_gets_the_multicut_and_an_affinity_model_the_mutex_watershed(tmp_path):
    model = tmp_path / "best.keras"
    assert runtimes.model_card(model) == {}
    assert runtimes.segmentation_for(model, 1) == ("multicut", segment.SegmentParams(), None)
    assert runtimes.segmentation_for(model, 8) == ("mws", segment.SegmentParams(), affinities.OFFSETS)
    with pytest.raises(ValueError, match="4 channels but 8 offsets"):
        runtimes.segmentation_for(model, 4)


def test_a_run_folder_gives_its_offsets_and_a_card_its_tuned_parameters(tmp_path):
    model = tmp_path / "best.keras"
    (tmp_path / "settings.json").write_text(json.dumps({"target": "affinities", "offsets": "1,3"}))
    method, params, offsets = runtimes.segmentation_for(model, 4)
    assert method == "mws" and offsets == ((-1, 0), (0, -1), (-3, 0), (0, -3))
    card = {"segmentation": {"method": "mws", "params": {"min_size": 25, "strides": [1, 1]}},
            "training": {"settings": {"target": "affinities", "offsets": "1,3"}}}
    runtimes.card_path(model).write_text(json.dumps(card))
    assert runtimes.segmentation_for(model, 4)[1] == segment.SegmentParams(min_size=25, strides=(1, 1))
    # another method asked for: its own defaults, not the parameters tuned for mws
    assert runtimes.segmentation_for(model, 4, "multicut")[:2] == ("multicut", segment.SegmentParams())
