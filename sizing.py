"""Sizing a run to a time budget: how many epochs of how many steps fit in `budget` seconds on this machine,
from its measured speed (train.measure_speed), and the line that says what was chosen and why."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from presets import TrainSettings

BUDGET_MARGIN = 0.93  # of the budget planned for: the estimate's error, checkpoints, TensorBoard and the data report
VALIDATION_SHARE = 0.25  # of the budget at most for the epochs' validation, when the recipe does not fit


def size_to_budget(settings: TrainSettings, measure: Callable[[], dict], previous: dict | None,
                   spent: float = 0.0) -> tuple[TrainSettings, dict]:
    """Return (settings with epochs and steps_per_epoch sized so that the run ends within `budget` seconds on
    this machine, what was measured and chosen). A recipe that fits is kept whole. Otherwise the epochs are
    shortened; where validating every epoch would take more than VALIDATION_SHARE of the budget, there are
    fewer, longer epochs (never more steps than the recipe's in all).

    `measure()` returns {'step': seconds per train step, 'validation': seconds per epoch's validation}; its own
    time counts against the budget. A resumed run keeps the sizing it started with (`previous`: its saved
    settings) and measures nothing. `spent`: seconds already gone (the data load)."""
    recipe = {"recipe_epochs": settings.epochs, "recipe_steps_per_epoch": settings.steps_per_epoch}
    if previous and all(previous.get("sizing", {}).get(key) == value for key, value in recipe.items()) and \
            previous.get("budget") == settings.budget:
        sizing = {**previous["sizing"], "resumed": True}
        return dataclasses.replace(settings, epochs=sizing["epochs"], steps_per_epoch=sizing["steps_per_epoch"]), sizing
    began = time.perf_counter()
    speed = measure()
    left = BUDGET_MARGIN * settings.budget - spent - (time.perf_counter() - began)
    epochs, steps = settings.epochs, settings.steps_per_epoch
    if epochs * (steps * speed["step"] + speed["validation"]) > left:
        total = epochs * steps
        epochs = int(min(epochs, max(1, VALIDATION_SHARE * left // max(speed["validation"], 1e-9))))
        steps = int(max(1, min(math.ceil(total / epochs), (left / epochs - speed["validation"]) // speed["step"])))
    sizing = {"seconds_per_step": round(speed["step"], 4), "validation_seconds": round(speed["validation"], 2),
              **recipe, "epochs": epochs, "steps_per_epoch": steps,
              "planned_minutes": round((epochs * (steps * speed["step"] + speed["validation"])) / 60, 1)}
    return dataclasses.replace(settings, epochs=epochs, steps_per_epoch=steps), sizing


def sizing_line(settings: TrainSettings, sizing: dict) -> str:
    """Return the line that says how the run was sized to the machine, and why."""
    if sizing.get("resumed"):
        return (f"sized when this run started: {settings.epochs} epochs x {sizing['steps_per_epoch']} steps "
                f"({sizing['seconds_per_step']:.2f} s per step then)")
    epochs, recipe = sizing["recipe_epochs"], sizing["recipe_steps_per_epoch"]
    whole = epochs * (recipe * sizing["seconds_per_step"] + sizing["validation_seconds"]) / 60
    if (sizing["epochs"], sizing["steps_per_epoch"]) == (epochs, recipe):
        verdict = f"the whole recipe, {epochs} x {recipe} steps, fits"
    elif sizing["epochs"] == epochs:
        verdict = (f"the recipe's {recipe} steps per epoch would take {whole:.0f} min, so "
                   f"{sizing['steps_per_epoch']} steps per epoch (all {epochs} epochs)")
    else:
        verdict = (f"the recipe, {epochs} x {recipe} steps, would take {whole:.0f} min, and its {epochs} "
                   f"validations more than {VALIDATION_SHARE:.0%} of the budget, so {sizing['epochs']} epochs "
                   f"x {sizing['steps_per_epoch']} steps")
    return (f"sized to this machine: {sizing['seconds_per_step']:.2f} s per train step and "
            f"{sizing['validation_seconds']:.1f} s of validation per epoch, measured; {verdict}; about "
            f"{sizing['planned_minutes']:.0f} of the {settings.budget / 60:.0f}-minute budget")
