import numpy as np
import pytest
import keras
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import metrics
from callbacks import ChallengeScores
from model import build_unet


def cell_images(n=4, size=64, seed=0):
    """Return (images, labels) float32 (n, size, size, 1): a grid of membranes (0) around cells (1), plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.ones((n, size, size, 1), np.float32)
    labels[:, ::16] = 0
    labels[:, :, ::16] = 0
    images = (0.7 * labels + 0.3 * rng.random(labels.shape)).astype(np.float32)
    return images, labels


def tiny_model():
    model = build_unet((None, None, 1), filters=2)
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    return model


def scalars(log_dir, tag):
    """Return [(step, value)] written under `tag`, read with TensorBoard's own reader."""
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return [(event.step, float(tf.make_ndarray(event.tensor_proto))) for event in acc.Tensors(tag)]


def fit(tmp_path, every, batch_size=1):
    """Fit a tiny model 2 epochs with ChallengeScores, a logs recorder and a checkpoint on val_v_rand."""
    images, labels = cell_images()
    model = tiny_model()
    seen = []  # the keys each epoch's logs held when the callback after ChallengeScores ran
    callbacks = [
        ChallengeScores(images, labels, tmp_path / "challenge", every=every, batch_size=batch_size),
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(sorted(logs))),
        keras.callbacks.ModelCheckpoint(tmp_path / "best.keras", monitor="val_v_rand", mode="max", save_best_only=True),
    ]
    history = model.fit(images, labels, batch_size=2, epochs=2, verbose=0, callbacks=callbacks)
    return model, history.history, seen, images, labels


@pytest.fixture(scope="module")
def every_epoch(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("every_epoch")
    return tmp_path, *fit(tmp_path, every=1, batch_size=3)  # batches of 3 and 1


def test_scores_reach_the_logs_before_the_checkpoint(every_epoch):
    tmp_path, _, history, seen, _, _ = every_epoch
    keys = ("val_v_rand", "val_v_info", "val_v_rand_threshold", "val_v_info_threshold")
    for epoch_keys in seen:
        assert set(keys) <= set(epoch_keys)
    for key in ("val_v_rand", "val_v_info"):
        assert len(history[key]) == 2
        assert all(0.0 <= value <= 1.0 for value in history[key])
    for key in ("val_v_rand_threshold", "val_v_info_threshold"):
        assert all(0.0 <= value <= 0.9 for value in history[key])
    assert (tmp_path / "best.keras").is_file()  # saved only if ModelCheckpoint found val_v_rand


def test_scores_in_tensorboard_at_keras_epoch_steps(every_epoch):
    tmp_path, _, history, _, _, _ = every_epoch
    for tag, key in (("epoch_v_rand", "val_v_rand"), ("epoch_v_info", "val_v_info")):
        written = scalars(tmp_path / "challenge", tag)
        assert [step for step, _ in written] == [0, 1]
        np.testing.assert_allclose([value for _, value in written], history[key], rtol=1e-6)


def test_scores_equal_challenge_scores_of_the_final_predictions(every_epoch):
    _, model, history, _, images, labels = every_epoch
    predictions = np.asarray(model.predict_on_batch(images))[..., 0]  # the last epoch ended on these weights
    direct = [metrics.challenge_scores(p, label) for p, label in zip(predictions, labels[..., 0])]
    for key in ("v_rand", "v_info", "v_rand_threshold", "v_info_threshold"):
        assert history[f"val_{key}"][-1] == pytest.approx(np.mean([scores[key] for scores in direct]), rel=1e-6)


def test_every_two_epochs_scores_only_the_second(tmp_path):
    with pytest.warns(UserWarning, match="val_v_rand available"):  # epoch 0: ModelCheckpoint finds no score
        _, history, seen, _, _ = fit(tmp_path, every=2)
    assert "val_v_rand" not in seen[0] and "val_v_rand" in seen[1]
    assert len(history["val_v_rand"]) == 1
    assert [step for step, _ in scalars(tmp_path / "challenge", "epoch_v_rand")] == [1]
    assert (tmp_path / "best.keras").is_file()


def test_rejects_mismatched_shapes():
    images, labels = cell_images(n=2)
    with pytest.raises(ValueError, match="both be"):
        ChallengeScores(images, labels[:1], "unused")
    with pytest.raises(ValueError, match="positive"):
        ChallengeScores(images, labels, "unused", every=0)
