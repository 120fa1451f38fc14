import json

import numpy as np
import pytest

import export
import train
from model import build_unet, with_dtype_policy


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, isbi_dir):
    run_dir = tmp_path_factory.mktemp("run")
    train.train(train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(run_dir), epochs=1,
                             precision="mixed_bfloat16"))
    return run_dir


def test_shipped_model_is_float32_without_optimizer_and_predicts_like_the_run(tiny_run, isbi_dir, tmp_path):
    dest = tmp_path / "shipped.keras"
    card = export.ship_model(tiny_run, dest, isbi_dir)
    shipped = train.load_model(dest)
    assert shipped.get_layer("CNT_1_conv_1").compute_dtype == "float32"
    assert getattr(shipped, "optimizer", None) is None
    original = train.load_model(tiny_run / "best.keras")
    x = np.random.default_rng(0).random((1, 64, 64, 1), dtype=np.float32)
    np.testing.assert_allclose(shipped.predict_on_batch(x), original.predict_on_batch(x), atol=0.02)
    saved = json.loads(dest.with_suffix(".json").read_text())
    assert saved["sha256"] == export.sha256(dest) == card["sha256"]
    assert saved["test_pages"] == [0, 10, 20]
    assert saved["training"]["settings"]["filters"] == 4
    assert 0 <= saved["test_scores"]["mean"]["v_rand"] <= 1


def test_export_of_a_run_without_model_is_a_clear_error(tmp_path, capsys):
    assert export.main([str(tmp_path)]) == 1
    assert "no best model" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_each_precision_policy_builds_trains_a_step_and_predicts(policy):
    import keras

    model = build_unet((None, None, 1), filters=2, dtype_policy=policy)
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    x = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    loss = model.train_on_batch(x, (x > 0.5).astype("float32"))
    assert np.isfinite(loss)
    out = model.predict_on_batch(x)
    assert out.dtype == np.float32 and out.shape == x.shape


def test_load_model_recasts_to_the_requested_precision(tmp_path):
    model = build_unet((None, None, 1), filters=2, dtype_policy="mixed_bfloat16")
    model.save(tmp_path / "m.keras")
    recast = train.load_model(tmp_path / "m.keras", precision="float32")
    assert recast.get_layer("CNT_1_conv_1").compute_dtype == "float32"
    assert recast.get_layer("OUT").compute_dtype == "float32"
    back = with_dtype_policy(recast, "mixed_bfloat16")
    x = np.random.default_rng(1).random((1, 32, 32, 1), dtype=np.float32)
    np.testing.assert_array_equal(back.predict_on_batch(x), model.predict_on_batch(x))
