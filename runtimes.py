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
import warnings
import zipfile
from pathlib import Path

import numpy as np

import compact

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = PROJECT_DIR / "models" / "unet-isbi-cpu.npz"  # the shipped model, compact (model.save_compact)
KERAS_SUFFIX, ONNX_SUFFIX, PACKAGE_SUFFIX = ".keras", ".onnx", ".zip"
SAVEDMODEL_FILE = "saved_model.pb"
ONNX_OPSET = 17
INPUT_NAME = "raw"  # the input's name in the ONNX, SavedModel and bioimage.io exports
PACKAGE_WEIGHTS = ("onnx", "keras_v3", "tensorflow_saved_model_bundle")  # the first one a package has is used
PACKAGE_GAIN = 1 / 255  # the scaling to [0, 1] that predict.py applies before the model
MODEL_KINDS = ("keras", "onnx", "package", "savedmodel")  # the formats `load_model` reads
KIND_NAMES = {"keras": ".keras (or compact .npz)", "onnx": ".onnx", "package": "bioimage.io .zip",
              "savedmodel": "SavedModel folder"}


def model_kind(path: str | os.PathLike) -> str | None:
    """Return the format of the model at `path` by its name (one of MODEL_KINDS; a SavedModel is a folder holding
    saved_model.pb), or None for anything else."""
    path = Path(path)
    if path.is_dir():
        return "savedmodel" if (path / SAVEDMODEL_FILE).is_file() else None
    return {KERAS_SUFFIX: "keras", compact.SUFFIX: "keras", ONNX_SUFFIX: "onnx",
            PACKAGE_SUFFIX: "package"}.get(path.suffix.lower())


def is_model(path: str | os.PathLike) -> bool:
    """Return True if `path` is a model file or folder of a format `load_model` reads."""
    return model_kind(path) is not None and Path(path).exists()


def resolve_model(path: str | os.PathLike | None = None, *, kinds: tuple[str, ...] = MODEL_KINDS) -> Path:
    """Return the model to use, the one place that picks and checks a model path: `path`, else DEFAULT_MODEL;
    FileNotFoundError saying what to do if it is missing, ValueError if it is none of `kinds` (what the caller runs)."""
    if path is None and not DEFAULT_MODEL.is_file():
        raise FileNotFoundError(f"no model given and the default {DEFAULT_MODEL} is not there; train one with "
                                "`python train.py` and pass --model runs/<run>/best.keras")
    path = DEFAULT_MODEL if path is None else Path(path)
    if not path.is_file() and not (path / SAVEDMODEL_FILE).is_file():
        raise FileNotFoundError(f"{path}: no such model file (train one with `python train.py`)")
    names = [KIND_NAMES[kind] for kind in kinds]
    if model_kind(path) not in kinds:
        raise ValueError(f"{path}: not a model this project reads ({', '.join(names)})" if kinds == MODEL_KINDS
                         else f"{path}: not a {' or '.join(names)} model, which this needs")
    return path


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
        output = self.session.get_outputs()[0]
        self.output_shape = tuple(side if isinstance(side, int) else None for side in output.shape)

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
        self.output_shape = tuple(next(iter(self.signature.structured_outputs.values())).shape.as_list())

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
    kind = model_kind(path)
    if path.is_dir() and kind is None:
        raise ValueError(f"{path}: a folder, but not a SavedModel (no {SAVEDMODEL_FILE} in it)")
    if kind == "savedmodel":
        return SavedModel(path)
    if kind == "onnx":
        return OnnxModel(path)
    if kind == "package":
        return load_package(path, precision)
    if kind != "keras":
        raise ValueError(f"{path}: not a model this project reads ({', '.join(KIND_NAMES.values())})")
    if path.is_file() and not zipfile.is_zipfile(path):  # Keras would call it "File not found"
        import files

        raise files.DataError(f"{path}: not a Keras model (a .keras file is a zip archive; this file is not one)")
    from model import load_model as load_keras  # Keras and TensorFlow load here

    return load_keras(path, precision=precision)


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


def input_sections(model) -> int:
    """Return how many sections (input channels) a loaded model takes per page: 1, or a page and its neighbours."""
    return int(model.input_shape[-1] or 1)


def write_onnx(model, dest: Path) -> Path:
    """Write `model` as ONNX (opset ONNX_OPSET) with tf2onnx: input `raw` (batch, y, x, sections) float32 in
    [0, 1], sections = the model's input channels (1, or a page and its neighbours)."""
    import tensorflow as tf

    with environment_kept():
        import tf2onnx

        spec = [tf.TensorSpec((None, None, None, input_sections(model)), tf.float32, name=INPUT_NAME)]
        function = tf.function(lambda x: model(x, training=False), input_signature=spec)
        tf2onnx.convert.from_function(function, input_signature=spec, opset=ONNX_OPSET, output_path=str(dest))
    return dest


RUNTIMES = ("auto", "keras", "onnx")
RUNTIME_ENV = "UNET_ISBI_RUNTIME"  # the default runtime of predict.py, evaluate.py and blocks.py (else auto)
CACHE_ENV = "UNET_ISBI_CACHE"  # where the ONNX conversions and the timings are kept
TIMING_SIDE = 576  # pixels: one tile of tiling.DEFAULT_TILE, as prediction feeds the model
TIMINGS_FILE = "runtimes.json"  # in cache_dir(): the runtime chosen per model and machine, and its timings


def cache_dir() -> Path:
    """Return the folder of the cached conversions and timings: $UNET_ISBI_CACHE, else ~/.cache/unet-isbi."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "unet-isbi")


def _warn(message: str) -> None:
    """Warn (UserWarning, which the faces print as one `warning:` line) about the cache."""
    warnings.warn(message, UserWarning, stacklevel=3)


def _os_reason(err: OSError) -> str:
    """Return the system's words for why a file could not be read or written ("Read-only file system")."""
    import files

    cause = err.__cause__ if isinstance(err.__cause__, OSError) else err  # files.write_atomic names the file itself
    return cause.strerror or files.error_reason(cause)


def _cached_file(path: Path) -> bool:
    """Return whether the cache holds a file at `path` (False also when it cannot be looked at)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _onnx_model(path: Path, digest: str, fallback: bool) -> OnnxModel | None:
    """Return the .keras model at `path` converted to ONNX (float32, normalisation folded) in onnxruntime: the
    conversion kept in `cache_dir()`, else converted now and kept there.

    A cached file that onnxruntime cannot load (truncated, damaged) is converted again, with a warning naming it.
    When the cache cannot be written, there is a warning and, with `fallback`, None (the caller predicts in
    Keras); without it, the conversion is made in a temporary folder and loaded from there.
    """
    import files
    from model import inference_model

    dest = cache_dir() / f"{digest}.onnx"
    if _cached_file(dest):
        try:
            return OnnxModel(dest)
        except Exception as err:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for a broken file
            _warn(f"{dest}: a damaged cached ONNX conversion ({files.error_reason(err)}); converting the model again")
    model = inference_model(load_model(path), float32=True)
    try:
        files.write_atomic(dest, lambda part: write_onnx(model, Path(part)))
        return OnnxModel(dest)
    except OSError as err:
        then = "predicting with Keras" if fallback else "converting it for this run only"
        _warn(f"{dest}: cannot keep the ONNX conversion in the runtime cache ({_os_reason(err)}); {then}")
        if fallback:
            return None
        with tempfile.TemporaryDirectory(prefix="unet-isbi-onnx-") as folder:
            return OnnxModel(write_onnx(model, Path(folder) / "model.onnx"))  # onnxruntime holds it in memory


def _timing(entry) -> dict | None:
    """Return the timing {'runtime', 'seconds'} that a cache entry holds, None if it is not one."""
    if not isinstance(entry, dict) or entry.get("runtime") not in ("keras", "onnx"):
        return None
    seconds = entry.get("seconds")
    if not isinstance(seconds, dict) or not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in seconds.values()):
        return None
    return {"runtime": entry["runtime"], "seconds": seconds}


def _read_timings(path: Path, quiet: bool = False) -> dict:
    """Return the timings kept in the file `path` ({} if there is none); a file that cannot be read or holds
    no JSON object counts as empty, with a warning naming it (unless `quiet`)."""
    import files

    try:
        found = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except OSError as err:
        found, problem = None, f"cannot read the runtime cache ({_os_reason(err)})"
    except (ValueError, RecursionError) as err:  # not JSON (or not text), or nested past Python's limit
        found, problem = None, f"the runtime cache is damaged, not JSON ({files.error_reason(err)})"
    else:
        problem = f"the runtime cache is damaged (a JSON {type(found).__name__}, not an object)"
    if isinstance(found, dict):
        return found
    if not quiet:
        _warn(f"{path}: {problem}; ignoring it and timing again")
    return {}


@contextlib.contextmanager
def _locked(lock: Path):
    """Within the block, hold an exclusive lock on the file `lock` (made if missing): one process at a time
    (no lock where the system has no fcntl)."""
    try:
        import fcntl
    except ImportError:  # Windows: the merge below narrows the race, without closing it
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remember(path: Path, key: str, timing: dict) -> None:
    """Add `timing` under `key` to the timings file `path`, merged with what other processes kept there meanwhile
    (re-read under a lock, then replaced atomically); a warning, not an error, when it cannot be written."""
    import files

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.with_name(path.name + ".lock")):
            timings = {**_read_timings(path, quiet=True), key: timing}
            files.write_atomic(path, json.dumps(timings, indent=2) + "\n")
    except OSError as err:
        _warn(f"{path}: cannot write the runtime cache ({_os_reason(err)}); the choice is not kept")


def _seconds_per_call(model, repeats: int = 3) -> float:
    """Return the best time (seconds) of `repeats` predictions of one tile, after a warm-up call."""
    tile = np.random.default_rng(0).random((1, TIMING_SIDE, TIMING_SIDE, input_sections(model)), dtype=np.float32)
    model.predict_on_batch(tile)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        model.predict_on_batch(tile)
        times.append(time.perf_counter() - began)
    return min(times)


def timing_key(digest: str) -> str:
    """Return the key of a model's timing in the cache: the model's digest, the machine, Keras's precision on it."""
    import hardware

    return f"{digest} {hardware.describe()} {hardware.choose_precision('auto')}"


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

    The cache never stops a prediction: a timings file or conversion that cannot be read or is damaged gives a
    warning naming it and is timed or converted again; one that cannot be written gives a warning, and 'auto'
    predicts in Keras. Processes timing models at once each add their own entry (merged under a lock file).
    """
    import files

    runtime = runtime or default_runtime()
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    path = Path(path)
    if model_kind(path) != "keras":
        return load_model(path, precision="auto"), {"runtime": "as exported", "seconds": {}, "cached": False}
    if runtime == "keras":
        return load_model(path, precision="auto"), {"runtime": "keras", "seconds": {}, "cached": False}
    digest = files.sha256(path)
    if runtime == "onnx":
        return _onnx_model(path, digest, fallback=False), {"runtime": "onnx", "seconds": {}, "cached": False}
    return _fastest(path, digest)


def _fastest(path: Path, digest: str):
    """Return (model, what was chosen) for runtime 'auto': the runtime the cache keeps for this model and machine,
    else the faster of Keras and onnxruntime, timed now and kept (Keras when the cache cannot take the conversion)."""
    key = timing_key(digest)
    timings_file = cache_dir() / TIMINGS_FILE
    timings = _read_timings(timings_file)
    timing = _timing(timings.get(key))
    if key in timings and timing is None:
        _warn(f"{timings_file}: the entry for this model and machine is not a timing; timing again")
    if timing is not None:
        chosen = {**timing, "cached": True}
        onnx = _onnx_model(path, digest, fallback=True) if timing["runtime"] == "onnx" else None
        if onnx is not None:
            return onnx, chosen
        keras_chosen = chosen if timing["runtime"] == "keras" else {"runtime": "keras", "seconds": {}, "cached": False}
        return load_model(path, precision="auto"), keras_chosen
    onnx = _onnx_model(path, digest, fallback=True)
    keras_model = load_model(path, precision="auto")
    if onnx is None:
        return keras_model, {"runtime": "keras", "seconds": {}, "cached": False}
    candidates = {"keras": keras_model, "onnx": onnx}
    seconds = {name: _seconds_per_call(model) for name, model in candidates.items()}
    timing = {"runtime": min(seconds, key=seconds.get), "seconds": seconds}
    _remember(timings_file, key, timing)
    return candidates[timing["runtime"]], {**timing, "cached": False}
