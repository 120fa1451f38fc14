import dataclasses
import json

import numpy as np
import pytest

import data
import train


def test_presets_keep_the_original_defaults():
    original = train.preset("original")
    assert (original.filters, original.crop, original.batch_size, original.steps_per_epoch, original.epochs) == (
        64, 512, 5, 1000, 3)
    assert original.learning_rate == 1e-4 and original.loss == "binary_crossentropy"
    assert train.preset("cpu").filters < 64
    with pytest.raises(ValueError, match="unknown preset"):
        train.preset("huge")


def test_command_line_overrides_preset_fields():
    settings = train.parse_args(["--preset", "tiny", "--epochs", "7", "--learning-rate", "0.01", "--no-resume"])
    assert (settings.epochs, settings.learning_rate, settings.resume, settings.filters) == (7, 0.01, False, 4)
    elastic = train.parse_args(["--preset", "cpu", "--elastic-grid", "3", "--loss", "weighted_bce"])
    assert elastic.augmentation.elastic_grid == 3 and elastic.augmentation.rot90 and elastic.loss == "weighted_bce"
    assert train.PRESETS["cpu"].augmentation.elastic_grid == 0  # the preset itself is left alone
    turned = train.parse_args(["--preset", "cpu", "--rot90", "--vertical-flip", "--zoom-range", "0.1"])
    assert (turned.augmentation.rot90, turned.augmentation.vertical_flip, turned.augmentation.zoom_range) == (
        True, True, 0.1)
    assert train.parse_args(["--preset", "original", "--no-horizontal-flip"]).augmentation.horizontal_flip is False
    assert train.parse_args(["--preset", "tiny", "--batch-norm"]).batch_norm


def test_short_training_on_real_crops_lowers_the_loss(isbi_dir, tmp_path):
    settings = train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(tmp_path / "run"), filters=8, crop=128,
                            batch_size=4, steps_per_epoch=15, epochs=3, learning_rate=3e-3, precision="float32")
    result = train.train(settings)
    losses = result["history"]["loss"]
    assert losses[-1] < losses[0] - 0.05
    assert result["best"].is_file() and result["last"].is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_done"] == 3 and summary["precision"] == "float32"
    assert summary["final_logs"]["loss"] == pytest.approx(losses[-1])


def test_rerun_resumes_from_last_epoch_and_clear_all_starts_afresh(isbi_dir, tmp_path, capsys):
    settings = train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(tmp_path / "run"), epochs=1)
    train.train(settings)
    result = train.train(train.preset("tiny", data_dir=str(isbi_dir), run_dir=settings.run_dir, epochs=2))
    assert "resuming from" in capsys.readouterr().out
    assert len(result["history"]["loss"]) == 1  # only epoch 2 was trained
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["epochs_done"] == 2
    model = train.load_model(result["last"])
    assert int(model.optimizer.iterations.numpy()) == 2 * settings.steps_per_epoch

    result = train.train(train.preset("tiny", data_dir=str(isbi_dir), run_dir=settings.run_dir, epochs=1,
                                      clear_all=True))
    assert "resuming" not in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "state.json").read_text())["epochs_done"] == 1


def test_batch_norm_run_builds_a_normalised_model_and_resume_refuses_another_width_or_kind(isbi_dir, tmp_path):
    run_dir = str(tmp_path / "run")
    result = train.train(train.preset("tiny", data_dir=str(isbi_dir), run_dir=run_dir, epochs=1, batch_norm=True))
    names = [layer.name for layer in train.load_model(result["best"]).layers]
    assert "CNT_1_conv_1_bn" in names and "EXP_4_conv_2_bn" in names
    with pytest.raises(ValueError, match="filters=4"):
        train.train(train.preset("tiny", data_dir=str(isbi_dir), run_dir=run_dir, epochs=2, filters=8,
                                 batch_norm=True))
    with pytest.raises(ValueError, match="batch_norm=True"):
        train.train(train.preset("tiny", data_dir=str(isbi_dir), run_dir=run_dir, epochs=2, batch_norm=False))


def test_missing_data_fails_with_a_clear_message(tmp_path, capsys):
    code = train.main(["--preset", "tiny", "--data-dir", str(tmp_path / "none"), "--run-dir", str(tmp_path / "r")])
    assert code == 1
    assert "ISBI 2012 data not found" in capsys.readouterr().err


def test_checkpoint_can_keep_the_best_validation_v_rand(isbi_dir, tmp_path):
    settings = train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(tmp_path / "run"), epochs=2,
                            challenge_every=1, monitor="val_v_rand")
    result = train.train(settings)
    scores = result["history"]["val_v_rand"]
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["best"] == pytest.approx(max(scores))
    assert result["best"].is_file()


def test_monitor_direction():
    assert train.monitor_mode("val_loss") == "min"
    assert train.monitor_mode("val_v_rand") == "max"
    assert train.monitor_mode("val_accuracy") == "max"


def test_weighted_loss_trains_with_border_weight_maps_as_sample_weights(isbi_dir, tmp_path):
    settings = train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(tmp_path / "run"), epochs=1,
                            loss="weighted_bce")
    split = data.load_split(isbi_dir)
    x, y, w = train.training_batches(settings, split)[0]
    assert w.shape == y.shape[:3] and w.min() >= 1
    assert w[y[..., 0] == 0].mean() > w[y[..., 0] == 1].mean()  # membranes weigh more: the map moved with them
    result = train.train(settings)
    assert np.isfinite(result["history"]["val_loss"][0])


def test_unknown_loss_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown loss"):
        train.train(train.preset("tiny", run_dir=str(tmp_path / "run"), loss="hinge"))


def test_cosine_schedule_decays_to_one_percent_and_an_interrupted_run_resumes_on_it(isbi_dir, tmp_path):
    settings = train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(tmp_path / "run"), epochs=2,
                            lr_schedule="cosine", learning_rate=1e-3)
    schedule = train.learning_rate(settings)
    total = 2 * settings.steps_per_epoch
    assert float(schedule(0)) == pytest.approx(1e-3)
    assert float(schedule(total // 2)) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5), rel=1e-4)
    assert float(schedule(total)) == pytest.approx(1e-5)
    first = train.train(dataclasses.replace(settings, time_limit=1e-3))  # stops after its first epoch
    assert len(first["history"]["loss"]) == 1
    result = train.train(settings)
    assert len(result["history"]["loss"]) == 1
    model = train.load_model(result["last"])
    assert int(model.optimizer.iterations.numpy()) == total
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-5, rel=1e-3)
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        train.learning_rate(dataclasses.replace(settings, lr_schedule="step"))


def test_augmenting_in_worker_processes_trains_on_the_same_batches(isbi_dir, tmp_path):
    histories = []
    for workers in (0, 2):
        settings = train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(tmp_path / f"w{workers}"), epochs=2,
                                precision="float32", data_workers=workers)
        histories.append(train.train(settings)["history"])
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(histories[1][key], histories[0][key], rtol=1e-5)
