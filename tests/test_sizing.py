"""sizing.py: a budget sizes the epochs to the measured speed, and a resumed run keeps its sizing."""

import dataclasses

import pytest

import presets
import sizing
import train


def speed(step: float, validation: float):
    """Return a stand-in for train.measure_speed that says this machine takes `step` and `validation` seconds."""
    return lambda settings: {"step": step, "validation": validation}


def test_a_budget_sizes_the_epochs_to_the_measured_speed_and_a_resumed_run_keeps_the_sizing():
    settings = presets.preset("tiny", epochs=2, steps_per_epoch=100, budget=60.0)
    sized, chosen = sizing.size_to_budget(settings, speed(1.0, 5.0), previous=None)
    # 93 % of 60 s over 2 epochs, less 5 s of validation each: 22 steps of 1 s per epoch
    assert sized.steps_per_epoch == 22 and sized.epochs == 2 and chosen["recipe_steps_per_epoch"] == 100
    line = sizing.sizing_line(sized, chosen)
    assert "1.00 s per train step" in line and "so 22 steps per epoch (all 2 epochs)" in line
    fast, fits = sizing.size_to_budget(dataclasses.replace(settings, steps_per_epoch=10), speed(1.0, 5.0), None)
    assert fast.steps_per_epoch == 10 and "the whole recipe, 2 x 10 steps, fits" in sizing.sizing_line(fast, fits)
    saved = train.state_settings(sized, chosen)
    resumed, again = sizing.size_to_budget(settings, lambda: pytest.fail("a resumed run re-measured"), previous=saved)
    assert resumed.steps_per_epoch == 22 and resumed.epochs == 2 and again["resumed"]


def test_a_budget_where_validation_would_crowd_out_training_gives_fewer_longer_epochs():
    settings = presets.preset("tiny", epochs=25, steps_per_epoch=100, budget=210.0)
    sized, chosen = sizing.size_to_budget(settings, speed(1.0, 20.0), previous=None)
    # 195 s to plan: a quarter of it validates twice; each epoch then has 97.6 - 20 s for 77 steps
    assert (sized.epochs, sized.steps_per_epoch) == (2, 77) == (chosen["epochs"], chosen["steps_per_epoch"])
    assert "so 2 epochs x 77 steps" in sizing.sizing_line(sized, chosen)
    sized, chosen = sizing.size_to_budget(settings, speed(0.01, 20.0), previous=None)
    assert sized.epochs == 2 and sized.steps_per_epoch == 1250  # never more steps than the recipe's 2,500
    resumed, _ = sizing.size_to_budget(settings, speed(0.01, 20.0), previous=train.state_settings(sized, chosen))
    assert (resumed.epochs, resumed.steps_per_epoch) == (2, 1250)


def test_a_wider_network_the_budget_starves_falls_back_to_the_narrower_one_and_a_resume_keeps_it():
    settings = presets.preset("tiny", epochs=2, steps_per_epoch=100, budget=60.0, filters=8, fallback_filters=4)
    slow_when_wide = lambda candidate: {"step": 2.0 if candidate.filters == 8 else 0.5, "validation": 5.0}
    sized, chosen = sizing.size_to_budget(settings, slow_when_wide, previous=None)
    # 8 filters: 2 x 11 steps of 2 s, 11 % of the recipe's 200; 4 filters: 2 x 45 steps of 0.5 s
    assert (sized.filters, sized.epochs, sized.steps_per_epoch) == (4, 2, 45)
    assert chosen["wider"] == {"filters": 8, "seconds_per_step": 2.0, "steps": 22} and chosen["filters"] == 4
    assert "8 filters (2.00 s per step) would get 22 of the recipe's 200 steps, less than 50%, so 4 filters" \
        in sizing.sizing_line(sized, chosen)
    resumed, _ = sizing.size_to_budget(settings, lambda candidate: pytest.fail("re-measured"),
                                       previous=train.state_settings(sized, chosen))
    assert (resumed.filters, resumed.steps_per_epoch) == (4, 45)
    fast_enough = lambda candidate: {"step": 0.3 if candidate.filters == 8 else 0.1, "validation": 5.0}
    kept, chosen = sizing.size_to_budget(settings, fast_enough, previous=None)
    assert (kept.filters, kept.steps_per_epoch) == (8, 76) and "wider" not in chosen
