"""The run folder: where a training run keeps its files, what it has done, and where a rerun resumes.

    runs/cpu/
        settings.json        the settings, with the precision policy resolved (written at the start)
        data_report.json     the data report (data.data_report), and data_report.txt
        state.json           after each epoch: epochs done, last logs, the best monitored value
        last.keras           after each epoch: the whole model, optimizer included (what a rerun resumes from)
        backup.keras         every few optimizer steps and when interrupted (a mid-epoch resume point)
        best.keras           the best model so far, for inference (layers only)
        summary.json         at the end: command, commit, machine, time, final logs
        logs/                TensorBoard: train/, validation/, images/

The one place for these names and for reading them back. Light on purpose
(no Keras import): figures.py and export.py read run folders too.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import files

PROJECT_DIR = Path(__file__).resolve().parent
TENSORBOARD_PARTS = ("train", "validation", "images")  # the log folders a restart mark goes into
# settings a resumed run cannot change
MUST_MATCH = ("context", "filters", "head_filters", "batch_norm", "precision_policy", "loss", "target", "offsets")


class RunFolder:
    """The files of one run folder (module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    logs = property(lambda self: self.path / "logs")
    best = property(lambda self: self.path / "best.keras")
    last = property(lambda self: self.path / "last.keras")
    backup = property(lambda self: self.path / "backup.keras")
    state = property(lambda self: self.path / "state.json")
    settings = property(lambda self: self.path / "settings.json")
    summary = property(lambda self: self.path / "summary.json")

    def clear(self) -> None:
        """Delete the run's models, state, settings, summary and TensorBoard logs (the original's clear_all)."""
        shutil.rmtree(self.logs, ignore_errors=True)
        for path in (self.best, self.last, self.backup, self.state, self.settings, self.summary):
            path.unlink(missing_ok=True)

    def read_json(self, path: Path) -> dict | None:
        """Return the JSON object in `path` (one of this folder's files), or None if it is not there."""
        return json.loads(path.read_text()) if path.is_file() else None

    def write_json(self, path: Path, content: dict) -> Path:
        """Write `content` as indented JSON to `path`, atomically; return the path."""
        return files.write_atomic(path, json.dumps(content, indent=2))

    def saved_settings(self) -> dict | None:
        """Return the settings the run was last trained with: its state's, else settings.json's (a run killed
        before its first epoch ended), else None."""
        state = self.read_json(self.state) or {}
        return state.get("settings") or self.read_json(self.settings)

    def describe(self) -> str | None:
        """Return one line on how the run was trained (its summary.json), or None before it has finished."""
        summary = self.read_json(self.summary)
        if summary is None:
            return None
        return (f"{self.path}: {summary['epochs_done']} epochs x {summary['steps_per_epoch']} steps in "
                f"{summary['seconds'] / 60:.1f} min on {summary['machine']}, {summary['precision']}, "
                f"commit {summary.get('commit') or 'unknown'}")

    def steps_per_epoch(self) -> int | None:
        """Return the optimizer steps per epoch the run was trained with, or None if it has no settings."""
        settings = self.saved_settings() or {}
        return settings.get("steps_per_epoch")


def position(steps: int, steps_per_epoch: int) -> str:
    """Return where optimizer step `steps` leaves training, as 'epoch E after batch B (optimizer step S)'."""
    epoch, batch = divmod(steps, steps_per_epoch)
    return f"epoch {epoch + 1} after batch {batch} (optimizer step {steps})"


@dataclasses.dataclass
class ResumePoint:
    """Where a run goes on from: the model (None: start afresh), optimizer steps done, the best monitored
    value so far, and the file it came from."""

    model: object = None
    steps: int = 0
    best: float | None = None
    source: Path | None = None

    def describe(self, steps_per_epoch: int) -> str:
        """Return one line saying where training resumes."""
        return f"resuming from {self.source} in {position(self.steps, steps_per_epoch)}"


def resume_point(run: RunFolder, settings: dict, load: Callable[[Path], object]) -> ResumePoint:
    """Return the resume point of an earlier run in `run` trained with compatible `settings`.

    The model, loaded by `load` (with its optimizer), is the newer of
    last.keras (saved at an epoch end) and backup.keras (saved every few
    steps and when interrupted). ValueError if the earlier run was trained
    with other MUST_MATCH settings.
    """
    state = run.read_json(run.state) or {}
    has_last = run.last.is_file() and bool(state)
    if not (has_last or run.backup.is_file()):
        return ResumePoint()
    saved = run.saved_settings() or {}
    for key in MUST_MATCH:
        if key in saved and saved[key] != settings[key]:
            raise ValueError(
                f"{run.last} was trained with {key}={saved[key]!r}, not {settings[key]!r}; "
                "use another run_dir, or clear_all=True (--clear-all) to start afresh"
            )
    per_epoch = settings["steps_per_epoch"]
    done = int(state.get("epochs_done", 0)) * per_epoch
    if run.backup.is_file():
        model = load(run.backup)
        steps = int(model.optimizer.iterations.numpy())
        if steps > done and saved.get("steps_per_epoch", per_epoch) == per_epoch:
            return ResumePoint(model, steps, state.get("best"), run.backup)
    if not has_last:
        return ResumePoint()
    return ResumePoint(load(run.last), done, state.get("best"), run.last)


def git_commit() -> str | None:
    """Return the project's current git commit (with '+dirty' if changed), or None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_DIR, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_DIR,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def mark_session_start(log_dirs, step: int) -> None:
    """Write a TensorBoard session-start event at `step` into each folder of `log_dirs`.

    TensorBoard drops the events at `step` and later that a run logged before a
    restart marked this way, so the steps a killed run logged after its last
    backup are not drawn twice when they are trained again. Call it at every
    start of training with the first step it will log (TensorBoard takes the
    first mark of a folder as the start of the run, not as a restart).
    """
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    now = time.time()
    events = [event_pb2.Event(wall_time=now, file_version="brain.Event:2"),
              event_pb2.Event(wall_time=now, step=int(step),
                              session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))]
    for log_dir in log_dirs:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        # TensorBoard reads a folder's event files in name order: "!" sorts this one before the files that
        # TensorFlow opens in the same second (events.out.tfevents.<seconds>.<host>...), after older ones.
        path = Path(log_dir) / f"events.out.tfevents.{int(now):010d}.!restart"
        with open(path, "ab") as out:
            writer = RecordWriter(out)
            for event in events:
                writer.write(event.SerializeToString())
