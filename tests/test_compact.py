"""A compact model (8-bit kernels in a .npz) loads as the Keras model it was written from, within half a step a weight."""

import numpy as np
import pytest

import cards
import compact
import runtimes
from files import DataError
from model import build_unet, inference_model, load_model, save_compact


def test_each_kernel_channel_is_scaled_to_127_steps_and_moves_by_at_most_half_a_step():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 4, 5)).astype(np.float32) * np.array([1, 10, 0.01, 0, 3], np.float32)
    steps, scale = compact.quantize(kernel)
    assert steps.dtype == np.int8 and scale.shape == (5,) and scale.dtype == np.float32
    largest = np.abs(steps).reshape(-1, 5).max(axis=0)
    assert list(largest[[0, 1, 2, 4]]) == [127] * 4 and largest[3] == 0  # an all-zero channel stays zero
    error = np.abs(steps * scale - kernel)
    assert np.all(error <= scale / 2 * (1 + 1e-6))


def test_biases_are_kept_exactly_and_every_weight_comes_back_in_order(tmp_path):
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=(3, 3, 1, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32),
               rng.normal(size=(1, 1, 4, 2)).astype(np.float32), np.zeros(2, np.float32)]
    path = tmp_path / "m.npz"
    compact.write(path, '{"config": {"note": "ü"}}', weights)
    assert compact.read_config(path) == {"config": {"note": "ü"}}
    back = compact.read_weights(path)
    assert [w.shape for w in back] == [w.shape for w in weights] and all(w.dtype == np.float32 for w in back)
    np.testing.assert_array_equal(back[1], weights[1])
    np.testing.assert_array_equal(back[3], weights[3])
    for got, kept in ((back[0], weights[0]), (back[2], weights[2])):
        assert np.abs(got - kept).max() <= np.abs(kept).max() / 254 * (1 + 1e-6)


@pytest.mark.parametrize("sections", [1, 3])
def test_a_model_saved_compact_predicts_as_the_original_from_a_quarter_of_the_space(tmp_path, sections):
    model = inference_model(build_unet((None, None, sections), filters=8, batch_norm=True), float32=True)
    full, small = tmp_path / "model.keras", tmp_path / "model.npz"
    model.save(full)
    assert save_compact(model, small) == small
    assert small.stat().st_size < 0.3 * full.stat().st_size
    loaded = load_model(small)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    batch = np.random.default_rng(2).uniform(size=(2, 64, 64, sections)).astype(np.float32)
    expected = model.predict_on_batch(batch)
    assert np.abs(loaded.predict_on_batch(batch) - expected).max() < 0.01
    assert runtimes.model_kind(small) == "keras" and runtimes.is_model(small)
    io = cards.model_io(small)  # read from the configuration, without loading the model
    assert (io.context, io.channels) == (sections, 1)


def test_a_compact_model_says_it_cannot_be_trained_on_and_other_archives_are_refused(tmp_path):
    model = build_unet((None, None, 1), filters=2)
    path = save_compact(model, tmp_path / "model.npz")
    with pytest.raises(DataError, match="holds no optimizer"):
        load_model(path, custom_objects={})
    other = tmp_path / "arrays.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(DataError, match="not a compact model"):
        load_model(other)
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(DataError, match="not a numpy .npz archive"):
        load_model(tmp_path / "text.npz")
