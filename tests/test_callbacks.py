"""callbacks.py: one validation prediction per epoch (scores, uniform check, pictures), one owner of "best",
the time limit, every epoch's curves in TensorBoard, and the private Keras members its TensorBoard relies on."""

import dataclasses
import io
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import runs
import runtimes
from callbacks import (
    ImageHistory,
    ModelCheckpoint,
    StepBackup,
    TensorBoard,
    TimeLimit,
    prediction_grid,
    stretch_to_uint8,
)
from model import build_unet
from scores import challenge_scores


def tiny_model():
    model = build_unet((None, None, 1), filters=2)
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    return model


def cell_images(n=4, size=64, seed=0):
    """Return (images, labels) float32 (n, size, size, 1): a grid of membranes (0) around cells (1), plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.ones((n, size, size, 1), np.float32)
    labels[:, ::16] = 0
    labels[:, :, ::16] = 0
    images = (0.7 * labels + 0.3 * rng.random(labels.shape)).astype(np.float32)
    return images, labels


def events(log_dir, tag):
    """Return [(step, tensor proto)] written under `tag`, read with TensorBoard's own reader."""
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return [(event.step, event.tensor_proto) for event in acc.Tensors(tag)] if tag in acc.Tags()["tensors"] else []


def pictures(log_dir, tag):
    return [(step, np.asarray(Image.open(io.BytesIO(proto.string_val[2])))) for step, proto in events(log_dir, tag)]


def scalars(log_dir, tag):
    return [(step, float(tf.make_ndarray(proto))) for step, proto in events(log_dir, tag)]


def steps(log_dir, tag):
    """Return the sorted steps of `tag` over every event file in `log_dir` (a resumed run adds a file)."""
    return sorted(step for file in log_dir.iterdir() for step, _ in events(file, tag))


def tags(log_dir):
    """Return the tags written in every event file in `log_dir`."""
    found = set()
    for file in log_dir.iterdir():
        acc = EventAccumulator(str(file), size_guidance={"tensors": 0})
        acc.Reload()
        found.update(acc.Tags()["tensors"])
    return found


class Recorder(keras.callbacks.Callback):
    """Records the keys of each epoch's logs as this callback sees them."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(sorted(logs))


# ---------------------------------------------------------------- ImageHistory

@pytest.fixture(scope="session")  # built once per worker process, whatever ran in between
def two_epochs(tmp_path_factory):
    """A tiny model fitted 2 epochs with the recorder and the checkpoint placed BEFORE ImageHistory, and Keras's
    TensorBoard callback, which records only every update_freq-th step during validation, AFTER it."""
    tmp = tmp_path_factory.mktemp("two_epochs")
    images, labels = cell_images()
    model = tiny_model()
    recorder = Recorder()
    pages = ImageHistory(images, labels, tmp / "logs", challenge_every=1, draw_interval=2, batch_size=3)
    run = runs.RunFolder(tmp)
    checkpoints = ModelCheckpoint(run, monitor="val_v_rand", mode="max", validation=pages)
    calls = []
    pages.predict = (lambda original: lambda: calls.append(1) or original())(pages.predict)
    board = TensorBoard(str(tmp / "logs"), update_freq=100, histogram_freq=0, write_graph=False)
    history = model.fit(images, labels, batch_size=2, epochs=2, verbose=0, validation_data=(images, labels),
                        callbacks=[checkpoints, recorder, pages, board])
    return tmp, model, history.history, recorder.seen, images, labels, calls


@pytest.mark.xdist_group("two_epochs")  # with the other tests of its module fixture
def test_scores_reach_history_and_the_checkpoint_whatever_the_callback_order(two_epochs):
    tmp, _, history, seen, _, _, _ = two_epochs
    for key in ("val_v_rand", "val_v_info", "val_v_rand_threshold", "val_v_info_threshold", "val_uniform"):
        assert len(history[key]) == 2
    assert all(0.0 < value <= 1.0 for value in history["val_v_rand"])
    state = json.loads((tmp / "state.json").read_text())
    assert state["best"] == pytest.approx(max(history["val_v_rand"]))
    assert (tmp / "best.keras").is_file() and (tmp / "last.keras").is_file()


@pytest.mark.xdist_group("two_epochs")  # with the other tests of its module fixture
def test_validation_pages_are_predicted_once_per_epoch_and_once_per_picture(two_epochs):
    tmp, *_, calls = two_epochs
    batch_pictures = len(pictures(tmp / "logs" / "images", "batch"))  # steps 2 and 4 of 2 x 2
    assert batch_pictures == 2
    assert len(calls) == 2 + batch_pictures


@pytest.mark.xdist_group("two_epochs")  # with the other tests of its module fixture
def test_scores_equal_challenge_scores_of_the_final_predictions(two_epochs):
    _, model, history, _, images, labels, _ = two_epochs
    predictions = np.asarray(model.predict_on_batch(images))[..., 0]  # the last epoch ended on these weights
    direct = [challenge_scores(p, label) for p, label in zip(predictions, labels[..., 0])]
    for key in ("v_rand", "v_info", "v_rand_threshold", "v_info_threshold"):
        assert history[f"val_{key}"][-1] == pytest.approx(np.mean([scores[key] for scores in direct]), rel=1e-6)


@pytest.mark.xdist_group("two_epochs")  # with the other tests of its module fixture
def test_scores_in_tensorboard_at_keras_epoch_steps(two_epochs):
    tmp, _, history, *_ = two_epochs
    for tag, key in (("epoch_v_rand", "val_v_rand"), ("epoch_v_info", "val_v_info")):
        written = scalars(tmp / "logs" / "validation", tag)
        assert [step for step, _ in written] == [0, 1]
        np.testing.assert_allclose([value for _, value in written], history[key], rtol=1e-6)


@pytest.mark.xdist_group("two_epochs")  # with the other tests of its module fixture
def test_epoch_pictures_show_predictions_above_labels(two_epochs):
    tmp, model, _, _, images, labels, _ = two_epochs
    epoch = pictures(tmp / "logs" / "images", "epoch")
    assert [step for step, _ in epoch] == [1, 2]
    picture = epoch[-1][1]
    assert picture.shape[:2] == (2 * 64, 4 * 64)
    np.testing.assert_array_equal(picture[64:] > 127, np.concatenate(list(labels[..., 0]), axis=1) > 0.5)
    expected = stretch_to_uint8(prediction_grid(np.asarray(model.predict_on_batch(images)), labels))[:64, :, 0]
    assert np.abs(picture[:64].astype(int) - expected).max() <= 1


def test_every_two_epochs_scores_only_the_second_and_best_waits_for_a_score(tmp_path, capsys):
    images, labels = cell_images(n=2)
    pages = ImageHistory(images, labels, tmp_path / "logs", challenge_every=2, draw_interval=0)
    recorder = Recorder()
    history = tiny_model().fit(images, labels, epochs=2, verbose=0, callbacks=[
        recorder, pages, ModelCheckpoint(runs.RunFolder(tmp_path), "val_v_rand", "max", validation=pages)]).history
    assert "val_v_rand" not in recorder.seen[0] and "val_v_rand" not in history.get("val_v_rand", [None] * 2)[:0]
    assert len(history["val_v_rand"]) == 1 and len(history["val_uniform"]) == 2
    assert "epoch 1: val_v_rand is missing from the logs" in capsys.readouterr().err
    assert [step for step, _ in scalars(tmp_path / "logs" / "validation", "epoch_v_rand")] == [1]
    assert (tmp_path / "best.keras").is_file()


def test_image_history_steps_continue_after_resume(tmp_path):
    images, labels = cell_images(n=4, size=32)
    model = tiny_model()
    model.fit(images, labels, batch_size=2, epochs=1, verbose=0,
              callbacks=[ImageHistory(images[:1], labels[:1], tmp_path, 0, draw_interval=1)])
    model.save(tmp_path / "m.keras")
    resumed = keras.models.load_model(tmp_path / "m.keras")
    resumed.fit(images, labels, batch_size=2, epochs=2, initial_epoch=1, verbose=0,
                callbacks=[ImageHistory(images[:1], labels[:1], tmp_path, 0, draw_interval=1)])
    assert sorted(step for step, _ in pictures(tmp_path / "images", "batch")) == [1, 2, 3, 4]
    assert sorted(step for step, _ in pictures(tmp_path / "images", "epoch")) == [1, 2]


def test_rejects_mismatched_shapes_and_negative_intervals():
    images, labels = cell_images(n=2)
    with pytest.raises(ValueError, match="of the same pages"):
        ImageHistory(images, labels[:1], "unused")
    with pytest.raises(ValueError, match=">= 0"):
        ImageHistory(images, labels, "unused", challenge_every=-1)


@pytest.fixture(scope="module")
def validation_pages(isbi_dir):
    import data

    return data.load_split(isbi_dir)["validation"]


def constant_model(logit: float) -> keras.Model:
    inputs = keras.Input((None, None, 1))
    constant = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer="zeros",
                                   bias_initializer=keras.initializers.Constant(logit))(inputs)
    return keras.Model(inputs, constant)


def test_uniform_prediction_warning_fires_on_a_constant_model(validation_pages, tmp_path, capsys):
    pages = ImageHistory(*validation_pages, tmp_path, challenge_every=0, draw_interval=0)
    pages.set_model(constant_model(3.0))
    logs = {}
    pages.on_epoch_end(0, logs)
    err = capsys.readouterr().err
    assert "uniform" in err and "normalis" in err.replace("normalize", "normalis") and "polarity" in err
    assert "too little training" in err
    assert logs["val_uniform"] == 1.0


def test_uniform_prediction_warning_stays_silent_on_a_trained_model(validation_pages, tmp_path, capsys):
    pages = ImageHistory(*validation_pages, tmp_path, challenge_every=0, draw_interval=0)
    pages.set_model(runtimes.load_model(runtimes.DEFAULT_MODEL, precision="auto"))
    logs = {}
    pages.on_epoch_end(0, logs)
    assert "uniform" not in capsys.readouterr().err
    assert logs["val_uniform"] == 0.0


# ---------------------------------------------------------------- pictures

def test_stretch_to_uint8_scales_and_survives_constant_images():
    assert stretch_to_uint8(np.array([0.2, 0.6, 1.0])).tolist() == [0, 128, 255]
    assert stretch_to_uint8(np.full((3, 3), 0.7)).max() == 0


def test_prediction_grid_layout():
    grid = prediction_grid(np.zeros((3, 4, 5, 1)), np.ones((3, 4, 5, 1)))
    assert grid.shape == (8, 15, 1)
    assert grid[:4].max() == 0 and grid[4:].min() == 1


# ---------------------------------------------------------------- ModelCheckpoint

def test_checkpoints_save_last_state_and_best_only_when_it_improves(tmp_path):
    images, labels = cell_images(n=2, size=32)
    model = tiny_model()
    values = iter([0.5, 0.7, 0.6])  # the monitored value of epochs 1, 2, 3

    class Monitor(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["score"] = next(values)

    saved = []
    checkpoints = ModelCheckpoint(runs.RunFolder(tmp_path), "score", "max", extra={"k": 1})
    original = checkpoints.run.best

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            saved.append(original.stat().st_mtime_ns if original.is_file() else None)

    model.fit(images, labels, epochs=3, verbose=0, callbacks=[Monitor(), checkpoints, Spy()])
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["epochs_done"] == 3 and state["k"] == 1 and state["best"] == 0.7 and state["monitor"] == "score"
    assert saved[0] is not None and saved[1] != saved[0] and saved[2] == saved[1]  # not rewritten at 0.6
    reloaded = keras.models.load_model(tmp_path / "last.keras")
    assert int(reloaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())
    assert getattr(keras.models.load_model(tmp_path / "best.keras"), "optimizer", None) is None  # for inference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras", "last.keras", "state.json"]


def test_step_backups_leave_the_steps_that_end_an_epoch_to_the_checkpoint(tmp_path):
    images, labels = cell_images(n=4, size=32)  # 4 steps of batch 1 per epoch
    model = tiny_model()
    backup = tmp_path / "backup.keras"
    backed_up = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if backup.is_file():
                backed_up.append(int(keras.models.load_model(backup).optimizer.iterations.numpy()))
                backup.unlink()

    model.fit(images, labels, batch_size=1, epochs=2, verbose=0, callbacks=[StepBackup(backup, 2, 4), Spy()])
    assert backed_up == [2, 6]  # steps 4 and 8 end an epoch
    model.fit(images, labels, batch_size=1, epochs=1, verbose=0, callbacks=[StepBackup(backup, 2), Spy()])
    assert backed_up == [2, 6, 10, 12]  # without the epoch's length, every second step


def test_checkpoints_refuse_an_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="'min' or 'max'"):
        ModelCheckpoint(runs.RunFolder(tmp_path), mode="best")


# ---------------------------------------------------------------- TimeLimit

def test_time_limit_stops_after_the_epoch_that_passes_it():
    images, labels = cell_images(n=2, size=32)
    history = tiny_model().fit(images, labels, epochs=5, verbose=0, callbacks=[TimeLimit(0.0, 0, 5)])
    assert len(history.history["loss"]) == 1


@pytest.mark.parametrize("seconds, epochs_trained", [(35.0, 3), (40.0, 4), (1000.0, 5), (None, 5)])
def test_time_limit_stops_before_an_epoch_that_would_end_past_it(seconds, epochs_trained):
    ticks = iter(range(0, 1000, 10))  # every epoch takes 10 s: read at train begin, then at each epoch end
    limit = TimeLimit(seconds, 0, 5, clock=lambda: next(ticks))
    images, labels = cell_images(n=2, size=32)
    history = tiny_model().fit(images, labels, epochs=5, verbose=0, callbacks=[limit])
    assert len(history.history["loss"]) == epochs_trained


# ---------------------------------------------------------------- TensorBoard

def test_the_private_tensorboard_members_it_sets_still_exist_in_keras(tmp_path):
    board = keras.callbacks.TensorBoard(str(tmp_path))
    board.set_model(tiny_model())
    for name in TensorBoard.PRIVATE_MEMBERS:
        assert hasattr(board, name), f"Keras {keras.__version__} renamed TensorBoard.{name}: update callbacks.py"
    assert callable(board._push_writer) and callable(board._pop_writer) and isinstance(board._writers, dict)


def test_resumed_batch_curves_count_on_from_the_optimizer_step(tmp_path):
    images, labels = cell_images(n=4, size=32)
    model = tiny_model()
    for epochs, initial in ((1, 0), (2, 1)):
        board = TensorBoard(str(tmp_path), update_freq=1, histogram_freq=0, write_graph=False)
        model.fit(images, labels, batch_size=2, epochs=epochs, initial_epoch=initial, verbose=0, callbacks=[board])
    assert steps(tmp_path / "train", "batch_loss") == [1, 2, 3, 4]


def test_every_epochs_curves_and_histograms_are_written_whatever_the_epochs_length(tmp_path):
    images, labels = cell_images(n=3, size=32)  # 3 steps of batch 1 per epoch: none ends on a multiple of 4
    model = tiny_model()
    for epochs, initial in ((2, 0), (3, 2)):  # a run, then its resume
        board = TensorBoard(str(tmp_path), update_freq=4, histogram_freq=1, write_graph=False)
        model.fit(images, labels, batch_size=1, epochs=epochs, initial_epoch=initial, verbose=0,
                  validation_data=(images, labels), callbacks=[board])
    for part in ("train", "validation"):
        assert steps(tmp_path / part, "epoch_loss") == [0, 1, 2], part
    assert steps(tmp_path / "validation", "evaluation_loss_vs_iterations") == [3, 6, 9]
    histograms = sorted(tag for tag in tags(tmp_path / "train") if tag.endswith("/histogram"))
    assert histograms and all(steps(tmp_path / "train", tag) == [0, 1, 2] for tag in histograms)
    assert steps(tmp_path / "train", "batch_loss") == [4, 8]  # the batch curves keep to update_freq


def test_default_training_writes_every_epochs_curves_and_no_weight_histograms(isbi_dir, tmp_path):
    import train

    assert train.TrainSettings().histogram_freq == 0 and train.parse_args(["--histogram-freq", "2"]).histogram_freq == 2
    settings = dataclasses.replace(train.preset("cpu", data_dir=str(isbi_dir), run_dir=str(tmp_path)), filters=4,
                                   crop=64, batch_size=2, steps_per_epoch=3, epochs=2, challenge_every=0, verbose=0,
                                   budget=None, time_limit=None)
    assert settings.update_freq == 100  # the epochs end on steps 3 and 6
    train.train(settings)
    logs = tmp_path / "logs"
    assert steps(logs / "train", "epoch_loss") == steps(logs / "validation", "epoch_loss") == [0, 1]
    assert not [tag for tag in tags(logs / "train") if "histogram" in tag]


def test_cell_scores_of_the_segmenter_reach_the_logs_and_an_affinity_model_is_drawn_by_its_cell_map(tmp_path):
    import affinities
    import segment

    images, labels = cell_images(n=2)
    labels[:, 1::16], labels[:, :, 1::16] = 0, 0  # membranes two pixels wide: their cut is not a tie
    exact = np.stack([affinities.label_affinities(label[..., 0] > 0.5) for label in labels])

    class PerfectAffinities(keras.Model):  # answers the labels' own affinities, whatever the input
        def predict_on_batch(self, x):
            return exact[: len(x)] if len(x) == len(exact) else exact[:1]

    pages = ImageHistory(images, labels, tmp_path / "logs", challenge_every=1, draw_interval=0,
                            batch_size=2, segmenter=lambda page: segment.segment(page, "mws"))
    pages.set_model(PerfectAffinities())
    logs = {}
    pages.on_epoch_end(0, logs)
    assert logs["val_cell_v_rand"] == pytest.approx(1.0) and logs["val_cell_v_info"] == pytest.approx(1.0)
    assert logs["val_uniform"] == 0.0
    (step, grid), = pictures(tmp_path / "logs" / "images", "epoch")
    assert grid.shape[:2] == (2 * images.shape[1], 2 * images.shape[2])
    (step, cells), = pictures(tmp_path / "logs" / "images", "cells")
    assert step == 1 and cells.shape == images.shape[1:3] + (3,)
