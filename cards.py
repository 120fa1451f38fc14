"""A model's card and what a model takes and gives.

The card (`<model>.json` beside it, or its run folder's settings.json) records how the model was trained and
how its outputs are cut into cells. `model_io(path)` is the one place that works out a model's input channels
(neighbouring sections, `data.with_context`) and its output channels (a membrane map, or affinities and their
offsets); every consumer asks the `ModelIO` it returns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path

import numpy as np

import compact
from runtimes import is_model, load_model, model_kind

# ---------------------------------------------------------------- the model card

CARD_SUFFIX = ".json"  # a model's card sits beside it: models/unet-isbi-cpu.json, runs/cpu/best.json


def card_path(path: str | os.PathLike) -> Path:
    """Return where the card of the model at `path` is (it may not exist yet)."""
    path = Path(path)
    return path.with_suffix(CARD_SUFFIX) if path.suffix else path.parent / (path.name + CARD_SUFFIX)


def _json_object(path: Path) -> dict:
    """Return the JSON object in the file `path`; DataError naming it if it holds something else."""
    import files

    try:
        found = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:
        raise files.DataError(f"{path}: not a JSON file ({files.error_reason(err)})") from err
    if not isinstance(found, dict):
        raise files.DataError(f"{path}: expected a JSON object, found {type(found).__name__}")
    return found


def model_card(path: str | os.PathLike) -> dict:
    """Return the card of the model at `path` ({} if it has none); a model in a run folder without a card
    of its own gets {'training': {'settings': the run's settings.json}}. DataError if the file is not a JSON object."""
    card = card_path(path)
    if card.is_file():
        return _json_object(card)
    settings = Path(path).parent / "settings.json"
    return {"training": {"settings": _json_object(settings)}} if settings.is_file() else {}


def _card_entry(path: str | os.PathLike, *keys) -> dict:
    """Return the object at card[keys[0]][keys[1]]... of the model at `path` ({} where it is missing);
    DataError naming the card if one of them is not an object."""
    import files

    entry = model_card(path)
    for depth, key in enumerate(keys, 1):
        entry = entry.get(key) or {}
        if not isinstance(entry, dict):
            raise files.DataError(f"{card_path(path)}: its {'.'.join(keys[:depth])} is not a JSON object")
    return entry


def _recorded_offsets(path: str | os.PathLike):
    """Return the affinity offsets the model at `path` predicts, as its card or its run's settings record them:
    the training settings' distances, else the tuned segmentation's offsets; None when neither records any
    (a membrane model, or the default offsets, affinities.OFFSETS)."""
    import affinities

    settings = _card_entry(path, "training", "settings")
    if settings.get("target") == "affinities" and settings.get("offsets"):
        return affinities.parse_offsets(str(settings["offsets"]))
    tuned = _card_entry(path, "segmentation").get("offsets")
    return affinities.check_offsets(tuned) if tuned else None


# ---------------------------------------------------------------- what a model takes and gives

@dataclasses.dataclass(frozen=True)
class ModelIO:
    """What a model takes and gives: `context` input channels (1: one grey page) and `channels` output channels,
    1 a membrane map (probability of cell), more affinities along `offsets` (affinities.OFFSETS if None)."""

    context: int = 1
    channels: int = 1
    offsets: tuple | None = None

    def __post_init__(self):
        import affinities

        if self.context < 1 or self.channels < 1:
            raise ValueError(f"a model takes and gives at least one channel, got {self.context} -> {self.channels}")
        if self.channels == 1 and self.offsets is not None:
            raise ValueError(f"a membrane map (1 channel) has no offsets, got {self.offsets}")
        if self.channels > 1:  # checked against the channels: "... pass the offsets it was trained with"
            object.__setattr__(self, "offsets", affinities.offsets_for(self.channels, self.offsets))

    @property
    def is_affinities(self) -> bool:
        """Whether the model predicts affinities (more than one output channel), not a membrane map."""
        return self.channels > 1

    def cell_map(self, outputs: np.ndarray, raw: bool = False) -> np.ndarray:
        """Return the cell probabilities (..., H, W) of the model's tiled outputs: a membrane map as it is,
        affinities (..., H, W, K) as `affinities.cell_map`; `raw`: of its own (..., H, W, channels) outputs."""
        import affinities

        if self.is_affinities:
            return affinities.cell_map(outputs)
        return outputs[..., 0] if raw else outputs

    def segmentation(self, path: str | os.PathLike, method: str | None = None):
        """Return (method, segment.SegmentParams, offsets or None) to cut the outputs of the model at `path` into
        cells: its card's tuned choice (segment.tune via evaluate.py --tune), else the defaults (mws on affinities,
        multicut on a membrane map); `method` overrides the card's method, with that method's own defaults."""
        import segment

        chosen = _card_entry(path, "segmentation")
        method = method or chosen.get("method") or ("mws" if self.is_affinities else "multicut")
        params = _card_entry(path, "segmentation", "params") if chosen.get("method") == method else {}
        return method, segment.SegmentParams.from_dict(params), self.offsets

    def input_names(self) -> list[str]:
        """Return the names of the input channels: 'raw' (one page), or 'section_m1', 'section_0', 'section_p1',
        ... (the page and its neighbours above and below in the stack)."""
        if self.context == 1:
            return ["raw"]
        half = self.context // 2
        return [f"section_{'m' if d < 0 else 'p' if d > 0 else ''}{abs(d)}" for d in range(-half, half + 1)]

    def describe_input(self) -> str:
        """Return the model card's words for the model's input."""
        if self.context == 1:
            return "one grey 8-bit page (batch, y, x, channel = 1)"
        return (f"a grey 8-bit page and its {self.context - 1} neighbouring sections as {self.context} channels "
                "in stack order, the page in the middle (stack ends mirrored)")

    def describe(self) -> str:
        """Return the model card's words for the model's output."""
        if not self.is_affinities:
            return "probability of cell (1) against membrane (0), float32"
        return (f"{self.channels} affinity channels, float32: probability that the pixel and the one at offset "
                f"(dy, dx) lie in the same cell, offsets {self.offsets}")


def _channels(shape) -> int | None:
    """Return the last side of a model's input or output shape (its channels), None if it does not say."""
    side = shape[-1] if isinstance(shape, (tuple, list)) and shape else None
    return side if isinstance(side, int) else None


def _keras_file_channels(path: Path) -> tuple[int | None, int | None]:
    """Return (input channels, output channels) of a functional model in a .keras (or compact .npz) file, read
    from its configuration without Keras ((None, None) where it does not say)."""
    try:
        if compact.is_compact(path):
            config = compact.read_config(path)["config"]
        else:
            with zipfile.ZipFile(path) as archive:
                config = json.loads(archive.read("config.json"))["config"]
        layers = {layer["name"]: layer["config"] for layer in config["layers"]}
        (first,), (last,) = ([ends] if isinstance(ends[0], str) else ends
                             for ends in (config["input_layers"], config["output_layers"]))
        return _channels(layers[first[0]]["batch_shape"]), layers[last[0]].get("filters")
    except (OSError, ValueError, KeyError, IndexError, TypeError, zipfile.BadZipFile):
        return None, None


def model_io(path: str | os.PathLike, model=None) -> ModelIO:
    """Return what the model at `path` takes and gives (`ModelIO`), the one place that works it out: the channels
    of `model` (the one at `path`, loaded), else of the file (a .keras configuration read without Keras, other
    formats loaded), else, for a model not written yet, of its run's settings; the offsets its card records."""
    import affinities

    path = Path(path)
    offsets = _recorded_offsets(path)
    if model is None and not is_model(path):  # not written yet: what its run's settings say
        if _card_entry(path, "training", "settings").get("target") != "affinities":
            return ModelIO()
        return ModelIO(channels=len(offsets or affinities.OFFSETS), offsets=offsets)
    sides = (None, None) if model is not None or model_kind(path) != "keras" else _keras_file_channels(path)
    if None in sides:
        model = load_model(path) if model is None else model
        sides = _channels(getattr(model, "input_shape", None)), _channels(getattr(model, "output_shape", None))
    if None in sides:
        raise ValueError(f"{path}: the model does not say how many channels it takes and gives")
    return ModelIO(sides[0], sides[1], offsets if sides[1] > 1 else None)
