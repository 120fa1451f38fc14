"""presets.py: settings check themselves when they are made, the presets are valid, and every flag of train.py
has its help."""

import dataclasses
import subprocess
import sys

import pytest
from conftest import ROOT

import presets
import train


@pytest.mark.parametrize("changes, message", [
    ({"loss": "hinge"}, "unknown loss"),
    ({"target": "boundaries"}, "unknown target"),
    ({"target": "affinities", "offsets": "3,9"}, "start at 1"),
    ({"target": "affinities", "offsets": "1,x"}, "comma-separated whole numbers"),
    ({"target": "affinities", "loss": "weighted_bce"}, "weighs membrane"),
    ({"lr_schedule": "step"}, "unknown lr_schedule 'step'; choose from constant, cosine"),
    ({"precision": "float16"}, "precision must be one of"),
    ({"strategy": "tpu"}, "unknown strategy 'tpu'"),
    ({"filters": 0}, "filters must be a positive whole number, got 0"),
    ({"head_filters": -2}, "head_filters must be a positive whole number or None, got -2"),
    ({"crop": -64}, "crop must be a positive whole number"),
    ({"crop": 100}, "crop must be a multiple of 16 pixels"),
    ({"batch_size": 0}, "batch_size must be a positive"),
    ({"steps_per_epoch": 0}, "steps_per_epoch must be a positive"),
    ({"epochs": -1}, "epochs must be a positive"),
    ({"learning_rate": 0.0}, "learning_rate must be positive"),
    ({"backup_every": -1}, "backup_every must be 0 or more"),
    ({"ema": 1.0}, "ema must lie between 0 and 1"),
    ({"budget": 0.0}, "budget must be a positive number of seconds"),
    ({"verbose": 3}, "verbose must be 0, 1 or 2"),
])
def test_a_bad_setting_is_refused_when_the_settings_are_made(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        presets.TrainSettings(**changes)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        presets.preset("tiny", **changes)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        dataclasses.replace(presets.PRESETS["cpu"], **changes)


def test_the_presets_and_the_settings_train_uses_are_valid():
    for settings in presets.PRESETS.values():
        settings.check()
    assert presets.preset("tiny", target="affinities", offsets="1,3").target == "affinities"
    assert presets.preset("tiny", offsets="nonsense").offsets == "nonsense"  # offsets only matter for affinities
    assert train.preset is presets.preset and train.TrainSettings is presets.TrainSettings  # train.X still works


def test_switching_to_affinities_brings_the_field_offsets_unless_told_otherwise():
    field = presets.preset("cpu", target="affinities")
    assert (field.offsets, field.loss) == ("field", "bce_dice")
    own = presets.preset("cpu", target="affinities", offsets="1,3,9,27", loss="dice")
    assert (own.offsets, own.loss) == ("1,3,9,27", "dice")
    assert presets.preset("tiny", offsets="1,3").offsets == "1,3"  # a membrane preset keeps what it is given


def test_a_bad_flag_value_is_one_error_line(tmp_path, capsys):
    assert train.main(["--preset", "tiny", "--crop", "100", "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: crop must be a multiple of 16 pixels (the U-Net pools 4 times), got 100"
    assert not (tmp_path / "run").exists()


def test_every_flag_of_train_py_has_its_help():
    parser = train.build_parser()
    flags = [action for action in parser._actions if action.option_strings]
    assert len(flags) > 50
    missing = [action.option_strings[0] for action in flags if not (action.help or "").strip()]
    assert not missing, f"flags without help: {missing}"
    fields = [f for f in dataclasses.fields(presets.TrainSettings) if f.name not in ("augmentation", "preset")]
    assert all(f.metadata["help"] for f in fields)
    # and `python train.py --help` prints each flag with its help
    done = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shown = " ".join(done.stdout.split())
    for action in flags:
        assert f"{action.option_strings[0]}" in shown and " ".join(action.help.replace("%%", "%").split()) in shown
