"""runs.py: the run folder's files, what an earlier run left, and where a rerun resumes (without TensorFlow: the
models here are stand-ins that only carry an optimizer step count)."""

import json
import types

import pytest

import runs

SETTINGS = {"filters": 4, "batch_norm": False, "precision_policy": "float32", "loss": "bce", "steps_per_epoch": 3}


def stand_in(steps: int):
    """Return an object shaped like a loaded Keras model whose optimizer has taken `steps` steps."""
    counter = types.SimpleNamespace(numpy=lambda: steps)
    return types.SimpleNamespace(optimizer=types.SimpleNamespace(iterations=counter))


def loader(steps_by_name: dict[str, int], loaded: list):
    def load(path):
        loaded.append(path.name)
        return stand_in(steps_by_name[path.name])

    return load


def earlier_run(tmp_path, epochs_done=None, settings=SETTINGS, backup=False, best=0.25) -> runs.RunFolder:
    run = runs.RunFolder(tmp_path)
    run.write_json(run.settings, settings)
    if epochs_done is not None:
        run.write_json(run.state, {"epochs_done": epochs_done, "best": best, "settings": settings})
        run.last.write_bytes(b"last")
    if backup:
        run.backup.write_bytes(b"backup")
    return run


def test_an_empty_folder_starts_afresh(tmp_path):
    loaded = []
    start = runs.resume_point(runs.RunFolder(tmp_path), SETTINGS, loader({}, loaded))
    assert (start.model, start.steps, start.best, start.source, loaded) == (None, 0, None, None, [])


def test_a_finished_epoch_resumes_from_last_with_its_best(tmp_path):
    loaded = []
    run = earlier_run(tmp_path, epochs_done=2)
    start = runs.resume_point(run, SETTINGS, loader({"last.keras": 6}, loaded))
    assert (start.steps, start.best, start.source, loaded) == (6, 0.25, run.last, ["last.keras"])
    assert start.describe(3) == f"resuming from {run.last} in epoch 3 after batch 0 (optimizer step 6)"


def test_a_newer_backup_wins_and_an_older_one_is_ignored(tmp_path):
    run = earlier_run(tmp_path, epochs_done=1, backup=True)
    newer = runs.resume_point(run, SETTINGS, loader({"backup.keras": 5, "last.keras": 3}, []))
    assert (newer.steps, newer.source) == (5, run.backup)
    older = runs.resume_point(run, SETTINGS, loader({"backup.keras": 2, "last.keras": 3}, []))
    assert (older.steps, older.source) == (3, run.last)


def test_a_backup_of_other_epoch_lengths_is_not_resumed_mid_epoch(tmp_path):
    run = earlier_run(tmp_path, epochs_done=1, backup=True)
    start = runs.resume_point(run, {**SETTINGS, "steps_per_epoch": 4}, loader({"backup.keras": 5, "last.keras": 4}, []))
    assert (start.steps, start.source) == (4, run.last)


def test_a_run_killed_before_its_first_epoch_resumes_from_its_backup(tmp_path):
    run = earlier_run(tmp_path, backup=True)  # settings.json and backup.keras, no state yet
    start = runs.resume_point(run, SETTINGS, loader({"backup.keras": 2}, []))
    assert (start.steps, start.best, start.source) == (2, None, run.backup)


@pytest.mark.parametrize("key, value", [("filters", 8), ("batch_norm", True), ("precision_policy", "mixed_bfloat16"),
                                        ("loss", "dice")])
def test_resuming_with_another_network_or_loss_is_refused_before_loading(tmp_path, key, value):
    loaded = []
    run = earlier_run(tmp_path, epochs_done=1)
    with pytest.raises(ValueError, match=rf"trained with {key}=.*--clear-all"):
        runs.resume_point(run, {**SETTINGS, key: value}, loader({"last.keras": 3}, loaded))
    assert loaded == []


def test_clear_removes_what_a_run_wrote_and_keeps_the_rest(tmp_path):
    run = earlier_run(tmp_path, epochs_done=1, backup=True)
    for path in (run.best, run.summary, run.logs / "train" / "events.out.tfevents.1"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (tmp_path / "data_report.json").write_text("{}")
    run.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_report.json"]


def test_settings_and_steps_per_epoch_read_back(tmp_path):
    run = runs.RunFolder(tmp_path)
    assert run.saved_settings() is None and run.steps_per_epoch() is None
    run.write_json(run.settings, {**SETTINGS, "steps_per_epoch": 7})
    assert run.steps_per_epoch() == 7
    run.write_json(run.state, {"epochs_done": 1, "settings": SETTINGS})  # the state's settings come first
    assert run.steps_per_epoch() == 3
    assert json.loads(run.state.read_text())["epochs_done"] == 1


@pytest.mark.parametrize("steps, text", [(0, "epoch 1 after batch 0"), (2, "epoch 1 after batch 2"),
                                         (3, "epoch 2 after batch 0"), (7, "epoch 3 after batch 1")])
def test_position_names_the_epoch_and_batch_of_an_optimizer_step(steps, text):
    assert runs.position(steps, 3) == f"{text} (optimizer step {steps})"


def test_a_restart_mark_is_written_into_each_log_folder(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    folders = [tmp_path / part for part in runs.TENSORBOARD_PARTS]
    runs.mark_session_start(folders, 42)
    for folder in folders:
        (mark,) = folder.iterdir()
        events = list(EventFileLoader(str(mark)).Load())
        assert events[-1].step == 42 and events[-1].session_log.status == events[-1].session_log.START


def test_a_finished_run_describes_how_it_was_trained(tmp_path):
    run = runs.RunFolder(tmp_path)
    assert run.describe() is None
    run.write_json(run.summary, {"epochs_done": 25, "steps_per_epoch": 100, "seconds": 786.0, "precision": "float32",
                                 "machine": "Some CPU (2 cores), no GPU", "commit": "abc1234"})
    assert run.describe() == (f"{tmp_path}: 25 epochs x 100 steps in 13.1 min on Some CPU (2 cores), no GPU, "
                              "float32, commit abc1234")
