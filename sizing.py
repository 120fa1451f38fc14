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


WIDE_SHARE = 0.5  # of the recipe's steps at least, or `fallback_filters` train instead (validated at 58-63 %)


def size_to_budget(settings: TrainSettings, measure: Callable[[TrainSettings], dict], previous: dict | None,
                   spent: float = 0.0) -> tuple[TrainSettings, dict]:
    """Return (settings with epochs and steps_per_epoch sized so that the run ends within `budget` seconds on
    this machine, what was measured and chosen). A recipe that fits is kept whole. Otherwise the epochs are
    shortened; where validating every epoch would take more than VALIDATION_SHARE of the budget, there are
    fewer, longer epochs (never more steps than the recipe's in all). Where that leaves less than WIDE_SHARE
    of the recipe's steps and the settings name `fallback_filters`, that narrower network is sized instead.

    `measure(settings)` returns {'step': seconds per train step, 'validation': seconds per epoch's validation};
    its own time counts against the budget. A resumed run keeps the sizing (and width) it started with
    (`previous`: its saved settings) and measures nothing. `spent`: seconds already gone (the data load)."""
    recipe = {"recipe_epochs": settings.epochs, "recipe_steps_per_epoch": settings.steps_per_epoch}
    if previous and all(previous.get("sizing", {}).get(key) == value for key, value in recipe.items()) and \
            previous.get("budget") == settings.budget:
        sizing = {**previous["sizing"], "resumed": True}
        return dataclasses.replace(settings, epochs=sizing["epochs"], steps_per_epoch=sizing["steps_per_epoch"],
                                   filters=sizing.get("filters", settings.filters)), sizing
    began = time.perf_counter()
    sizing, wider = _sized(settings, measure(settings), spent + time.perf_counter() - began), None
    planned = sizing["epochs"] * sizing["steps_per_epoch"]
    if settings.fallback_filters not in (None, settings.filters) and \
            planned < WIDE_SHARE * settings.epochs * settings.steps_per_epoch:
        wider = {"filters": settings.filters, "seconds_per_step": sizing["seconds_per_step"], "steps": planned}
        settings = dataclasses.replace(settings, filters=settings.fallback_filters)
        sizing = _sized(settings, measure(settings), spent + time.perf_counter() - began)
    sizing = {**recipe, **sizing, "filters": settings.filters, **({"wider": wider} if wider else {})}
    return dataclasses.replace(settings, epochs=sizing["epochs"], steps_per_epoch=sizing["steps_per_epoch"]), sizing


def _sized(settings: TrainSettings, speed: dict, spent: float) -> dict:
    """Return the epochs and steps per epoch of `settings` that fit its budget at `speed`, `spent` seconds gone."""
    left = BUDGET_MARGIN * settings.budget - spent
    epochs, steps = settings.epochs, settings.steps_per_epoch
    if epochs * (steps * speed["step"] + speed["validation"]) > left:
        total = epochs * steps
        epochs = int(min(epochs, max(1, VALIDATION_SHARE * left // max(speed["validation"], 1e-9))))
        steps = int(max(1, min(math.ceil(total / epochs), (left / epochs - speed["validation"]) // speed["step"])))
    return {"seconds_per_step": round(speed["step"], 4), "validation_seconds": round(speed["validation"], 2),
            "epochs": epochs, "steps_per_epoch": steps,
            "planned_minutes": round((epochs * (steps * speed["step"] + speed["validation"])) / 60, 1)}


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
    wider = sizing.get("wider")
    narrowed = (f"{wider['filters']} filters ({wider['seconds_per_step']:.2f} s per step) would get "
                f"{wider['steps']:,} of the recipe's {epochs * recipe:,} steps, less than {WIDE_SHARE:.0%}, so "
                f"{sizing['filters']} filters; " if wider else "")
    return (f"sized to this machine: {narrowed}{sizing['seconds_per_step']:.2f} s per train step and "
            f"{sizing['validation_seconds']:.1f} s of validation per epoch, measured; {verdict}; about "
            f"{sizing['planned_minutes']:.0f} of the {settings.budget / 60:.0f}-minute budget")
