"""Shared test fixtures and helpers: the real ISBI data when it can be found, small synthetic stacks, the tiny
model and the tiny training run that many modules' tests use."""

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Predictions run in Keras unless a test asks for another runtime (runtimes.load_for_prediction would convert and
# time every tiny model to ONNX first), and nothing is cached in the user's home.
os.environ.setdefault("UNET_ISBI_RUNTIME", "keras")
os.environ["UNET_ISBI_CACHE"] = tempfile.mkdtemp(prefix="unet-isbi-cache-")


def bf16_refused() -> bool:
    """Return True where oneDNN refuses bfloat16 convolutions: capped below its bfloat16 kernels by
    $ONEDNN_MAX_CPU_ISA on a CPU that has bfloat16 instructions, so TensorFlow still hands it bfloat16. That only
    happens when a float32 CPU kind is emulated; such a CPU itself runs bfloat16 slowly, without oneDNN."""
    import hardware

    return hardware.onednn_capped_below_bf16() and any(flag in hardware.cpu_flags() for flag in hardware.BF16_CPU_FLAGS)


TINY_RUN_PRECISION = "float32" if bf16_refused() else "mixed_bfloat16"


def picture(shape, seed=0) -> np.ndarray:
    """Return random uint8 pixels of `shape`."""
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def cell_mask(shape=(40, 48), low=0, high=255, dtype=np.uint8) -> np.ndarray:
    """Return a mask of cells (high) between two-pixel membranes (low) every 16 pixels: about 25 % membrane."""
    mask = np.full(shape, high, dtype)
    for start in range(0, max(shape), 16):
        mask[start : start + 2, :] = low
        mask[:, start : start + 2] = low
    return mask


def write_png(path: Path, array: np.ndarray) -> None:
    """Write `array` as a PNG at `path`, making its folder."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def tiff(path: Path, array: np.ndarray, **kwargs) -> Path:
    """Write `array` as a grey TIFF at `path` (tifffile keywords pass through); return the path."""
    import tifffile

    tifffile.imwrite(path, array, photometric=kwargs.pop("photometric", "minisblack"), **kwargs)
    return path


def png_bytes(array: np.ndarray) -> bytes:
    """Return `array` encoded as a PNG file."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(autouse=True)
def seeded():
    """Seed Python, numpy and TensorFlow before every test: results do not depend on which tests ran before
    in the same worker process (pytest-xdist spreads the files over several)."""
    import keras

    keras.utils.set_random_seed(0)


@pytest.fixture(scope="session")
def isbi_dir():
    """Return the folder of the real ISBI stacks, or skip the test saying how to get them."""
    import data
    import files

    try:
        return data.find_data_dir()
    except files.DataError as err:
        pytest.skip(f"real data needed: {err}")


@pytest.fixture
def synthetic_stacks():
    """Return (images uint8, labels uint8 {0,255}) stacks of 4 pages 64x64 with a cell pattern."""
    rng = np.random.default_rng(0)
    labels = np.full((4, 64, 64), 255, np.uint8)
    labels[:, ::16, :] = 0
    labels[:, :, ::16] = 0
    images = (labels * 0.7 + rng.integers(0, 60, labels.shape)).astype(np.uint8)
    return images, labels


def _saved_unet(tmp_path_factory, name: str, sections: int) -> Path:
    """Save an untrained float32 U-Net of 2 filters that takes `sections` input channels; return its path."""
    import keras

    from model import build_unet

    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("model") / name
    build_unet((None, None, sections), filters=2).save(path)
    return path


@pytest.fixture(scope="session")
def unet_path(tmp_path_factory):
    """Return the path of the tests' tiny model: an untrained float32 U-Net of 2 filters (any input size)."""
    return _saved_unet(tmp_path_factory, "tiny.keras", 1)


@pytest.fixture(scope="session")
def context_unet_path(tmp_path_factory):
    """Return the path of an untrained float32 U-Net of 2 filters that sees 3 sections (a page and its neighbours)."""
    return _saved_unet(tmp_path_factory, "context3.keras", 3)


@pytest.fixture(scope="session")
def unet(unet_path):
    """Return the tiny model of `unet_path`, loaded for inference."""
    import runtimes

    return runtimes.load_model(unet_path)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, isbi_dir):
    """Train the 'tiny' preset for 2 epochs in mixed bfloat16 (float32 where oneDNN refuses it), once for the session;
    return train()'s result."""
    import train

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    return train.train(train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(run_dir), epochs=2,
                                    precision=TINY_RUN_PRECISION))


@pytest.fixture
def not_models(tmp_path):
    """Return two files named .keras that are not models: text, and a zip without a model in it."""
    import zipfile

    text = tmp_path / "notes.keras"
    text.write_text("these are not weights")
    zipped = tmp_path / "empty.keras"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("readme.txt", "no model here")
    return [text, zipped]
