"""Nothing lost, nothing crashes: killed and interrupted runs resume exactly, a NaN loss stops cleanly,
half-written files never replace good ones, and every bad input gives one clear error line."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile
from PIL import Image

import callbacks
import data
import evaluate
import predict
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs train.main(argv) for each [step, signal, argv] in turn, sending this process the signal
# right after optimizer step `step` (when the backup of that step, if any, is written; 0: never).
DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {root!r})
    import callbacks, train

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

        model = train.load_model(sys.argv[2])
        model.set_weights([w * 0 for w in model.get_weights()])
        saving_lib._save_model_to_fileobj = half_then_kill
        callbacks.save_model_atomic(model, sys.argv[2])
""")

# 2 epochs x 4 steps, a backup every 3 steps (after steps 3 and 6).
RUN = ["--preset", "tiny", "--deterministic", "--precision", "float32", "--steps-per-epoch", "4", "--epochs", "2",
       "--backup-every", "3"]


def run_driver(tmp, runs, data_dir, kill_while_writing=None):
    script = tmp / "driver.py"
    script.write_text(DRIVER.format(root=ROOT))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "ISBI_DATA_DIR": str(data_dir)}
    extra = [str(kill_while_writing)] if kill_while_writing else []
    return subprocess.run([sys.executable, str(script), json.dumps(runs), *extra], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def interrupted_runs(tmp_path_factory, isbi_dir):
    """An uninterrupted run; and the same run Ctrl-C'd after step 2, rerun, SIGKILLed after step 7, rerun
    (then SIGKILLed while it writes other weights over its last.keras)."""
    tmp = tmp_path_factory.mktemp("runs")
    first = run_driver(tmp, [[0, "SIGKILL", RUN + ["--run-dir", "ref"]],
                             [2, "SIGINT", RUN + ["--run-dir", "run"]],
                             [7, "SIGKILL", RUN + ["--run-dir", "run"]]], isbi_dir)
    killed_backup_steps = int(train.load_model(tmp / "run" / "backup.keras").optimizer.iterations.numpy())
    second = run_driver(tmp, [[0, "SIGKILL", RUN + ["--run-dir", "run"]]], isbi_dir, "run/last.keras")
    return {"tmp": tmp, "first": first, "second": second, "killed_backup_steps": killed_backup_steps}


def weights(path):
    return train.load_model(path).get_weights()


def batch_losses(log_dir):
    """Return {step: batch_loss} as TensorBoard shows it (restarts applied)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    steps = [event.step for event in events.Tensors("batch_loss")]
    assert len(steps) == len(set(steps)), f"duplicate steps in {log_dir}: {steps}"
    return {event.step: tensor_util.make_ndarray(event.tensor_proto).item() for event in events.Tensors("batch_loss")}


def test_ctrl_c_saves_a_backup_and_says_how_to_resume_and_the_rerun_resumes(interrupted_runs):
    first = interrupted_runs["first"]
    assert "exit code 130" in first.stdout, first.stderr[-3000:]
    assert ("interrupted (SIGINT) in epoch 1 after batch 2 (optimizer step 2); saved run/backup.keras. "
            "Run the same command again to resume from there.") in first.stderr
    assert "resuming from run/backup.keras in epoch 1 after batch 2 (optimizer step 2)" in first.stdout
    assert "Traceback" not in first.stderr


def test_sigkilled_run_resumes_mid_epoch_and_ends_with_the_uninterrupted_weights(interrupted_runs):
    tmp, first, second = interrupted_runs["tmp"], interrupted_runs["first"], interrupted_runs["second"]
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert interrupted_runs["killed_backup_steps"] == 6  # killed after step 7: the step-6 backup is the newest
    assert "exit code 0" in second.stdout, second.stderr[-3000:]
    assert "resuming from run/backup.keras in epoch 2 after batch 2 (optimizer step 6)" in second.stdout
    resumed = train.load_model(tmp / "run" / "last.keras")
    assert int(resumed.optimizer.iterations.numpy()) == 8
    for got, want in zip(resumed.get_weights(), weights(tmp / "ref" / "last.keras")):
        np.testing.assert_array_equal(got, want)
    assert json.loads((tmp / "run" / "state.json").read_text())["epochs_done"] == 2


def test_a_process_killed_while_writing_a_model_leaves_the_previous_file(interrupted_runs):
    tmp, second = interrupted_runs["tmp"], interrupted_runs["second"]
    assert second.returncode == -signal.SIGKILL
    for got, want in zip(weights(tmp / "run" / "last.keras"), weights(tmp / "ref" / "last.keras")):
        np.testing.assert_array_equal(got, want)  # not the zeros, not half a file
    assert [p.name for p in (tmp / "run").glob(".last.*.tmp.keras")]  # the half-written one kept its own name


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
    assert len(message) == 1 and "the loss became nan at epoch 1, batch" in message[0], err[-2000:]
    step = int(message[0].split("optimizer step ")[1].split(")")[0])
    backup = train.load_model(run_dir / "backup.keras")
    assert int(backup.optimizer.iterations.numpy()) == step - 1  # the NaN step was not saved
    assert all(np.isfinite(w).all() for w in backup.get_weights())
    assert not (run_dir / "last.keras").exists()


def test_a_write_killed_midway_leaves_the_previous_model_loadable(tmp_path, monkeypatch):
    from keras.src.saving import saving_lib

    model = train.build_unet((None, None, 1), filters=4)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.optimizer.build(model.trainable_variables)
    path = callbacks.save_model_atomic(model, tmp_path / "last.keras")
    before = [w.copy() for w in model.get_weights()]

    def half_then_interrupt(model, fileobj, weights_format):
        fileobj.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # as a Ctrl-C (or a kill) in the middle of Keras' write

    monkeypatch.setattr(saving_lib, "_save_model_to_fileobj", half_then_interrupt)
    model.set_weights([w + 1 for w in before])
    with pytest.raises(KeyboardInterrupt):
        callbacks.save_model_atomic(model, path)
    monkeypatch.undo()
    for got, want in zip(train.load_model(path).get_weights(), before):
        np.testing.assert_array_equal(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.keras"]  # no temporary file left behind


def test_a_prediction_write_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    target = predict.write_prediction(tmp_path / "p.tif", np.full((8, 8), 0.25, np.float32))

    def half_then_fail(path, *args, **kwargs):
        open(path, "wb").write(b"II*\x00 truncated")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", half_then_fail)
    with pytest.raises(OSError, match="p.tif: cannot write it"):
        predict.write_prediction(target, np.zeros((8, 8), np.float32))
    monkeypatch.undo()
    np.testing.assert_array_equal(data.read_stack(target)[0], np.full((8, 8), 0.25, np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["p.tif"]


# ---------------------------------------------------------------- bad input, one clear line each

def tiff(path, array, **kwargs):
    tifffile.imwrite(path, array, photometric=kwargs.pop("photometric", "minisblack"), **kwargs)
    return path


@pytest.fixture(scope="module")
def real_tiff_bytes(isbi_dir):
    return (isbi_dir / data.IMAGES_FILE).read_bytes()


def unknown_photometric(path):
    """Return the bytes of the TIFF at `path` with its photometric tag (262) set to the unknown value 99."""
    content = path.read_bytes()
    entry = (262).to_bytes(2, "little") + (3).to_bytes(2, "little") + (1).to_bytes(4, "little")
    assert entry in content
    at = content.index(entry) + len(entry)
    return content[:at] + (99).to_bytes(2, "little") + content[at + 2:]


BAD_TIFFS = {
    "empty": (lambda p, real: p.write_bytes(b""), "not a readable TIFF file"),
    "random bytes": (lambda p, real: p.write_bytes(np.random.default_rng(0).bytes(5000)), "not a readable TIFF"),
    "truncated": (lambda p, real: p.write_bytes(real[: len(real) // 2]), "not a readable TIFF file"),
    "header only": (lambda p, real: p.write_bytes(real[:8]), "not a readable TIFF file"),
    "rgb": (lambda p, real: tiff(p, np.zeros((16, 16, 3), np.uint8), photometric="rgb"), "convert to greyscale"),
    "no pixels": (lambda p, real: tiff(p, np.zeros((0, 16, 16), np.uint8)), "no pixels"),
    "nan floats": (lambda p, real: tiff(p, np.full((2, 16, 16), np.nan, np.float32)), "NaN or infinite"),
    "negative integers": (lambda p, real: tiff(p, np.full((2, 16, 16), -3, np.int16)), "negative pixel values"),
    "unknown photometric": (lambda p, real: p.write_bytes(unknown_photometric(tiff(p, np.zeros((2, 4, 3, 8),
                                                                                               np.uint8)))),
                            "expected 2-D grey pages"),
    "complex": (lambda p, real: tiff(p, np.zeros((2, 16, 16), np.complex64)), "not supported"),
}


@pytest.mark.filterwarnings("ignore:.*writing zero-size array")
@pytest.mark.parametrize("case", BAD_TIFFS)
def test_bad_tiffs_give_one_data_error_naming_the_file(case, tmp_path, real_tiff_bytes):
    make, message = BAD_TIFFS[case]
    path = tmp_path / "bad.tif"
    make(path, real_tiff_bytes)
    for read in (data.read_stack, predict.read_image):
        with pytest.raises(data.DataError, match=message) as error:
            read(path)
        assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


GOOD_TIFFS = {
    "single page": (np.arange(256, dtype=np.uint8).reshape(16, 16), np.uint8),
    "16-bit": (np.linspace(0, 65535, 512).astype(np.uint16).reshape(2, 16, 16), np.uint16),
    "float in [0, 1]": (np.linspace(0, 1, 512, dtype=np.float32).reshape(2, 16, 16), np.float32),
}


@pytest.mark.parametrize("case", GOOD_TIFFS)
def test_single_page_16_bit_and_float_tiffs_load_and_normalise_to_0_1(case, tmp_path):
    array, dtype = GOOD_TIFFS[case]
    pages = predict.read_image(tiff(tmp_path / "ok.tif", array))
    assert pages.dtype == dtype
    assert pages.shape == ((1, 16, 16) if array.ndim == 2 else array.shape)
    images = data.normalize_images(pages)
    assert images.min() >= 0 and images.max() == pytest.approx(1.0, abs=1e-3)


def test_float_pages_outside_0_1_are_refused_for_prediction(tmp_path):
    path = tiff(tmp_path / "f.tif", np.full((2, 16, 16), 200.0, np.float32))
    with pytest.raises(data.DataError, match=r"f.tif: float pixels must lie in \[0, 1\], found 200 to 200"):
        predict.read_image(path)


BAD_IMAGES = {
    "empty png": (lambda p: p.write_bytes(b""), "not a readable image file"),
    "random png": (lambda p: p.write_bytes(np.random.default_rng(1).bytes(3000)), "not a readable image file"),
    "truncated png": (lambda p: p.write_bytes(png_bytes(np.zeros((64, 64), np.uint8) + 7)[:60]),
                      "not a readable image file"),
    "rgb png": (lambda p: Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p), "RGB image"),
    "palette png": (lambda p: Image.fromarray(np.zeros((8, 8), np.uint8)).convert("P").save(p), "P image"),
}


def png_bytes(array):
    import io

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_pngs_give_one_data_error_naming_the_file(case, tmp_path):
    make, message = BAD_IMAGES[case]
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(data.DataError, match=message) as error:
        predict.read_image(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_a_16_bit_png_loads_as_uint16(tmp_path):
    path = tmp_path / "deep.png"
    path.write_bytes(png_bytes((np.arange(256) * 200).astype(np.uint16).reshape(16, 16)))
    pages = predict.read_image(path)
    assert pages.dtype == np.uint16 and pages.shape == (1, 16, 16) and pages.max() == 255 * 200


@pytest.fixture()
def not_models(tmp_path):
    text = tmp_path / "notes.keras"
    text.write_text("these are not weights")
    zipped = tmp_path / "empty.keras"
    import zipfile

    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("readme.txt", "no model here")
    return [text, zipped]


def test_a_model_file_that_is_not_a_model_gives_a_data_error(not_models, tmp_path):
    for path in not_models + [tmp_path / "missing.keras"]:
        with pytest.raises(data.DataError) as error:
            train.load_model(path)
        assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_faces_print_one_error_line_for_a_bad_model_and_an_unwritable_output(not_models, tmp_path, capsys,
                                                                            isbi_dir):
    page = tmp_path / "page.png"
    page.write_bytes(png_bytes(np.zeros((32, 32), np.uint8) + 100))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = [
        (predict.main, [str(page), "--model", str(not_models[0])], "notes.keras: not a Keras model"),
        (evaluate.main, [str(not_models[1]), "--data-dir", str(isbi_dir)], "empty.keras: not a Keras model"),
        (predict.main, [str(page), "--model", str(predict.DEFAULT_MODEL), "--out", str(blocker / "x.tif")],
         "x.tif: cannot write it"),
        (evaluate.main, [str(isbi_dir / data.LABELS_FILE), "--data-dir", str(isbi_dir), "--out",
                         str(blocker / "scores.json")], "scores.json: cannot write it"),
        (train.main, ["--preset", "tiny", "--data-dir", str(isbi_dir), "--run-dir", str(blocker / "run")],
         "a-file"),
    ]
    for face, argv, message in cases:
        assert face(argv) == 1, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], (argv, err[-2000:])
        assert "Traceback" not in err
