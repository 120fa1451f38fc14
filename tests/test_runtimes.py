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


def test_onnx_predicts_within_1e_4_of_keras_in_float32(unet_path):
    import numpy as np

    x = np.random.default_rng(0).random((2, 64, 96, 1), dtype=np.float32)
    onnx, chosen = runtimes.load_for_prediction(unet_path, "onnx")
    assert chosen["runtime"] == "onnx" and isinstance(onnx, runtimes.OnnxModel)
    keras_model = runtimes.load_model(unet_path, precision="float32")
    assert np.abs(onnx.predict_on_batch(x) - keras_model.predict_on_batch(x)).max() < 1e-4


def test_auto_times_both_runtimes_once_and_keeps_the_faster_per_machine_and_model(unet_path, monkeypatch):
    calls = []

    def timed(model, repeats=3):
        calls.append(type(model).__name__)
        return 0.1 if isinstance(model, runtimes.OnnxModel) else 0.3  # here onnxruntime is faster

    monkeypatch.setattr(runtimes, "_seconds_per_call", timed)
    model, chosen = runtimes.load_for_prediction(unet_path, "auto")
    assert chosen == {"runtime": "onnx", "seconds": {"keras": 0.3, "onnx": 0.1}, "cached": False}
    assert isinstance(model, runtimes.OnnxModel) and len(calls) == 2
    again, remembered = runtimes.load_for_prediction(unet_path, "auto")
    assert remembered["cached"] and remembered["runtime"] == "onnx" and len(calls) == 2  # not timed again
    keras_model, forced = runtimes.load_for_prediction(unet_path, "keras")
    assert forced["runtime"] == "keras" and not isinstance(keras_model, runtimes.OnnxModel)
    with pytest.raises(ValueError, match="unknown runtime 'tflite'"):
        runtimes.load_for_prediction(unet_path, "tflite")


def test_predict_says_which_runtime_it_chose(tmp_path, unet_path, capsys):
    import numpy as np
    import tifffile

    import predict

    tifffile.imwrite(tmp_path / "page.tif", np.zeros((32, 32), np.uint8), photometric="minisblack")
    assert predict.main([str(tmp_path / "page.tif"), "--model", str(unet_path), "--runtime", "onnx"]) == 0
    assert "runtime: onnx" in capsys.readouterr().out
