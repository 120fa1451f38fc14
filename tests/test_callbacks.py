import json

import numpy as np
import pytest
import keras
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import ImageHistory, TimeLimit, TrainingState, prediction_grid, to_uint8
from model import build_unet


def tiny_model():
    model = build_unet((None, None, 1), filters=2)
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    return model


def toy_data(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, size, size, 1)).astype("float32")
    return x, (x > 0.5).astype("float32")


def decoded_images(log_dir, tag):
    """Return [(step, HxW uint8)] written under `tag`, read with TensorBoard's own reader."""
    import io

    from PIL import Image

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    out = []
    for event in acc.Tensors(tag):
        png = event.tensor_proto.string_val[2]  # [width, height, png]
        out.append((event.step, np.asarray(Image.open(io.BytesIO(png)))))
    return out


def test_image_history_writes_grids_tensorboard_can_read(tmp_path):
    x, y = toy_data(size=32)
    val_x, val_y = toy_data(n=3, size=48, seed=1)
    model = tiny_model()
    model.fit(x, y, batch_size=1, epochs=2, verbose=0,
              callbacks=[ImageHistory(tmp_path, val_x, val_y, draw_interval=2)])
    batch = decoded_images(tmp_path, "batch")
    assert [step for step, _ in batch] == [2, 4, 6, 8]
    epoch = decoded_images(tmp_path, "epoch")
    assert [step for step, _ in epoch] == [1, 2]
    image = epoch[-1][1]
    assert image.shape[:2] == (2 * 48, 3 * 48)  # predictions on top, labels below
    labels_row = image[48:]
    np.testing.assert_array_equal(labels_row > 127, np.concatenate(list(val_y[..., 0]), axis=1) > 0.5)


def test_image_history_steps_continue_after_resume(tmp_path):
    x, y = toy_data()
    model = tiny_model()
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[ImageHistory(tmp_path, x[:1], y[:1], 1)])
    model.save(tmp_path / "m.keras")
    resumed = keras.models.load_model(tmp_path / "m.keras")
    resumed.fit(x, y, batch_size=2, epochs=2, initial_epoch=1, verbose=0,
                callbacks=[ImageHistory(tmp_path, x[:1], y[:1], 1)])
    assert sorted(step for step, _ in decoded_images(tmp_path, "batch")) == [1, 2, 3, 4]
    assert sorted(step for step, _ in decoded_images(tmp_path, "epoch")) == [1, 2]


def test_to_uint8_scales_and_survives_constant_images():
    assert to_uint8(np.array([0.2, 0.6, 1.0])).tolist() == [0, 128, 255]
    assert to_uint8(np.full((3, 3), 0.7)).max() == 0


def test_prediction_grid_layout():
    preds = np.zeros((3, 4, 5, 1))
    labels = np.ones((3, 4, 5, 1))
    grid = prediction_grid(preds, labels)
    assert grid.shape == (8, 15, 1)
    assert grid[:4].max() == 0 and grid[4:].min() == 1


def test_training_state_saves_model_and_best_value(tmp_path):
    x, y = toy_data()
    model = tiny_model()
    state = TrainingState(tmp_path / "last.keras", tmp_path / "state.json", monitor="loss", extra={"k": 1})
    model.fit(x, y, epochs=2, verbose=0, callbacks=[state])
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["epochs_done"] == 2 and saved["k"] == 1
    assert saved["best"] == pytest.approx(min(saved["best"], saved["logs"]["loss"]))
    reloaded = keras.models.load_model(tmp_path / "last.keras")
    assert int(reloaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())
    assert not list(tmp_path.glob("*.tmp*"))


def test_time_limit_stops_after_the_epoch_that_passes_it(tmp_path):
    x, y = toy_data()
    model = tiny_model()
    history = model.fit(x, y, epochs=5, verbose=0, callbacks=[TimeLimit(0.0, 0, 5)])
    assert len(history.history["loss"]) == 1


@pytest.mark.parametrize("seconds, epochs_trained", [(35.0, 3), (40.0, 4), (1000.0, 5), (None, 5)])
def test_time_limit_stops_before_an_epoch_that_would_end_past_it(seconds, epochs_trained):
    ticks = iter(range(0, 1000, 10))  # every epoch takes 10 s: read at train begin, then at each epoch end
    limit = TimeLimit(seconds, 0, 5, clock=lambda: next(ticks))
    x, y = toy_data()
    history = tiny_model().fit(x, y, epochs=5, verbose=0, callbacks=[limit])
    assert len(history.history["loss"]) == epochs_trained
