"""Bring your own data: pairing, label conventions, splits, page sizes, portable models, uniform-prediction warnings,
and the README's worked example."""

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import data
import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "--crop", "256", "--epochs", "1", "--steps-per-epoch", "2"]


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def cell_mask(shape=(40, 48), low=0, high=255, dtype=np.uint8) -> np.ndarray:
    """Return a mask of cells (high) between two-pixel membranes (low) every 16 pixels: about 25 % membrane."""
    mask = np.full(shape, high, dtype)
    for start in range(0, max(shape), 16):
        mask[start : start + 2, :] = low
        mask[:, start : start + 2] = low
    return mask


# ---------------------------------------------------------------- pairing, labels, splits

def test_folder_pairing_names_every_unpaired_file_and_stops_unless_allowed(tmp_path, capsys):
    for stem in ("a", "b", "lonely_image"):
        write_png(tmp_path / "images" / f"{stem}.png", np.zeros((8, 8), np.uint8))
    for stem in ("a", "b", "lonely_mask"):
        write_png(tmp_path / "masks" / f"{stem}.png", cell_mask((8, 8)))
    with pytest.raises(data.DataError) as err:
        data.pair_folders(tmp_path / "images", tmp_path / "masks")
    assert "lonely_image.png" in str(err.value) and "lonely_mask.png" in str(err.value)
    assert "allow_unpaired" in str(err.value)
    pairs = data.pair_folders(tmp_path / "images", tmp_path / "masks", allow_unpaired=True)
    assert [(image.name, mask.name) for image, mask in pairs] == [("a.png", "a.png"), ("b.png", "b.png")]
    out = capsys.readouterr().out
    assert "lonely_image.png" in out and "lonely_mask.png" in out
    tifffile.imwrite(tmp_path / "masks" / "a.tif", cell_mask((8, 8)))
    with pytest.raises(data.DataError, match="share a name"):
        data.pair_folders(tmp_path / "images", tmp_path / "masks")


def test_sixteen_bit_pages_are_normalised_and_reported(tmp_path):
    rng = np.random.default_rng(0)
    pages = rng.integers(0, 65536, (3, 40, 48), dtype=np.uint16)
    write_png(tmp_path / "images" / "p0.png", pages[0])  # a 16-bit PNG
    tifffile.imwrite(tmp_path / "images" / "p1.tif", pages[1])
    tifffile.imwrite(tmp_path / "images" / "p2.tiff", pages[2])
    (tmp_path / "masks").mkdir()
    for i in range(3):
        tifffile.imwrite(tmp_path / "masks" / f"p{i}.tif", cell_mask(low=0, high=65535, dtype=np.uint16))
    parts, report = data.load_pages(tmp_path / "images", tmp_path / "masks", split="2")
    train_images, train_labels = parts["train"]
    np.testing.assert_allclose(train_images[0], pages[0] / 65535, rtol=1e-6)
    np.testing.assert_allclose(parts["validation"][0][0], pages[2] / 65535, rtol=1e-6)
    assert set(np.unique(np.concatenate([label.ravel() for label in train_labels]))) == {0.0, 1.0}
    assert report["label_values"] == [0, 65535] and report["membrane_value"] == 0
    assert report["parts"]["train"]["dtypes"] == {"uint16": 2}
    assert report["parts"]["validation"]["names"] == ["p2.tiff"]


def test_inverted_labels_are_detected_with_the_setting_that_fixes_them(tmp_path):
    inverted = 1 - cell_mask(low=0, high=1)  # membranes as the majority class, 0/1 encoding
    tifffile.imwrite(tmp_path / "images.tif", np.zeros((2, *inverted.shape), np.uint8))
    tifffile.imwrite(tmp_path / "labels.tif", np.stack([inverted, inverted]))
    with pytest.raises(data.DataError, match=r"inverted.*--membrane-value 1"):
        data.load_pages(tmp_path / "images.tif", tmp_path / "labels.tif", split="1")
    parts, report = data.load_pages(tmp_path / "images.tif", tmp_path / "labels.tif", split="1", membrane_value=1)
    assert report["cell_fraction"] > 0.5
    np.testing.assert_array_equal(parts["train"][1][0], inverted == 0)


def test_three_valued_labels_are_refused_with_the_values_listed(tmp_path):
    labels = cell_mask()
    labels[:4, :4] = 128
    tifffile.imwrite(tmp_path / "images.tif", np.zeros((2, *labels.shape), np.uint8))
    tifffile.imwrite(tmp_path / "labels.tif", np.stack([labels, labels]))
    with pytest.raises(data.DataError, match=r"labels.tif: masks must hold two values.* found 3: 0, 128, 255"):
        data.load_pages(tmp_path / "images.tif", tmp_path / "labels.tif", split="0")


def test_splits_by_indices_fraction_or_validation_files(tmp_path):
    assert data.parse_split("3,7", 10) == {"train": [0, 1, 2, 4, 5, 6, 8, 9], "validation": [3, 7]}
    by_fraction = data.parse_split("0.3", 10, seed=1)
    assert len(by_fraction["validation"]) == 3 and by_fraction == data.parse_split("0.3", 10, seed=1)
    assert sorted(by_fraction["train"] + by_fraction["validation"]) == list(range(10))
    for bad in ("12", "1.5", "everything"):
        with pytest.raises(data.DataError, match="split"):
            data.parse_split(bad, 10)
    stack = np.zeros((2, 32, 32), np.uint8)
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}-images.tif", stack)
        tifffile.imwrite(tmp_path / f"{name}-labels.tif", np.stack([cell_mask((32, 32))] * 2))
    parts, report = data.load_pages(tmp_path / "a-images.tif", tmp_path / "a-labels.tif",
                                    tmp_path / "b-images.tif", tmp_path / "b-labels.tif")
    assert [len(parts[p][0]) for p in ("train", "validation")] == [2, 2]
    assert "validation files" in report["split"]


def test_the_isbi_data_load_as_before_by_default(isbi_dir):
    split, report = train.load_data(train.preset("tiny", data_dir=str(isbi_dir)))
    before = data.load_split(isbi_dir)
    for part in ("train", "validation", "test"):
        for new, old in zip(split[part], before[part]):
            np.testing.assert_array_equal(new, old)
    assert report["split"] == "isbi" and report["split_pages"]["validation"] == list(data.VALIDATION_PAGES)


def test_pages_are_padded_up_to_the_crop_and_validation_cut_to_sixteens():
    shapes = data.part_shapes([(700, 900), (100, 120)], [(700, 900), (650, 910)], crop=256)
    assert shapes == {"train": (700, 900), "validation": (640, 896)}
    small = data.part_shapes([(100, 120)], [(20, 30)], crop=256)
    assert small == {"train": (256, 256), "validation": (16, 16)}
    page = np.arange(100 * 120, dtype=np.float32).reshape(100, 120)
    padded = data.stack_pages([page], (256, 256))[0, ..., 0]
    assert padded.shape == (256, 256)
    np.testing.assert_array_equal(padded[78:178, 68:188], page)  # the page in the middle, mirrored around it


def test_train_settings_for_own_data_parse_from_the_command_line():
    settings = train.parse_args(["--preset", "tiny", "--images", "im", "--labels", "lab", "--val-images", "vi",
                                 "--val-labels", "vl", "--split", "0.25", "--membrane-value", "255",
                                 "--allow-unpaired", "--crop", "128"])
    assert (settings.images, settings.labels, settings.val_images, settings.val_labels) == ("im", "lab", "vi", "vl")
    assert settings.split == "0.25" and settings.membrane_value == 255 and settings.allow_unpaired is True
    assert settings.crop == 128
    defaults = train.parse_args(["--preset", "cpu"])
    assert defaults.images is None and defaults.membrane_value is None and defaults.allow_unpaired is False


# ---------------------------------------------------------------- the README's worked example

def readme_commands() -> list[list[str]]:
    """Return the commands of the first code block of the README's 'Your own data' section."""
    section = (ROOT / "README.md").read_text().split("## Your own data", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.split("#", 1)[0].strip()]


@pytest.fixture(scope="module")
def example(tmp_path_factory, isbi_dir):
    """Run the README example (train.py with the tiny preset, 256x256 crops) in a fresh folder; return the folder."""
    folder = tmp_path_factory.mktemp("own_data")
    old = os.getcwd()
    os.chdir(folder)
    try:
        for command in readme_commands():
            assert command[0] == "python", command
            module = importlib.import_module(Path(command[1]).stem)
            args = command[2:] + (TINY if command[1] == "train.py" else [])
            assert module.main(args) == 0, command
    finally:
        os.chdir(old)
    return folder


def test_readme_example_trains_on_700x900_pages_with_256_crops_and_predicts(example):
    report = json.loads((example / "runs" / "my_data" / "data_report.json").read_text())
    assert report["parts"]["train"]["sizes"] == {"700x900": 5}
    assert report["network_input"] == {"train": [700, 900], "validation": [688, 896]}
    assert (example / "runs" / "my_data" / "data_report.txt").read_text().startswith("data: images my_data/images")
    settings = train.preset("tiny", images=str(example / "my_data" / "images"),
                            labels=str(example / "my_data" / "masks"), split="0.2", crop=256)
    split, _ = train.load_data(settings)
    x, y = train.training_batches(settings, split)[0]
    assert x.shape == y.shape == (settings.batch_size, 256, 256, 1)
    logs = json.loads((example / "runs" / "my_data" / "summary.json").read_text())["final_logs"]
    assert {"membrane_dice", "membrane_iou", "val_membrane_dice", "val_membrane_iou", "val_uniform"} <= set(logs)
    probabilities = tifffile.imread(example / "my_data" / "predicted" / "page-05-prediction.tif")
    assert probabilities.shape == (700, 900) and probabilities.dtype == np.float32
    mask_tiff = tifffile.imread(example / "my_data" / "predicted" / "page-05-prediction-mask.tif")
    mask_png = np.array(Image.open(example / "my_data" / "predicted" / "page-05-prediction.png"))
    np.testing.assert_array_equal(mask_tiff, np.where(probabilities > 0.5, 255, 0))
    np.testing.assert_array_equal(mask_png, mask_tiff)


def run_python(code: str, cwd: Path, pythonpath: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_saved_models_with_the_project_metrics_load_with_plain_load_model_in_a_fresh_process(example, tmp_path):
    run = example / "runs" / "my_data"
    # best.keras: in a process that never imports the project (its folder is not even on the path).
    fresh = run_python(
        "import keras, numpy as np\n"
        f"m = keras.models.load_model({str(run / 'best.keras')!r})\n"
        "print(m.predict(np.zeros((1, 64, 64, 1), 'float32'), verbose=0).shape)\n",
        tmp_path, None)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "(1, 64, 64, 1)" in fresh.stdout
    # last.keras, compiled with the custom loss and metrics: plain load_model, safe_mode on, once they are imported.
    compiled = run_python(
        "import keras, train\n"
        f"m = keras.models.load_model({str(run / 'last.keras')!r}, safe_mode=True)\n"
        "print(m.compiled, m.get_compile_config()['metrics'])\n",
        tmp_path, str(ROOT))
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    assert compiled.stdout.startswith("True") and "MembraneDice" in compiled.stdout and "BinaryIoU" in compiled.stdout


# ---------------------------------------------------------------- uniform-prediction warnings

@pytest.fixture(scope="module")
def validation_pages(isbi_dir):
    return data.load_split(isbi_dir)["validation"]


def test_uniform_prediction_warning_fires_on_a_constant_model(validation_pages, capsys):
    import keras
    from callbacks import UniformPredictionWarning

    inputs = keras.Input((None, None, 1))
    constant = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer="zeros",
                                   bias_initializer=keras.initializers.Constant(3.0))(inputs)
    warning = UniformPredictionWarning(validation_pages[0])
    warning.set_model(keras.Model(inputs, constant))
    logs = {}
    warning.on_epoch_end(0, logs)
    err = capsys.readouterr().err
    assert "uniform" in err and "normalis" in err.replace("normalize", "normalis") and "polarity" in err
    assert "too little training" in err
    assert logs["val_uniform"] == 1.0


def test_uniform_prediction_warning_stays_silent_on_a_trained_model(validation_pages, capsys):
    import predict
    from callbacks import UniformPredictionWarning

    shipped = train.load_model(predict.DEFAULT_MODEL, precision="auto")
    warning = UniformPredictionWarning(validation_pages[0])
    warning.set_model(shipped)
    logs = {}
    warning.on_epoch_end(0, logs)
    assert "uniform" not in capsys.readouterr().err
    assert logs["val_uniform"] == 0.0
    probabilities = predict.predict_stack(shipped, validation_pages[0][:1, ..., 0], tile=512, progress=False)
    assert predict.warn_if_uniform("page 5", probabilities) is None
    assert "too little training" in predict.warn_if_uniform("constant", np.full_like(probabilities, 0.93))


def test_masks_grid_shows_each_page_with_its_predicted_mask_and_membrane_dice():
    import figures

    label = cell_mask(low=0, high=1).astype(np.float32)
    figure = figures.masks_grid(label[None], label[None], (1.0 - label)[None], titles=["inverted"])
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["image", "mask", "predicted mask, membrane Dice 0.000"]
