"""train.py: presets and the command line, training and resuming (after Ctrl-C, SIGKILL, a NaN loss), your own
data as in the README, and the run folder it leaves."""

import dataclasses
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import ROOT
from PIL import Image

import affinities
import data
import files
import runtimes
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
                            batch_size=4, steps_per_epoch=10, epochs=2, learning_rate=3e-3, precision="float32")
    result = train.train(settings)
    losses = result["history"]["loss"]
    assert losses[-1] < losses[0] - 0.05
    assert result["best"].is_file() and result["last"].is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["precision"] == "float32"
    assert summary["final_logs"]["loss"] == pytest.approx(losses[-1])


def test_a_run_records_the_commit_it_started_from_not_the_checkout_it_ends_in(isbi_dir, tmp_path, monkeypatch):
    settings = train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(tmp_path / "run"), epochs=1, steps_per_epoch=1)
    monkeypatch.setattr(train.runs, "git_commit", lambda: "1a2b3c4")
    prepared = train.prepare(settings)
    monkeypatch.setattr(train.runs, "git_commit", lambda: "5d6e7f8+dirty")  # edited while it trained
    train.fit(prepared, train.make_callbacks(prepared))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["commit"] == "1a2b3c4"


def test_rerun_resumes_from_last_epoch_and_clear_all_starts_afresh(isbi_dir, tmp_path, capsys):
    settings = train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(tmp_path / "run"), epochs=1, steps_per_epoch=1)
    train.train(settings)
    result = train.train(train.preset("tiny", data_dir=str(isbi_dir), run_dir=settings.run_dir, epochs=2, steps_per_epoch=1), say=print)
    assert "resuming from" in capsys.readouterr().out
    assert len(result["history"]["loss"]) == 1  # only epoch 2 was trained
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["epochs_done"] == 2
    model = train.load_checkpoint(result["last"])
    assert int(model.optimizer.iterations.numpy()) == 2 * settings.steps_per_epoch

    result = train.train(train.preset("tiny", data_dir=str(isbi_dir), run_dir=settings.run_dir, epochs=1,
                                      steps_per_epoch=1, clear_all=True), say=print)
    out = capsys.readouterr().out
    assert "resuming" not in out and "starting training" in out
    assert json.loads((tmp_path / "run" / "state.json").read_text())["epochs_done"] == 1


def test_batch_norm_run_builds_a_normalised_model_and_resume_refuses_another_width_or_kind(isbi_dir, tmp_path):
    run_dir = str(tmp_path / "run")
    result = train.train(train.preset("tiny", data_dir=str(isbi_dir), run_dir=run_dir, epochs=1, batch_norm=True))
    names = [layer.name for layer in runtimes.load_model(result["last"]).layers]
    assert "CNT_1_conv_1_bn" in names and "EXP_4_conv_2_bn" in names
    # best.keras, for inference, has the normalisation folded into its convolutions
    assert not [name for name in (layer.name for layer in runtimes.load_model(result["best"]).layers) if "_bn" in name]
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


def test_an_averaged_run_validates_and_saves_the_moving_average_and_trains_on_the_weights(isbi_dir, tmp_path):
    from averaging import averaged_weights, trained_weights_kept

    settings = train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(tmp_path / "run"), epochs=1, ema=0.5)
    result = train.train(settings)
    last = train.load_checkpoint(result["last"])  # the weights as trained, and the optimizer's average of them
    trained = [w.copy() for w in last.get_weights()]
    with averaged_weights(last), averaged_weights(last):  # nested: swapped once
        averaged = last.get_weights()
    best = train.load_model(result["best"])
    assert [layer.name for layer in best.layers] == [layer.name for layer in last.layers]
    np.testing.assert_array_equal(np.concatenate([w.ravel() for w in best.get_weights()]),
                                  np.concatenate([w.ravel() for w in averaged]))
    assert any(not np.array_equal(a, t) for a, t in zip(averaged, trained))
    for weight, kept in zip(last.get_weights(), trained):  # back after the block
        np.testing.assert_array_equal(weight, kept)
    split = train.load_data(settings)[0]
    val_x, val_y = split["validation"]
    raw_loss = last.evaluate(val_x, val_y, batch_size=1, verbose=0, return_dict=True)["loss"]
    with averaged_weights(last):
        averaged_loss = last.evaluate(val_x, val_y, batch_size=1, verbose=0, return_dict=True)["loss"]
    validated = result["history"]["val_loss"][0]  # the average's loss, not the trained weights'
    assert abs(validated - averaged_loss) < abs(validated - raw_loss) / 10
    model = train.load_checkpoint(result["last"])
    batches = train.training_batches(settings, split, 0)
    with trained_weights_kept(model):  # a resumed run's first fit leaves the trained weights
        model.fit(batches, epochs=1, steps_per_epoch=2, verbose=0, shuffle=False)
    with averaged_weights(model):
        averaged = model.get_weights()
    assert any(not np.array_equal(a, t) for a, t in zip(averaged, model.get_weights()))
    model.fit(batches, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)  # a run's last fit ends on the average, as Keras's
    ended = model.get_weights()
    with averaged_weights(model):
        for weight, average in zip(ended, model.get_weights()):
            np.testing.assert_array_equal(weight, average)


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


def test_an_affinity_run_learns_the_label_affinities_and_keeps_the_best_cells(isbi_dir, tmp_path):
    settings = train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(tmp_path / "run"), epochs=2,
                            challenge_every=1, target="affinities", offsets="1,3", monitor="val_cell_v_rand")
    split = data.load_split(isbi_dir)
    x, y = train.training_batches(settings, split)[0]
    assert y.shape == x.shape[:3] + (8,)  # 4 affinities, then which of their pairs stay inside the crop
    # the targets are the affinities of the augmented label: nearest-neighbour cuts sit on membranes
    assert 0 < (y[..., :2] == 0).mean() < 0.3 and set(np.unique(y)) <= {0.0, 1.0}
    inside = affinities.inside(x.shape[1:3], ((-1, 0), (0, -1), (-3, 0), (0, -3)))
    np.testing.assert_array_equal(y[..., 4:], np.broadcast_to(inside, y[..., 4:].shape))
    result = train.train(settings)
    assert runtimes.load_model(result["best"]).output_shape[-1] == 4
    scores = result["history"]["val_cell_v_rand"]
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["best"] == pytest.approx(max(scores)) and state["settings"]["target"] == "affinities"


@pytest.mark.parametrize("changes, message", [({"target": "boundaries"}, "unknown target"),
                                              ({"target": "affinities", "offsets": "3,9"}, "start at 1"),
                                              ({"target": "affinities", "loss": "weighted_bce"}, "weighs membrane")])
def test_bad_targets_are_refused_before_training(tmp_path, isbi_dir, changes, message):
    with pytest.raises(ValueError, match=message):
        train.train(train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(tmp_path / "run"), **changes))


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
    model = train.load_checkpoint(result["last"])
    assert int(model.optimizer.iterations.numpy()) == total
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-5, rel=1e-3)
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        train.learning_rate(dataclasses.replace(settings, lr_schedule="step"))


def test_augmenting_in_worker_processes_trains_on_the_same_batches(isbi_dir, tmp_path):
    histories = []
    for workers in (0, 2):
        settings = train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(tmp_path / f"w{workers}"), epochs=2,
                                steps_per_epoch=2, precision="float32", data_workers=workers)
        histories.append(train.train(settings)["history"])
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(histories[1][key], histories[0][key], rtol=1e-5)




# Runs train.main(argv) for each [step, signal, argv] in turn, sending this process the signal
# right after optimizer step `step` (when the backup of that step, if any, is written; 0: never).
DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {root!r})
    import callbacks, files, train

    original = callbacks.StepBackup.on_train_batch_end
    target = {{"step": 0, "signal": "SIGKILL"}}

    def on_train_batch_end(self, batch, logs=None):
        original(self, batch, logs)
        if int(self.model.optimizer.iterations.numpy()) == target["step"]:
            os.kill(os.getpid(), getattr(signal, target["signal"]))

    callbacks.StepBackup.on_train_batch_end = on_train_batch_end
    for step, name, argv in json.loads(sys.argv[1]):
        target.update(step=step, signal=name)
        print("exit code", train.main(argv), flush=True)

    if len(sys.argv) > 2:  # then SIGKILL this process in the middle of writing a model over that file
        from keras.src.saving import saving_lib

        def half_then_kill(model, fileobj, weights_format):
            fileobj.write(b"PK\\x03\\x04 half a zip file")
            fileobj.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        model = train.load_checkpoint(sys.argv[2])
        model.set_weights([w * 0 for w in model.get_weights()])
        saving_lib._save_model_to_fileobj = half_then_kill
        files.write_atomic(sys.argv[2], model.save)
""")


# 2 epochs x 4 steps, a backup every 3 steps (after steps 3 and 6).
RUN = ["--preset", "tiny", "--deterministic", "--precision", "float32", "--steps-per-epoch", "4", "--epochs", "2",
       "--backup-every", "3"]


def run_driver(tmp, runs, data_dir, kill_while_writing=None):
    script = tmp / "driver.py"
    script.write_text(DRIVER.format(root=str(ROOT)))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "ISBI_DATA_DIR": str(data_dir)}
    extra = [str(kill_while_writing)] if kill_while_writing else []
    return subprocess.run([sys.executable, str(script), json.dumps(runs), *extra], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")  # built once per worker process, whatever ran in between
def interrupted_runs(tmp_path_factory, isbi_dir):
    """An uninterrupted run; and the same run Ctrl-C'd after step 2, rerun, SIGKILLed after step 7, rerun
    (then SIGKILLed while it writes other weights over its last.keras)."""
    tmp = tmp_path_factory.mktemp("runs")
    first = run_driver(tmp, [[0, "SIGKILL", RUN + ["--run-dir", "ref"]],
                             [2, "SIGINT", RUN + ["--run-dir", "run"]],
                             [7, "SIGKILL", RUN + ["--run-dir", "run"]]], isbi_dir)
    killed_backup_steps = int(train.load_checkpoint(tmp / "run" / "backup.keras").optimizer.iterations.numpy())
    second = run_driver(tmp, [[0, "SIGKILL", RUN + ["--run-dir", "run"]]], isbi_dir, "run/last.keras")
    return {"tmp": tmp, "first": first, "second": second, "killed_backup_steps": killed_backup_steps}


def weights(path):
    return train.load_checkpoint(path).get_weights()


def batch_losses(log_dir):
    """Return {step: batch_loss} as TensorBoard shows it (restarts applied)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import (
        EventAccumulator,
    )
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    steps = [event.step for event in events.Tensors("batch_loss")]
    assert len(steps) == len(set(steps)), f"duplicate steps in {log_dir}: {steps}"
    return {event.step: tensor_util.make_ndarray(event.tensor_proto).item() for event in events.Tensors("batch_loss")}


@pytest.mark.xdist_group("interrupted_runs")  # with the other tests of its module fixture
def test_ctrl_c_saves_a_backup_and_says_how_to_resume_and_the_rerun_resumes(interrupted_runs):
    first = interrupted_runs["first"]
    assert "exit code 130" in first.stdout, first.stderr[-3000:]
    assert ("interrupted (SIGINT) in epoch 1 after batch 2 (optimizer step 2); saved run/backup.keras. "
            "Run the same command again to resume from there.") in first.stderr
    assert "resuming from run/backup.keras in epoch 1 after batch 2 (optimizer step 2)" in first.stdout
    assert "Traceback" not in first.stderr


@pytest.mark.xdist_group("interrupted_runs")  # with the other tests of its module fixture
def test_sigkilled_run_resumes_mid_epoch_and_ends_with_the_uninterrupted_weights(interrupted_runs):
    tmp, first, second = interrupted_runs["tmp"], interrupted_runs["first"], interrupted_runs["second"]
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert interrupted_runs["killed_backup_steps"] == 6  # killed after step 7: the step-6 backup is the newest
    assert "exit code 0" in second.stdout, second.stderr[-3000:]
    assert "resuming from run/backup.keras in epoch 2 after batch 2 (optimizer step 6)" in second.stdout
    resumed = train.load_checkpoint(tmp / "run" / "last.keras")
    assert int(resumed.optimizer.iterations.numpy()) == 8
    for got, want in zip(resumed.get_weights(), weights(tmp / "ref" / "last.keras")):
        np.testing.assert_array_equal(got, want)
    assert json.loads((tmp / "run" / "state.json").read_text())["epochs_done"] == 2


@pytest.mark.xdist_group("interrupted_runs")  # with the other tests of its module fixture
def test_a_process_killed_while_writing_a_model_leaves_the_previous_file(interrupted_runs):
    tmp, second = interrupted_runs["tmp"], interrupted_runs["second"]
    assert second.returncode == -signal.SIGKILL
    for got, want in zip(weights(tmp / "run" / "last.keras"), weights(tmp / "ref" / "last.keras")):
        np.testing.assert_array_equal(got, want)  # not the zeros, not half a file
    assert [p.name for p in (tmp / "run").glob(".last.*.part.keras")]  # the half-written one kept its own name


@pytest.mark.xdist_group("interrupted_runs")  # with the other tests of its module fixture
def test_resumed_curves_have_every_step_once_and_deterministic_runs_give_identical_losses(interrupted_runs):
    tmp = interrupted_runs["tmp"]
    reference = batch_losses(tmp / "ref" / "logs" / "train")
    resumed = batch_losses(tmp / "run" / "logs" / "train")
    assert sorted(reference) == sorted(resumed) == list(range(1, 9))  # no gap, no duplicate
    # Identical step by step where both runs log the same running mean: before the first interruption
    # and at the start of epoch 2 (after a resume, Keras' running mean of the epoch starts afresh).
    for step in (1, 2, 5, 6):
        assert resumed[step] == reference[step], step


def test_sigterm_raises_keyboard_interrupt_inside_the_training_block():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with train.interrupts_raise():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # the handler runs between two bytecodes
                pass
    assert signal.getsignal(signal.SIGTERM) == before


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_backup(isbi_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = train.main(["--preset", "tiny", "--data-dir", str(isbi_dir), "--run-dir", str(run_dir), "--precision",
                       "float32", "--learning-rate", "1e30", "--backup-every", "1"])
    assert code == 1
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "the loss became nan in epoch 1 after batch" in message[0], err[-2000:]
    step = int(message[0].split("optimizer step ")[1].split(")")[0])
    backup = train.load_checkpoint(run_dir / "backup.keras")
    assert int(backup.optimizer.iterations.numpy()) == step - 1  # the NaN step was not saved
    assert all(np.isfinite(w).all() for w in backup.get_weights())
    assert not (run_dir / "last.keras").exists()


TINY = ["--preset", "tiny", "--crop", "256", "--epochs", "1", "--steps-per-epoch", "2"]


def test_train_settings_for_own_data_parse_from_the_command_line():
    settings = train.parse_args(["--preset", "tiny", "--images", "im", "--labels", "lab", "--val-images", "vi",
                                 "--val-labels", "vl", "--split", "0.25", "--membrane-value", "255",
                                 "--allow-unpaired", "--crop", "128"])
    assert (settings.images, settings.labels, settings.val_images, settings.val_labels) == ("im", "lab", "vi", "vl")
    assert settings.split == "0.25" and settings.membrane_value == 255 and settings.allow_unpaired is True
    assert settings.crop == 128
    defaults = train.parse_args(["--preset", "cpu"])
    assert defaults.images is None and defaults.membrane_value is None and defaults.allow_unpaired is False


def readme_commands() -> list[list[str]]:
    """Return the commands of the first code block of the README's 'Your own data' section."""
    section = (ROOT / "README.md").read_text().split("## Your own data", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.split("#", 1)[0].strip()]


@pytest.fixture(scope="session")  # built once per worker process, whatever ran in between
def example(tmp_path_factory, isbi_dir):
    """Run the README example (train.py with the tiny preset, 256x256 crops) in a fresh folder; return the folder."""
    folder = tmp_path_factory.mktemp("own_data")
    old = os.getcwd()
    os.chdir(folder)
    try:
        for command in readme_commands():
            assert command[0] == "python", command
            stem = Path(command[1]).stem
            module = importlib.import_module("data_cli" if stem == "data" else stem)  # data.py hands over to it
            args = command[2:] + (TINY if command[1] == "train.py" else [])
            assert module.main(args) == 0, command
    finally:
        os.chdir(old)
    return folder


@pytest.mark.xdist_group("example")  # with the other tests of its module fixture
def test_readme_example_trains_on_700x900_pages_with_256_crops_and_predicts(example):
    report = json.loads((example / "runs" / "my_data" / "data_report.json").read_text())
    assert report["parts"]["train"]["sizes"] == {"700x900": 5}
    assert report["network_input"] == {"train": [700, 900], "validation": [688, 896]}
    assert (example / "runs" / "my_data" / "data_report.txt").read_text().startswith("data: images my_data/images")
    settings = train.preset("tiny", images=str(example / "my_data" / "images"),
                            labels=str(example / "my_data" / "masks"), split="0.2", crop=256)
    split, _ = train.load_data(settings)
    x, y = train.training_batches(settings, split)[0]
    assert x.shape == y.shape == (settings.batch_size, 256, 256, 1)
    logs = json.loads((example / "runs" / "my_data" / "summary.json").read_text())["final_logs"]
    assert {"membrane_dice", "membrane_iou", "val_membrane_dice", "val_membrane_iou", "val_uniform"} <= set(logs)
    probabilities = tifffile.imread(example / "my_data" / "predicted" / "page-05-prediction.tif")
    assert probabilities.shape == (700, 900) and probabilities.dtype == np.float32
    mask_tiff = tifffile.imread(example / "my_data" / "predicted" / "page-05-prediction-mask.tif")
    mask_png = np.array(Image.open(example / "my_data" / "predicted" / "page-05-prediction.png"))
    np.testing.assert_array_equal(mask_tiff, np.where(probabilities > 0.5, 255, 0))
    np.testing.assert_array_equal(mask_png, mask_tiff)


def run_python(code: str, cwd: Path, pythonpath: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.xdist_group("example")  # with the other tests of its module fixture
def test_saved_models_with_the_project_metrics_load_with_plain_load_model_in_a_fresh_process(example, tmp_path):
    run = example / "runs" / "my_data"
    # best.keras: in a process that never imports the project (its folder is not even on the path).
    fresh = run_python(
        "import keras, numpy as np\n"
        f"m = keras.models.load_model({str(run / 'best.keras')!r})\n"
        "print(m.predict(np.zeros((1, 64, 64, 1), 'float32'), verbose=0).shape)\n",
        tmp_path, None)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "(1, 64, 64, 1)" in fresh.stdout
    # last.keras, compiled with the custom loss and metrics: plain load_model, safe_mode on, once they are imported.
    compiled = run_python(
        "import keras, train\n"
        f"m = keras.models.load_model({str(run / 'last.keras')!r}, safe_mode=True)\n"
        "print(m.compiled, m.get_compile_config()['metrics'])\n",
        tmp_path, str(ROOT))
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    assert compiled.stdout.startswith("True") and "MembraneDice" in compiled.stdout and "MembraneIoU" in compiled.stdout


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="make and a git checkout are needed")
def test_make_run_writes_into_its_run_folder_and_leaves_the_checkout_as_it_was(isbi_dir):
    def status():
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout

    before, run = status(), Path("runs") / f"test-make-run-{os.getpid()}"
    try:
        done = subprocess.run(["make", "--no-print-directory", "-o", "setup", "-o", ".venv/.installed", "run",
                               "PRESET=tiny", f"RUN={run}", f"PY={sys.executable}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=600, env={**os.environ, "ISBI_DATA_DIR": str(isbi_dir)})
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"this run's model, scores and figures: {run}/best.keras" in done.stdout
        written = {p.name for p in (ROOT / run / "images").iterdir()}
        assert {"unet_results.png", "loss.png", "acc.png", "labels.png"} <= written
        card = json.loads((ROOT / run / "best.json").read_text())  # the cells' parameters, chosen on validation pages
        assert card["segmentation"]["tuned_on"]["pages"] == list(data.VALIDATION_PAGES)
        assert status() == before
    finally:
        shutil.rmtree(ROOT / run, ignore_errors=True)


def test_load_data_fetches_missing_isbi_stacks_only_when_asked(tmp_path, isbi_dir, monkeypatch):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(isbi_dir))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv(data.URL_ENV, f"http://127.0.0.1:{server.server_address[1]}/")
        settings = train.preset("tiny", data_dir=str(tmp_path / "data"))
        with pytest.raises(files.DataError, match="data not found"):
            train.load_data(settings)
        parts, report = train.load_data(settings, fetch=True)  # what the notebook does
        assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(data.FILES)
        assert parts["train"][0].shape == (24, 512, 512, 1) and report["split"] == "isbi"
    finally:
        server.shutdown()


def test_a_budgeted_tiny_run_measures_this_machine_and_says_what_it_chose(isbi_dir, tmp_path):
    lines = []
    settings = train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(tmp_path / "run"), epochs=1,
                            steps_per_epoch=50, budget=45.0)
    result = train.train(settings, say=lines.append)
    (line,) = [line for line in lines if line.startswith("sized to this machine")]
    saved = json.loads((tmp_path / "run" / "settings.json").read_text())
    sizing = saved["sizing"]
    assert 0 < sizing["seconds_per_step"] < 20 and saved["steps_per_epoch"] == sizing["steps_per_epoch"] <= 50
    assert len(result["history"]["loss"]) == 1
    assert f"{sizing['seconds_per_step']:.2f} s per train step" in line


@pytest.mark.parametrize("target", ["membranes", "affinities"])
def test_a_context_run_sees_three_sections_and_resume_refuses_another_context(isbi_dir, tmp_path, target):
    settings = train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(tmp_path / "run"), context=3, target=target,
                            offsets="1,3")
    split, _ = train.load_data(settings)
    assert split["train"][0].shape[-1] == 3 and split["train"][1].shape[-1] == 1
    x, y = train.training_batches(settings, split)[0]
    assert x.shape == (settings.batch_size, settings.crop, settings.crop, 3)
    result = train.train(settings)
    model = runtimes.load_model(result["best"])
    assert model.input_shape[-1] == 3 and model.output_shape[-1] == (1 if target == "membranes" else 4)
    with pytest.raises(ValueError, match="context"):
        train.train(dataclasses.replace(settings, context=1, epochs=3))
    with pytest.raises(ValueError, match="odd number of sections"):
        train.preset("tiny", context=2)
