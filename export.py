"""Package a trained run as a model to ship, or export a model for other tools and runtimes.

    python export.py runs/cpu                      # writes models/unet-isbi-cpu.npz (8-bit kernels) and .json
    python export.py runs/original --dest models/unet-isbi-original.keras
    python export.py --format keras                # the shipped model as a float32 .keras -> dist/unet-isbi-cpu.keras
    python export.py --format bioimageio           # the shipped model -> dist/unet-isbi-cpu.zip (bioimage.io)
    python export.py --format onnx                 # -> dist/unet-isbi-cpu.onnx (onnxruntime, OpenVINO)
    python export.py --format savedmodel --model runs/cpu/best.keras --out dist/cpu-savedmodel

Every export is checked before it is kept: the ONNX and SavedModel files are
run on a test page and compared with the Keras model (at most TOLERANCE
apart); the bioimage.io package is validated by bioimageio.spec and passes
bioimageio.core's model test. No step needs the internet.
"""

from __future__ import annotations

import cli

if __name__ == "__main__":
    cli.quiet_native_logs()  # before TensorFlow loads

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

import cards
import compact
import data
import files
import hardware
import runs
import runtimes
from model import SIZE_MULTIPLE, inference_model, load_model, save_compact
from runtimes import INPUT_NAME, ONNX_OPSET, environment_kept, write_onnx

PROJECT_DIR = runtimes.PROJECT_DIR
DEFAULT_DEST = runtimes.DEFAULT_MODEL
MAX_MB = 10  # a tracked file in the repository stays under 10 MB
LICENSE = "MIT"  # SPDX id of the exported packages' licence, the project's own (LICENSE)


def ship_model(run_dir: str | Path, dest: str | Path = DEFAULT_DEST, data_dir: str | Path | None = None) -> dict:
    """Write the run's best model (float32, no optimizer; compact, its kernels in 8 bits, where `dest` is a .npz as
    the default is: `model.save_compact`) to `dest` and its card to `dest`.json; return the card.

    The card holds how it was trained (the run's settings.json and
    summary.json), how its output is cut into cells (`evaluate.tune`, on the
    validation pages) and its scores on the test pages (`evaluate.evaluate`).
    """
    import evaluate

    run = runs.RunFolder(run_dir)
    if not run.best.is_file():
        raise FileNotFoundError(f"{run.best}: no best model in this run; train it first")
    dest = Path(dest)
    model = inference_model(load_model(run.best), float32=True)
    if compact.is_compact(dest):
        save_compact(model, dest)
    else:
        files.write_atomic(dest, model.save)
    size_mb = dest.stat().st_size / 2**20
    if size_mb > MAX_MB:
        raise ValueError(f"{dest} is {size_mb:.1f} MB, more than the {MAX_MB} MB a shipped model may take")

    card_path = cards.card_path(dest)
    card_path.unlink(missing_ok=True)  # a card left from an earlier model names that model's choices
    files.write_atomic(card_path, json.dumps({"training": {"settings": run.read_json(run.settings)}}) + "\n")
    # Keras, the reference runtime: the card's figures do not depend on which runtime is faster where it ships
    segmentation = evaluate.tune(dest, data_dir, runtime="keras")
    scores = evaluate.evaluate(dest, data_dir, pages=data.TEST_PAGES, runtime="keras")
    card = {
        "model": dest.name,
        "sha256": files.sha256(dest),
        "size_mb": round(size_mb, 2),
        "parameters": model.count_params(),
        "input": "grey EM image, any size (tiled by predict.py), scaled to [0, 1]",
        "output": cards.model_io(dest, model).describe(),
        "training": {
            "settings": run.read_json(run.settings),
            "summary": run.read_json(run.summary),
        },
        "segmentation": segmentation,
        "test_pages": scores["pages"],
        # Keras's precision here: in another one the multicut's cuts move by a percent or so (tests/test_evaluate.py)
        "test_scores": {"mean": scores["mean"], "per_page": scores["per_page"],
                        "precision": hardware.choose_precision("auto")},
    }
    files.write_atomic(card_path, json.dumps(card, indent=2) + "\n")
    return card


# ---------------------------------------------------------------- portable exports

FORMATS = ("bioimageio", "keras", "onnx", "savedmodel")
DIST_DIR = PROJECT_DIR / "dist"
MIN_SIZE = 96  # smallest input side a bioimage.io tool may pick, pixels: more than twice the halo
HALO = 32  # pixels a bioimage.io tool should crop from each tile edge: predict.py's overlap / 2
TOLERANCE = 1e-4  # largest |difference| of probabilities allowed between the Keras model and an export
OUTPUT_NAME = "prediction"
CITATIONS = (
    ("Ronneberger O, Fischer P, Brox T. U-Net: Convolutional Networks for Biomedical Image Segmentation. "
     "MICCAI 2015, LNCS 9351, 234-241.", "10.1007/978-3-319-24574-4_28"),
    ("Arganda-Carreras I, Turaga SC, Berger DR, et al. Crowdsourcing the creation of image segmentation "
     "algorithms for connectomics. Front. Neuroanat. 9:142 (2015).", "10.3389/fnana.2015.00142"),
)


def default_out(model_path: str | Path, fmt: str) -> Path:
    """Return where `fmt` of `model_path` goes when no --out is given: dist/<model name>.zip|.onnx|-savedmodel."""
    stem = Path(model_path).stem
    return DIST_DIR / {"bioimageio": f"{stem}.zip", "keras": f"{stem}.keras", "onnx": f"{stem}.onnx",
                       "savedmodel": f"{stem}-savedmodel"}[fmt]


def check_writable(out: Path, fmt: str) -> None:
    """Raise OSError naming `out` if the `fmt` export cannot be written there: its nearest existing folder is
    not writable, or something that the export would not replace is in the way."""
    if fmt == "savedmodel":
        if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "saved_model.pb").is_file()):
            raise OSError(f"{out}: exists and is not a SavedModel folder; give a new folder name")
    elif out.is_dir():
        raise OSError(f"{out}: is a folder; give a file name")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(f"{out}: cannot write here ({parent} is not a writable folder)")


def valid_input_size(model) -> tuple[int, int] | None:
    """Return the model's one (height, width) in pixels if it is built for a fixed size, else None (any multiple of 16)."""
    height, width = model.input_shape[1:3]
    return (height, width) if height is not None and width is not None else None


def check_test_page(page: np.ndarray, model, name: str) -> None:
    """Raise ValueError naming `name` if the 2-D uint8 `page` is not an input the model's package may declare."""
    if page.dtype != np.uint8:
        raise ValueError(f"{name}: the test page is {page.dtype}; the package takes 8-bit pages (uint8)")
    sections = page.shape[2] if page.ndim == 3 else 1
    if sections != model.input_shape[3]:
        raise ValueError(f"{name}: the model takes {model.input_shape[3]} section(s) per page, the test page has "
                         f"{sections}")
    fixed = valid_input_size(model)
    if fixed is not None:
        if page.shape[:2] != fixed:
            raise ValueError(f"{name}: the test page is {page.shape[0]}x{page.shape[1]} pixels but the model only "
                             f"takes {fixed[0]}x{fixed[1]}")
    elif min(page.shape[:2]) < MIN_SIZE or any(side % SIZE_MULTIPLE for side in page.shape[:2]):
        raise ValueError(f"{name}: the test page is {page.shape[0]}x{page.shape[1]} pixels; the model's valid "
                         f"sizes are multiples of {SIZE_MULTIPLE} from {MIN_SIZE}, crop it to fit")


def read_test_page(test_image: str | Path | None = None, data_dir: str | Path | None = None,
                   sections: int = 1) -> tuple[np.ndarray, str]:
    """Return (page 0 of `test_image`, default the ISBI test-volume.tif, as a 2-D array, or (H, W, sections) with
    its neighbours for a model that sees them (`data.with_context`); a name for messages)."""
    path = Path(test_image) if test_image is not None else data.find_data_dir(data_dir) / data.TEST_FILE
    return data.with_context(files.read_stack(path), sections)[0], f"{path} page 0"


def _with_batch(page: np.ndarray) -> np.ndarray:
    """Return a page ((H, W) or (H, W, sections)) as the model's float32 input (1, H, W, sections), scaled to
    [0, 1] as in training."""
    page = data.normalize_images(page)
    return (page if page.ndim == 3 else page[..., np.newaxis])[np.newaxis]


def write_savedmodel(model, dest: Path) -> Path:
    """Write `model` as a TensorFlow SavedModel folder: function `serve` (= signature serving_default),
    input `raw` (batch, y, x, sections) float32 in [0, 1], output dict {"prediction": (batch, y, x, C)}."""
    import tensorflow as tf

    spec = [tf.TensorSpec((None, None, None, runtimes.input_sections(model)), tf.float32, name=INPUT_NAME)]
    # A plain tf.Module stores each weight once (keras.export.ExportArchive stores them twice).
    module = tf.Module()
    module.weights = [variable.value for variable in model.variables]
    module.serve = tf.function(lambda x: {OUTPUT_NAME: model(x, training=False)}, input_signature=spec)
    tf.saved_model.save(module, str(dest), signatures={"serving_default": module.serve})
    return dest


def largest_difference(path: Path, x: np.ndarray, reference: np.ndarray) -> float:
    """Return the largest |difference| between the export at `path` run on `x` and `reference` (probabilities)."""
    return float(np.abs(runtimes.load_model(path).predict_on_batch(x) - reference).max())


def _check_close(difference: float, what: str) -> None:
    if not difference <= TOLERANCE:  # also catches NaN
        raise ValueError(f"{what} predicts up to {difference:.2g} away from the Keras model (tolerance {TOLERANCE})")


def _cover(page: np.ndarray, probabilities: np.ndarray, dest: Path) -> Path:
    """Write a 2:1 PNG cover: a 256-pixel crop of the page beside the model's prediction on it."""
    from PIL import Image

    side = min(256, *page.shape)
    y, x = (page.shape[0] - side) // 2, (page.shape[1] - side) // 2
    crop = page[y : y + side, x : x + side]
    prediction = np.round(probabilities[y : y + side, x : x + side] * 255).astype(np.uint8)
    Image.fromarray(np.concatenate([crop, prediction], axis=1)).save(dest)
    return dest


def _documentation(model_path: Path, card: dict | None, dest: Path, io: cards.ModelIO = cards.ModelIO()) -> Path:
    """Write the package's README.md: what it segments, how it was trained, its test scores, its limits; `io`:
    what the model takes and gives."""
    lines = [
        f"# U-Net for neuronal membranes in ISBI 2012 EM images ({model_path.name})", "",
        "Segments cell membranes in serial-section transmission electron microscopy (ssTEM) images of the",
        "*Drosophila* first instar larva ventral nerve cord (ISBI 2012 EM segmentation challenge): the output",
        "is, per pixel, the probability of *cell* (1) against *membrane* (0). A U-Net (Ronneberger et al.",
        "2015) with 'same' padding, exported by the unet-isbi project (`python export.py --format bioimageio`).",
        "", "## Input and output", "",
        f"- input `raw`: {io.describe_input()}; it is scaled to [0, 1] (divided by 255),",
        f"  as in training. Sides: any multiple of {SIZE_MULTIPLE} from {MIN_SIZE} pixels; tools should tile",
        f"  large images and crop a halo of {HALO} pixels from each tile edge.",
        "- output `prediction`: float32 probability of cell, the size of the input. Threshold at 0.5 for a mask.",
        "", "## Training", "",
    ]
    if card and card.get("training", {}).get("settings"):
        settings = card["training"]["settings"]
        keys = ("preset", "context", "filters", "crop", "batch_size", "steps_per_epoch", "epochs", "learning_rate", "loss",
                "precision_policy", "augmentation", "seed")
        held_out = len(data.VALIDATION_PAGES) + len(data.TEST_PAGES)
        lines += [f"Trained with `train.py` on {30 - held_out} of the 30 ISBI 2012 training pages (validation pages "
                  f"{list(data.VALIDATION_PAGES)} and test pages {list(data.TEST_PAGES)} held out). Settings:", ""]
        lines += [f"- {key}: {settings[key]}" for key in keys if key in settings]
    else:
        lines += ["No training card (`<model>.json`) was found beside the model, so its settings are not recorded."]
    lines += ["", "## Validation", ""]
    if card and card.get("test_scores"):
        mean = card["test_scores"]["mean"]
        lines += [f"Scores on held-out training pages {card.get('test_pages')} (`evaluate.py`; lower pixel "
                  "difference (%) and higher V_rand / V_info are better):", "", "| metric | mean |", "| --- | --- |"]
        lines += [f"| {key} | {value:.4g} |" for key, value in mean.items() if isinstance(value, (int, float))]
    else:
        lines += ["No test scores were recorded for this model."]
    lines += [
        "", "## Limits", "",
        "- Trained on one stack (30 pages, 512x512, 4x4x50 nm voxels) of one tissue and one microscope: other EM",
        "  data (other resolution, contrast, staining, SEM or FIB-SEM) needs checking and likely fine-tuning.",
        "- Gives probabilities, not instance labels: cut them into cells with the project's segment.py",
        "  (multicut on a membrane map, mutex watershed on affinities; python-elf), with the parameters in",
        "  the model's card (`segmentation`), or with the bioimage.io tools' own watershed.",
        ("- 2-D only; each page of a stack is predicted on its own." if io.context == 1 else
         f"- Sees {io.context} sections at once: predict a stack, each page with its neighbours, not single images."),
        "", "## Training data", "",
        "ISBI 2012 EM segmentation challenge, training and test volumes (Cardona et al. 2010; "
        "Arganda-Carreras et al. 2015, doi:10.3389/fnana.2015.00142).", "",
    ]
    dest.write_text("\n".join(lines))
    return dest


def _weights_description(parts: dict[str, Path]):
    """Return the bioimage.io (spec 0.5) WeightsDescr of the Keras, SavedModel and ONNX weights in `parts`."""
    import keras
    import tensorflow as tf
    from bioimageio.spec.model import v0_5

    tf_version = v0_5.Version(tf.__version__)
    return v0_5.WeightsDescr(
        keras_v3=v0_5.KerasV3WeightsDescr(source=parts["keras"], keras_version=v0_5.Version(keras.__version__),
                                          backend=("tensorflow", tf_version)),
        tensorflow_saved_model_bundle=v0_5.TensorflowSavedModelBundleWeightsDescr(
            source=parts["savedmodel"], tensorflow_version=tf_version, parent="keras_v3",
            comment="keras.export.ExportArchive, endpoint 'serve'"),
        onnx=v0_5.OnnxWeightsDescr(source=parts["onnx"], opset_version=ONNX_OPSET, parent="keras_v3",
                                   comment="tf2onnx from the Keras model"),
    )


def model_description(model, parts: dict[str, Path], io: cards.ModelIO):
    """Return the bioimage.io (spec 0.5) ModelDescr of `model` from the `parts` written for it; `io` says what it
    gives (an affinity model's channels are named by their offsets)."""
    from bioimageio.spec.dataset.v0_3 import DatasetDescr
    from bioimageio.spec.model import v0_5

    channel_names = (["cell"] if not io.is_affinities
                     else [f"same_cell_{dy}_{dx}".replace("-", "m") for dy, dx in io.offsets])
    size = valid_input_size(model)
    y_size, x_size = size if size else (v0_5.ParameterizedSize(min=MIN_SIZE, step=SIZE_MULTIPLE),) * 2
    input_id, output_id = v0_5.TensorId(INPUT_NAME), v0_5.TensorId(OUTPUT_NAME)
    to_float = v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32"))
    inputs = v0_5.InputTensorDescr(
        id=input_id, description=io.describe_input(),
        axes=[v0_5.BatchAxis(), v0_5.SpaceInputAxis(id=v0_5.AxisId("y"), size=y_size),
              v0_5.SpaceInputAxis(id=v0_5.AxisId("x"), size=x_size),
              v0_5.ChannelAxis(channel_names=[v0_5.Identifier(name) for name in io.input_names()])],
        test_tensor=v0_5.FileDescr(source=parts["test_input"]),
        sample_tensor=v0_5.FileDescr(source=parts["sample_input"]) if io.context == 1 else None,
        data=v0_5.IntervalOrRatioDataDescr(type="uint8"),
        preprocessing=[to_float, v0_5.ScaleLinearDescr(kwargs=v0_5.ScaleLinearKwargs(gain=1 / 255, offset=0.0)),
                       to_float],
    )
    outputs = v0_5.OutputTensorDescr(
        id=output_id, description=io.describe(),
        axes=[v0_5.BatchAxis(),
              *(v0_5.SpaceOutputAxisWithHalo(id=v0_5.AxisId(axis), halo=HALO,
                                             size=v0_5.SizeReference(tensor_id=input_id, axis_id=v0_5.AxisId(axis)))
                for axis in ("y", "x")),
              v0_5.ChannelAxis(channel_names=[v0_5.Identifier(name) for name in channel_names])],
        test_tensor=v0_5.FileDescr(source=parts["test_output"]),
        sample_tensor=v0_5.FileDescr(source=parts["sample_output"]),
        data=v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )
    weights = _weights_description(parts)
    cite = [v0_5.CiteEntry(text=text, doi=v0_5.Doi(doi)) for text, doi in CITATIONS]
    training_data = DatasetDescr(
        name="ISBI 2012 EM segmentation challenge",
        description="30 ssTEM pages (512x512, Drosophila first instar larva ventral nerve cord) with membrane labels",
        cite=cite[1:], license=None, tags=["electron-microscopy", "membranes"],
    )
    return v0_5.ModelDescr(
        name="U-Net ISBI 2012 membranes",
        description="2-D U-Net giving the probability of cell against membrane in ssTEM images (ISBI 2012)",
        authors=[v0_5.Author(name="unet-isbi contributors")],
        cite=cite,
        license=v0_5.LicenseId(LICENSE),
        documentation=v0_5.FileDescr(source=parts["documentation"]),
        covers=[v0_5.FileDescr(source=parts["cover"])],
        tags=["unet", "segmentation", "electron-microscopy", "membranes", "isbi2012", "2d", "tensorflow", "keras"],
        inputs=[inputs], outputs=[outputs], weights=weights, training_data=training_data,
        config=v0_5.Config(bioimageio=v0_5.BioimageioConfig(reproducibility_tolerance=[
            v0_5.ReproducibilityTolerance(absolute_tolerance=TOLERANCE, relative_tolerance=0.0)])),
    )


def check_package(path: Path) -> dict:
    """Return the results of bioimageio.spec's validation and bioimageio.core's model test of the package at `path`.

    Raises ValueError with the failing checks if either fails.
    """
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # bioimageio.core's default is torch
    import keras
    from bioimageio.core import test_model
    from bioimageio.spec import load_model_description

    path = Path(path).resolve()
    descr = load_model_description(path, format_version="latest")
    validation = descr.validation_summary
    progress_bars = keras.config.is_interactive_logging_enabled()
    keras.config.disable_interactive_logging()  # no progress bar per test prediction
    # bioimageio.core unzips SavedModel weights into the working folder: keep that out of the project.
    try:
        with tempfile.TemporaryDirectory(prefix="bioimageio-test-") as tmp, contextlib.chdir(tmp), environment_kept():
            tested = test_model(path)
    finally:
        if progress_bars:
            keras.config.enable_interactive_logging()
    for summary in (validation, tested):
        if summary.status not in ("passed", "valid-format"):  # valid-format: validated, no test run
            failed = [f"{d.name}: {e.msg}" for d in summary.details for e in d.errors]
            raise ValueError(f"{path}: {summary.name} {summary.status}: " + "; ".join(failed[:5]))
    reproduced = [d.name for d in tested.details if d.name.startswith("Reproduce test outputs")]
    return {"validation": validation.status, "model_test": tested.status,
            "weight_formats_tested": sorted(name[name.rfind("(") + 1 : -1] for name in reproduced)}


def write_package(model, model_path: Path, page: np.ndarray, reference: np.ndarray, dest: Path) -> Path:
    """Write the bioimage.io package (zip) of `model` to `dest`, with `page` and `reference` as its test tensors."""
    import tifffile
    from bioimageio.spec import save_bioimageio_package
    from PIL import Image

    card = cards.model_card(model_path) or None
    with tempfile.TemporaryDirectory(prefix="bioimageio-") as tmp:
        folder = Path(tmp)
        parts = {"keras": folder / "weights.keras", "onnx": write_onnx(model, folder / "weights.onnx"),
                 "test_input": folder / "test_input.npy", "test_output": folder / "test_output.npy"}
        model.save(parts["keras"])
        saved = write_savedmodel(model, folder / "savedmodel")
        parts["savedmodel"] = Path(shutil.make_archive(str(folder / "weights-savedmodel"), "zip", saved))
        np.save(parts["test_input"], (page if page.ndim == 3 else page[..., np.newaxis])[np.newaxis])
        np.save(parts["test_output"], reference)
        parts["sample_input"], parts["sample_output"] = folder / "sample_input.png", folder / "sample_output.tif"
        middle = page if page.ndim == 2 else page[..., page.shape[2] // 2]  # the page itself, not a neighbour
        Image.fromarray(middle).save(parts["sample_input"])  # images for people and viewers; the tests use the .npy
        io = cards.model_io(model_path, model)
        cells = io.cell_map(reference[0], raw=True)
        tifffile.imwrite(parts["sample_output"], cells)  # a picture for people: the cell map
        parts["cover"] = _cover(middle, cells, folder / "cover.png")
        parts["documentation"] = _documentation(model_path, card, folder / "README.md", io)
        save_bioimageio_package(model_description(model, parts, io), output_path=dest)
    return dest

def export_model(
    model_path: str | Path | None = None,
    fmt: str = "bioimageio",
    out: str | Path | None = None,
    test_image: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> dict:
    """Export a .keras model (default the shipped one) as `fmt` to `out` and check it; return what was done.

    `fmt` is one of FORMATS. The test page (page 0 of `test_image`, default
    the ISBI test-volume.tif) is the package's test input and the page the
    export is compared on. Every input is checked before anything is written.
    Returns {"format", "path", "size_mb", "largest_difference"} (the largest
    |difference| of probabilities between the export and the Keras model on
    the test page) and, for a package, its checks' results.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model_path = runtimes.resolve_model(model_path, kinds=("keras",))
    out = Path(out) if out is not None else default_out(model_path, fmt)
    suffix = {"bioimageio": ".zip", "keras": ".keras", "onnx": ".onnx"}.get(fmt)
    if suffix and out.suffix.lower() != suffix:
        raise ValueError(f"{out}: the {fmt} export is one {suffix} file; give a name ending in {suffix}")
    check_writable(out, fmt)
    # Portable exports compute in float32, the normalisation folded into the convolutions.
    model = inference_model(load_model(model_path), float32=True)
    page, name = read_test_page(test_image, data_dir, runtimes.input_sections(model))
    check_test_page(page, model, name)
    x = _with_batch(page)
    reference = np.asarray(model.predict_on_batch(x), dtype=np.float32)
    writer = {"bioimageio": partial(write_package, model, model_path, page, reference),
              "keras": model.save, "onnx": partial(write_onnx, model), "savedmodel": partial(write_savedmodel, model)}[fmt]
    result = {"format": fmt, "path": str(out)}

    def write_checked(part: Path) -> None:
        """Write the export to `part` and check it there, before it takes the name `out`."""
        writer(part)
        if fmt == "bioimageio":
            result.update(check_package(part))
        result["largest_difference"] = largest_difference(part, x, reference)
        _check_close(result["largest_difference"], f"the {fmt} export of {model_path}")

    files.write_atomic(out, write_checked)
    written = [out] if out.is_file() else [f for f in out.rglob("*") if f.is_file()]
    result["size_mb"] = round(sum(f.stat().st_size for f in written) / 2**20, 2)
    return result


def build_parser() -> argparse.ArgumentParser:
    """Return export.py's command line: a run folder to ship, or --format to export a model."""
    parser = cli.parser(__doc__)
    parser.add_argument("run_dir", nargs="?", help="a run folder written by train.py, to ship its best model")
    parser.add_argument("--dest", default=str(DEFAULT_DEST), help="with RUN_DIR: where the shipped model goes")
    parser.add_argument("--data-dir", help="the folder holding the ISBI stacks")
    parser.add_argument("--format", choices=FORMATS, help="export a model for other tools and runtimes")
    parser.add_argument("--model", help=f"with --format: a .keras or compact .npz model "
                                        f"(default {DEFAULT_DEST.relative_to(PROJECT_DIR)})")
    parser.add_argument("--out", help="with --format: the file or folder to write (default dist/<model name>...)")
    parser.add_argument("--test-image", help=f"with --format: a TIFF whose page 0 is the test page (default the "
                                             f"ISBI {data.TEST_FILE})")
    return parser


def run(args: argparse.Namespace) -> None:
    """Ship the run or export the model the parsed command line names; print what was written."""
    if args.format is None and args.run_dir is None:
        raise ValueError("name a run folder to ship, or give --format to export a model")
    if args.format is None:
        card = ship_model(args.run_dir, args.dest, args.data_dir)
        print(f"wrote {args.dest} ({card['size_mb']} MB) and its card; test scores: {card['test_scores']['mean']}")
        return
    if args.run_dir is not None:
        raise ValueError("give either a run folder to ship or --format (with --model), not both")
    result = export_model(args.model, args.format, args.out, args.test_image, args.data_dir)
    checks = (f"; bioimageio.spec validation {result['validation']}, bioimageio.core model test "
              f"{result['model_test']}" if args.format == "bioimageio" else "")
    print(f"wrote {result['path']} ({result['size_mb']} MB); largest |difference| from the Keras model "
          f"on the test page: {result['largest_difference']:.2g}{checks}")


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
