"""A Keras model in a quarter of a .keras file's space: its configuration and its weights, the kernels in 8 bits.

    compact.write("models/unet-isbi-cpu.npz", model.to_json(), model.get_weights())   # model.save_compact does this
    config, weights = compact.read_config(path), compact.read_weights(path)           # model.load_model does this

A .npz archive (numpy's zip of arrays, compressed) holding the configuration as
UTF-8 JSON bytes and, for each weight in `get_weights()` order, either the array
itself (biases: one dimension) or, for a kernel, int8 steps with one float32
scale per output channel (its last axis): weight = step * scale, the largest
weight of a channel at 127 steps. A kernel's weights move by at most half a
step, 1/254 of its channel's largest. Numpy only: a model's channels are read
from it without TensorFlow (cards.model_io).
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

SUFFIX = ".npz"
CONFIG = "keras_config"  # the key of the configuration; its presence marks a compact model
STEPS = 127  # int8 steps from 0 to a channel's largest weight


def is_compact(path: str | os.PathLike) -> bool:
    """Return True if `path` names a compact model (by its suffix; what it holds is checked when it is read)."""
    return os.fspath(path).lower().endswith(SUFFIX)


def quantize(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (int8 steps, float32 scale per output channel) of a kernel whose last axis is its output channels."""
    weight = np.asarray(weight, np.float32)
    largest = np.abs(weight).reshape(-1, weight.shape[-1]).max(axis=0)
    scale = np.where(largest > 0, largest / STEPS, 1.0).astype(np.float32)
    return np.clip(np.rint(weight / scale), -STEPS, STEPS).astype(np.int8), scale


def pack(config_json: str, weights: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Return the arrays of a compact model: the configuration and the weights (kernels quantized)."""
    arrays = {CONFIG: np.frombuffer(config_json.encode(), np.uint8)}
    for index, weight in enumerate(weights):
        if np.ndim(weight) < 2:
            arrays[f"w{index}"] = np.asarray(weight, np.float32)
        else:
            arrays[f"q{index}"], arrays[f"s{index}"] = quantize(weight)
    return arrays


def write(path: str | os.PathLike, config_json: str, weights: list[np.ndarray]) -> None:
    """Write the compact model to `path`, a new file (callers write through files.write_atomic)."""
    with open(path, "wb") as out:  # a file object: np.savez would add .npz to a name without it
        np.savez_compressed(out, **pack(config_json, weights))


def _archive(path: str | os.PathLike):
    """Return the open npz archive at `path`; ValueError naming it if it is not a compact model."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a numpy .npz archive ({err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile) or CONFIG not in archive.files:
        raise ValueError(f"{path}: not a compact model (no {CONFIG} in it)")
    return archive


def read_config(path: str | os.PathLike) -> dict:
    """Return the model's configuration (as Keras's `model.to_json()` wrote it) from the compact model at `path`."""
    with _archive(path) as archive:
        return json.loads(archive[CONFIG].tobytes().decode())


def read_weights(path: str | os.PathLike) -> list[np.ndarray]:
    """Return the model's weights (float32, in `get_weights()` order) from the compact model at `path`."""
    with _archive(path) as archive:
        count = sum(name.startswith(("w", "q")) for name in archive.files)
        weights = []
        for index in range(count):
            if f"w{index}" in archive.files:
                weights.append(archive[f"w{index}"])
            elif f"q{index}" in archive.files and f"s{index}" in archive.files:
                weights.append(archive[f"q{index}"].astype(np.float32) * archive[f"s{index}"])
            else:
                raise ValueError(f"{path}: weight {index} of {count} is missing")
        return weights
