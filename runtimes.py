"""Load a model from any format this project exports, as an object predict.py's tiling can call.

    model = runtimes.load_model("dist/unet-isbi-cpu.onnx")   # or .keras, a SavedModel folder, a bioimage.io .zip
    probabilities = model.predict_on_batch(tiles)            # (N, H, W, 1) float32 in [0, 1] -> (N, H, W, 1)

Every loaded model has `input_shape` ((None, height or None, width or None, 1))
and `predict_on_batch`, as a Keras model has; the input is scaled to [0, 1]
as in training (`data.normalize_images`), so a bioimage.io package's own
preprocessing (divide by 255) is checked, not applied.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = PROJECT_DIR / "models" / "unet-isbi-cpu.keras"  # the shipped model
KERAS_SUFFIX, ONNX_SUFFIX, PACKAGE_SUFFIX = ".keras", ".onnx", ".zip"
SAVEDMODEL_FILE = "saved_model.pb"
ONNX_OPSET = 17
INPUT_NAME = "raw"  # the input's name in the ONNX, SavedModel and bioimage.io exports
PACKAGE_WEIGHTS = ("onnx", "keras_v3", "tensorflow_saved_model_bundle")  # the first one a package has is used
PACKAGE_GAIN = 1 / 255  # the scaling to [0, 1] that predict.py applies before the model


def is_model(path: str | os.PathLike) -> bool:
    """Return True if `path` is a model file or folder of a format `load_model` reads."""
    path = Path(path)
    if path.is_dir():
        return (path / SAVEDMODEL_FILE).is_file()
    return path.is_file() and path.suffix.lower() in (KERAS_SUFFIX, ONNX_SUFFIX, PACKAGE_SUFFIX)


def resolve_model(path: str | os.PathLike | None = None) -> Path:
    """Return the model to use: `path` (.keras, .onnx, bioimage.io .zip or SavedModel folder), else DEFAULT_MODEL;
    FileNotFoundError saying what to do if missing."""
    if path is not None:
        if not Path(path).is_file() and not (Path(path) / SAVEDMODEL_FILE).is_file():
            raise FileNotFoundError(f"{path}: no such model file (train one with `python train.py`)")
        return Path(path)
    if not DEFAULT_MODEL.is_file():
        raise FileNotFoundError(
            f"no model given and the default {DEFAULT_MODEL} is not there; train one with "
            "`python train.py` and pass --model runs/<run>/best.keras"
        )
    return DEFAULT_MODEL


class OnnxModel:
    """An ONNX model run by onnxruntime on the CPU."""

    def __init__(self, path: str | os.PathLike):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # Idle onnxruntime threads otherwise spin for a while after each call, taking the cores from what
        # follows (stitching, cells, Keras): measured, that slowed the next Keras call by 10 % and saved 1 %.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(f"{path}: expected one input of (batch, y, x, channel), got "
                             f"{[(i.name, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        self.input_shape = tuple(side if isinstance(side, int) else None for side in inputs[0].shape)

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        """Return the (N, H, W, C) float32 output for a float32 (N, H, W, 1) batch."""
        return self.session.run(None, {self.input_name: np.asarray(batch, np.float32)})[0]


class SavedModel:
    """A TensorFlow SavedModel folder, called through its serving_default signature."""

    def __init__(self, path: str | os.PathLike):
        import tensorflow as tf

        self.loaded = tf.saved_model.load(str(path))
        if "serving_default" not in self.loaded.signatures:
            raise ValueError(f"{path}: the SavedModel has no serving_default signature")
        self.signature = self.loaded.signatures["serving_default"]
        (self.input_name, spec), = self.signature.structured_input_signature[1].items()
        self.input_shape = tuple(spec.shape.as_list())

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        """Return the (N, H, W, C) float32 output (the signature's first output) for a (N, H, W, 1) batch."""
        import tensorflow as tf

        outputs = self.signature(**{self.input_name: tf.constant(batch, tf.float32)})
        return next(iter(outputs.values())).numpy()


def _check_package_input(descr, path: Path) -> None:
    """Raise ValueError if the package's input is not one channel scaled by 1/255, as predict.py feeds it."""
    (tensor,) = descr.inputs
    axes = [str(axis.id) for axis in tensor.axes]
    gains = [step.kwargs.gain for step in tensor.preprocessing if step.id == "scale_linear"]
    others = [step.id for step in tensor.preprocessing if step.id not in ("ensure_dtype", "scale_linear")]
    if axes != ["batch", "y", "x", "channel"] or others or not (len(gains) == 1 and np.isclose(gains[0], PACKAGE_GAIN)):
        raise ValueError(
            f"{path}: the package takes axes {axes} with preprocessing "
            f"{[step.id for step in tensor.preprocessing]}; predict.py feeds (batch, y, x, channel) pages "
            "scaled to [0, 1] (divided by 255): predict with bioimageio.core instead"
        )


def load_package(path: str | os.PathLike, precision: str | None = None, weight_format: str | None = None):
    """Return the model in a bioimage.io package (.zip), from its `weight_format` weights (default: the first
    of PACKAGE_WEIGHTS it has)."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from bioimageio.spec import load_model_description

    path = Path(path)
    try:
        descr = load_model_description(path, perform_io_checks=False)
    except ValueError as err:
        raise ValueError(f"{path}: not a valid bioimage.io model package ({str(err).splitlines()[0]})") from err
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise ValueError(f"{path}: expected one input and one output tensor, got {len(descr.inputs)} and "
                         f"{len(descr.outputs)}")
    _check_package_input(descr, path)
    wanted = PACKAGE_WEIGHTS if weight_format is None else (weight_format,)
    fmt = next((f for f in wanted if f in PACKAGE_WEIGHTS and getattr(descr.weights, f, None) is not None), None)
    if fmt is None:
        raise ValueError(f"{path}: the package has none of the weights {', '.join(wanted)} (this project runs "
                         f"{', '.join(PACKAGE_WEIGHTS)})")
    entry = getattr(descr.weights, fmt)
    # The runtimes read files; once loaded, the model holds its weights in memory.
    with tempfile.TemporaryDirectory(prefix="unet-isbi-package-") as folder:
        reader = entry.get_reader()
        weights = Path(folder) / reader.original_file_name
        weights.write_bytes(reader.read())
        if fmt == "tensorflow_saved_model_bundle":
            with zipfile.ZipFile(weights) as archive:
                archive.extractall(Path(folder) / "savedmodel")
            weights = Path(folder) / "savedmodel"
        return load_model(weights, precision)


def load_model(path: str | os.PathLike, precision: str | None = None):
    """Return the model at `path` for inference: a .keras file (in `precision`, see `model.load_model`),
    an .onnx file, a SavedModel folder or a bioimage.io package (.zip)."""
    path = Path(path)
    if path.is_dir():
        if not (path / SAVEDMODEL_FILE).is_file():
            raise ValueError(f"{path}: a folder, but not a SavedModel (no {SAVEDMODEL_FILE} in it)")
        return SavedModel(path)
    suffix = path.suffix.lower()
    if suffix == ONNX_SUFFIX:
        return OnnxModel(path)
    if suffix == PACKAGE_SUFFIX:
        return load_package(path, precision)
    if suffix != KERAS_SUFFIX:
        raise ValueError(f"{path}: not a model this project reads (.keras, .onnx, bioimage.io .zip, SavedModel folder)")
    from model import load_model as load_keras  # Keras and TensorFlow load here

    return load_keras(path, precision=precision)


# ---------------------------------------------------------------- the model card

CARD_SUFFIX = ".json"  # a model's card sits beside it: models/unet-isbi-cpu.json, runs/cpu/best.json


def card_path(path: str | os.PathLike) -> Path:
    """Return where the card of the model at `path` is (it may not exist yet)."""
    path = Path(path)
    return path.with_suffix(CARD_SUFFIX) if path.suffix else path.parent / (path.name + CARD_SUFFIX)


def model_card(path: str | os.PathLike) -> dict:
    """Return the card of the model at `path` ({} if it has none); a model in a run folder without a card
    of its own gets {'training': {'settings': the run's settings.json}}."""
    card = card_path(path)
    if card.is_file():
        return json.loads(card.read_text())
    settings = Path(path).parent / "settings.json"
    return {"training": {"settings": json.loads(settings.read_text())}} if settings.is_file() else {}


def segmentation_for(path: str | os.PathLike, channels: int, method: str | None = None):
    """Return (method, segment.SegmentParams, offsets or None) to cut the model's `channels`-channel outputs
    into cells: the card's tuned choice (segment.tune via evaluate.py --tune), else the defaults (mws on
    affinities, multicut on a membrane map); `method` overrides the card's method."""
    import affinities
    import segment

    card = model_card(path)
    chosen = card.get("segmentation", {})
    settings = card.get("training", {}).get("settings", {})
    offsets = None
    if channels > 1:
        distances = settings.get("offsets") if settings.get("target") == "affinities" else None
        offsets = affinities.offsets_for(channels, affinities.parse_offsets(distances) if distances else None)
    method = method or chosen.get("method") or ("mws" if channels > 1 else "multicut")
    params = chosen.get("params") if chosen.get("method") == method else None
    return method, segment.SegmentParams.from_dict(params or {}), offsets


# ---------------------------------------------------------------- ONNX, and the fastest runtime

@contextlib.contextmanager
def environment_kept():
    """Within the block, changes to os.environ are undone at its end.

    tf2onnx (TF_CPP_MIN_LOG_LEVEL=3, at import) and bioimageio.core's model
    test (TF_ENABLE_ONEDNN_OPTS=0) set TensorFlow's variables for the whole
    process, and so for every process it starts afterwards.
    """
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def write_onnx(model, dest: Path) -> Path:
    """Write `model` as ONNX (opset ONNX_OPSET) with tf2onnx: input `raw` (batch, y, x, 1) float32 in [0, 1]."""
    import tensorflow as tf

    with environment_kept():
        import tf2onnx

        spec = [tf.TensorSpec((None, None, None, 1), tf.float32, name=INPUT_NAME)]
        function = tf.function(lambda x: model(x, training=False), input_signature=spec)
        tf2onnx.convert.from_function(function, input_signature=spec, opset=ONNX_OPSET, output_path=str(dest))
    return dest


RUNTIMES = ("auto", "keras", "onnx")
RUNTIME_ENV = "UNET_ISBI_RUNTIME"  # the default runtime of predict.py, evaluate.py and blocks.py (else auto)
CACHE_ENV = "UNET_ISBI_CACHE"  # where the ONNX conversions and the timings are kept
TIMING_SIDE = 576  # pixels: one tile of tiling.DEFAULT_TILE, as prediction feeds the model


def cache_dir() -> Path:
    """Return the folder of the cached conversions and timings: $UNET_ISBI_CACHE, else ~/.cache/unet-isbi."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "unet-isbi")


def _onnx_of(path: Path, digest: str) -> Path:
    """Return the cached ONNX conversion (float32, normalisation folded) of the .keras model at `path`."""
    from model import fold_batch_norm, load_model as load_keras, with_dtype_policy

    dest = cache_dir() / f"{digest}.onnx"
    if not dest.is_file():
        import files

        dest.parent.mkdir(parents=True, exist_ok=True)
        model = with_dtype_policy(fold_batch_norm(load_keras(path)), "float32")
        files.write_atomic(dest, lambda part: write_onnx(model, Path(part)))
    return dest


def _seconds_per_call(model, repeats: int = 3) -> float:
    """Return the best time (seconds) of `repeats` predictions of one tile, after a warm-up call."""
    tile = np.random.default_rng(0).random((1, TIMING_SIDE, TIMING_SIDE, 1), dtype=np.float32)
    model.predict_on_batch(tile)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        model.predict_on_batch(tile)
        times.append(time.perf_counter() - began)
    return min(times)


def default_runtime() -> str:
    """Return the runtime used when none is asked for: $UNET_ISBI_RUNTIME, else 'auto'."""
    return os.environ.get(RUNTIME_ENV) or "auto"


def load_for_prediction(path: str | os.PathLike, runtime: str | None = None):
    """Return the model at `path` in the runtime that predicts it fastest on this machine, with what was chosen:
    (model, {'runtime', 'seconds' per 576x576 tile by runtime, 'cached'}).

    A .keras model runs in Keras (in the precision `hardware.choose_precision` picks) or, converted once to
    ONNX (float32), in onnxruntime; 'auto' times both on one tile at first use and keeps the choice per
    machine and model in `cache_dir()`. Other formats load as they are (`load_model`). `runtime` None:
    `default_runtime()`.
    """
    import files
    import hardware

    runtime = runtime or default_runtime()
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    path = Path(path)
    if path.suffix.lower() != KERAS_SUFFIX:
        return load_model(path, precision="auto"), {"runtime": "as exported", "seconds": {}, "cached": False}
    if runtime == "keras":
        return load_model(path, precision="auto"), {"runtime": "keras", "seconds": {}, "cached": False}
    digest = files.sha256(path)
    if runtime == "onnx":
        return OnnxModel(_onnx_of(path, digest)), {"runtime": "onnx", "seconds": {}, "cached": False}
    key = f"{digest} {hardware.describe()} {hardware.choose_precision('auto')}"
    timings_file = cache_dir() / "runtimes.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    if key in timings:
        chosen = {**timings[key], "cached": True}
    else:
        candidates = {"keras": load_model(path, precision="auto"), "onnx": OnnxModel(_onnx_of(path, digest))}
        seconds = {name: _seconds_per_call(model) for name, model in candidates.items()}
        chosen = {"runtime": min(seconds, key=seconds.get), "seconds": seconds}
        timings_file.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(timings_file, json.dumps({**timings, key: chosen}, indent=2) + "\n")
        chosen = {**chosen, "cached": False}
    if chosen["runtime"] == "onnx":
        return OnnxModel(_onnx_of(path, digest)), chosen
    return load_model(path, precision="auto"), chosen
