"""cli.py: every tool's errors as one line and exit code 1, warnings as one line, TensorFlow's native log
lines kept off stderr unless asked for."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import ROOT, png_bytes

import cli
import data
import evaluate
import files
import predict
import runtimes
import train

NATIVE = ("I0000 00:00:1796129918.920017    3249 port.cc:153] oneDNN custom operations are on. You may see ...\n"
          "W0000 00:00:1796136089.476189   17318 generator_dataset_op.cc:113] Error occurred when finalizing ...\n"
          "\t [[{{node PyFunc}}]]\n"
          "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
          "E0000 00:00:1796129918.954014    3249 mkl_util.h:42] oneDNN supports DT_INT32 only on platforms with AVX-512\n"
          "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow\n")


def python(code: str, **env) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python in the project folder; return the finished process."""
    # without the variables that change what TensorFlow logs (set by the user, or by a library in this process)
    environment = {key: value for key, value in os.environ.items()
                   if key not in (cli.VERBOSE_ENV, "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    environment.update(env)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, timeout=120)
    # decoded by hand: text=True would turn the progress bars' carriage returns into newlines
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def test_native_log_lines_are_recognised_and_others_kept():
    lines = [line for line in NATIVE.splitlines() if not line.startswith("\t")]  # continuations: see below
    assert not any(cli.keep(line) for line in lines)
    for line in ("error: data/train-volume.tif: file not found", "I0 am a sentence", "Epoch 1/3",
                 "predicting: 100%|##########| 4/4 [00:01<00:00]", "WARNING: something else"):
        assert cli.keep(line), line


def test_the_filter_drops_native_lines_and_passes_the_rest_in_order():
    code = ("import os, sys, time, cli; cli.quiet_native_logs([]); "
            f"os.write(2, {NATIVE.encode()!r}); "
            "os.write(2, b'progress 10%\\rprogress 50%\\r'); os.write(2, b'\\nI0 kept\\n'); "
            "os.write(2, b'I0000 00:00:1796129918.920017    3249 port.cc:153] a line in'); time.sleep(0.3); "
            "os.write(2, b' two reads\\n'); "
            "print('error: kept too', file=sys.stderr)")
    done = python(code)
    assert done.returncode == 0
    assert done.stderr == "progress 10%\rprogress 50%\r\nI0 kept\nerror: kept too\n"


def test_verbose_keeps_tensorflows_own_lines_and_the_default_drops_them():
    code = "import cli; cli.quiet_native_logs(); import tensorflow as tf; print(int(tf.constant(2) * 3))"
    quiet, loud = python(code), python(code, **{cli.VERBOSE_ENV: "1"})
    assert quiet.stdout == loud.stdout == "6\n"
    assert all(cli.keep(line) for line in quiet.stderr.splitlines()), quiet.stderr
    assert any(not cli.keep(line) for line in loud.stderr.splitlines()), "TensorFlow logged nothing natively here"


def test_the_first_lines_of_train_carry_no_native_log_line(tmp_path):
    done = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--data-dir", str(tmp_path / "none"),
                           "--run-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != cli.VERBOSE_ENV})
    assert done.returncode == 1
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith("error: ISBI 2012 data not")


def test_run_turns_expected_errors_into_one_line_and_exit_code_1(capsys):
    parse = cli.parser("test tool")
    for error in (files.DataError("x.tif: not a readable TIFF file"), ValueError("bad setting"),
                  FileNotFoundError(2, "No such file", "m.keras")):
        def work(args, error=error):
            raise error

        assert cli.run(parse, work, []) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert cli.run(parse, lambda args: None, []) == 0
    assert cli.run(parse, lambda args: 3, []) == 3


def test_run_reports_an_interruption_with_its_message_and_exit_code_130(capsys):
    def interrupted(args):
        raise cli.Interrupted("interrupted (SIGINT) in epoch 1 after batch 2 (optimizer step 2)")

    assert cli.run(cli.parser(None), interrupted, []) == 130
    assert "interrupted (SIGINT) in epoch 1" in capsys.readouterr().err


def test_unexpected_errors_are_not_hidden():
    def broken(args):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        cli.run(cli.parser(None), broken, [])


def test_the_projects_warnings_print_as_one_line(capsys):
    import data

    def work(args):
        data.label_convention([__import__("numpy").array([[0, 1], [0, 0]], "uint8")], "masks.tif", membrane_value=0)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.run(cli.parser(None), work, []) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: masks.tif: membranes (value 0) are 75 %") and err.count("\n") == 1


def test_tf_logs_is_a_flag_of_every_tool_and_an_environment_variable(monkeypatch):
    assert cli.verbose_requested(["--tf-logs"]) and not cli.verbose_requested([])
    monkeypatch.setenv(cli.VERBOSE_ENV, "1")
    assert cli.verbose_requested([])
    assert cli.parser(None).parse_args(["--tf-logs"]).tf_logs


def test_faces_print_one_error_line_for_a_bad_model_and_an_unwritable_output(not_models, tmp_path, capsys,
                                                                            isbi_dir):
    page = tmp_path / "page.png"
    page.write_bytes(png_bytes(np.zeros((32, 32), np.uint8) + 100))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = [
        (predict.main, [str(page), "--model", str(not_models[0])], "notes.keras: not a Keras model"),
        (evaluate.main, [str(not_models[1]), "--data-dir", str(isbi_dir)], "empty.keras: not a Keras model"),
        (predict.main, [str(page), "--model", str(runtimes.DEFAULT_MODEL), "--out", str(blocker / "x.tif")],
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


def test_clear_all_deletes_nothing_when_an_option_or_the_data_is_wrong(tmp_path, isbi_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    kept = ["best.keras", "last.keras", "state.json", "settings.json"]
    for name in kept:
        (run / name).write_text("a run's results")
    for wrong in (["--target", "affinities", "--offsets", "2,3"], ["--loss", "nonsense"], ["--lr-schedule", "fast"],
                  ["--data-dir", str(tmp_path / "no-data")]):
        argv = ["--preset", "tiny", "--data-dir", str(isbi_dir), "--run-dir", str(run), "--clear-all", *wrong]
        assert train.main(argv) == 1, wrong
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, (wrong, lines)
        assert sorted(p.name for p in run.iterdir() if p.name in kept) == sorted(kept), wrong
