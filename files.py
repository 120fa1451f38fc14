"""Files: the project's one error type for bad input, its one atomic writer, and its image readers.

A leaf: it imports no other module of the project, and nothing of Keras or
TensorFlow. Every file the project writes (TIFFs, PNGs, JSON, models,
exported packages and folders) goes through `write_atomic`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import tifffile

TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIX = ".zarr"

PathLike = str | os.PathLike


def is_zarr(path: PathLike) -> bool:
    """Return whether `path` names a zarr store: it, or a folder above it, ends in .zarr."""
    return any(part.lower().endswith(ZARR_SUFFIX) for part in Path(path).parts)


# Pixels a TIFF may claim beyond 64 times its size (compressed data expand) before it counts as corrupt.
MAX_EXPANSION_BYTES = 1 << 30


class DataError(ValueError):
    """A data or model file is missing or not what the project expects."""


def error_reason(err: BaseException) -> str:
    """Return the first line of a library's error message (at most 200 characters), or its type's name."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


# ---------------------------------------------------------------- writing

def _remove(path: Path) -> None:
    """Remove the file or folder at `path`, if any."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, content) -> Path:
    """Write `content` to `path` through a temporary name in the same folder, renamed into place; return the path.

    `content` is text, bytes, or a function that writes the file (or folder)
    it is given: a temporary path with the same suffix, e.g. `model.save` or
    a writer that also checks what it wrote (raising leaves `path` as it was).
    A kill or an error during the write leaves the previous file (or none) at
    `path`, never half a file. A folder written by `content` replaces a folder
    at `path`. Raises OSError naming `path` when the folder cannot be written.
    """
    path = prepare_output(path, folder_ok=callable(content))
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.part{path.suffix}")
    old = path.with_name(f".{path.stem}.{os.getpid()}.old{path.suffix}")
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        if tmp.is_dir() and path.is_dir():
            os.replace(path, old)  # a folder cannot be renamed over another one
        elif path.is_dir():
            raise IsADirectoryError(f"{path}: cannot write it (it is a folder)")
        os.replace(tmp, path)
    except OSError as err:
        if old.exists() and not path.exists():
            os.replace(old, path)  # the previous folder goes back
        raise OSError(err.errno, f"{path}: cannot write it ({err.strerror or err})") from err
    finally:
        _remove(tmp)
        _remove(old)
    return path


def prepare_output(path: str | os.PathLike, folder_ok: bool = False) -> Path:
    """Return `path` after creating its folder; OSError naming `path` if that folder cannot be made,
    or if `path` is a folder (unless `folder_ok`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"{path}: cannot write it ({err.strerror or err})") from err
    if path.is_dir() and not folder_ok:
        raise IsADirectoryError(f"{path}: cannot write it (it is a folder)")
    return path


def _identities(path: Path) -> set:
    """Return what names the file at `path` whatever the way to it: its resolved path and, if it exists, its
    (device, inode) pair, which a hard link shares."""
    found = {str(path.resolve())}
    try:
        stat = path.stat()
        found.add((stat.st_dev, stat.st_ino))
    except OSError:
        pass  # not there (yet): its resolved path says where it would be
    return found


def refuse_overwriting(outputs, inputs) -> None:
    """Raise DataError if one of `outputs` (paths; None is skipped) is one of `inputs`: the same path once resolved,
    or the same file through a symbolic or hard link. Faces call it before any work, so that no output replaces
    what it is made from."""
    known = {}
    for source in filter(None, inputs):
        known.update(dict.fromkeys(_identities(Path(source)), source))
    for output in filter(None, outputs):
        same = next((known[key] for key in _identities(Path(output)) if key in known), None)
        if same is not None:
            raise DataError(f"{output}: this output would overwrite the input {same}; choose another output name")


def sha256(path: str | os.PathLike) -> str:
    """Return the hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- reading

def _existing_file(path: str | os.PathLike) -> Path:
    """Return `path` as a Path; DataError if it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path


def read_stack(path: str | os.PathLike) -> np.ndarray:
    """Return the grey pages of a TIFF (or its single 2-D page) as an array (pages, height, width)."""
    path = _existing_file(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, photometric = series.axes, series.keyframe.photometric
            if series.nbytes > max(64 * path.stat().st_size, MAX_EXPANSION_BYTES):
                raise DataError(f"{path}: the file claims {series.nbytes:,} bytes of pixels in {path.stat().st_size:,} "
                                "bytes; it is truncated or corrupt")
            stack = series.asarray()
    except DataError:
        raise
    except Exception as err:  # tifffile raises several types for non-TIFF input
        raise DataError(f"{path}: not a readable TIFF file ({error_reason(err)})") from err
    if "S" in axes or "C" in axes or photometric == tifffile.PHOTOMETRIC.PALETTE or stack.ndim not in (2, 3):
        raise DataError(
            f"{path}: expected 2-D grey pages, got an array of shape {stack.shape} (axes {axes}, "
            f"{getattr(photometric, 'name', f'photometric {photometric}')}); colour or multi-channel pages "
            "are not supported, convert to greyscale first"
        )
    stack = stack[np.newaxis] if stack.ndim == 2 else stack
    check_pages(stack, str(path))
    return stack


def check_pages(stack: np.ndarray, name: str) -> None:
    """Raise DataError unless `stack` holds pages of at least one pixel with usable values:
    booleans, unsigned integers, signed integers without negative values, or finite floats."""
    if stack.size == 0:
        raise DataError(f"{name}: no pixels (pages of shape {stack.shape[1:]}, {len(stack)} pages)")
    kind = stack.dtype.kind
    if kind not in "buif":
        raise DataError(f"{name}: pixels of type {stack.dtype} are not supported; save grey integers or floats")
    if kind == "i" and stack.min() < 0:
        raise DataError(f"{name}: negative pixel values (type {stack.dtype}, minimum {stack.min()}); "
                        "save unsigned integers or floats in [0, 1]")
    if kind == "f" and not np.isfinite(stack).all():
        raise DataError(f"{name}: {np.count_nonzero(~np.isfinite(stack)):,} pixels are NaN or infinite")


def check_float_range(images: np.ndarray, name: str) -> None:
    """Raise DataError if float `images` (taken as they are, not scaled) lie outside [0, 1]."""
    if images.dtype.kind == "f" and (images.min() < 0 or images.max() > 1):
        raise DataError(f"{name}: float pixels must lie in [0, 1], found {images.min():g} to {images.max():g}; "
                        "scale them, or save them as 8- or 16-bit integers")



GREY_PIL_MODES = ("1", "L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def read_picture(path: str | os.PathLike) -> np.ndarray:
    """Return the frames of a grey image that PIL reads (PNG, JPEG, BMP, ...) as (frames, H, W) in its dtype."""
    from PIL import Image, ImageSequence

    path = _existing_file(path)
    try:
        with Image.open(path) as image:
            frames = []
            for frame in ImageSequence.Iterator(image):
                if frame.mode not in GREY_PIL_MODES:
                    raise DataError(f"{path}: {frame.mode} image; grey pages are needed, convert it to greyscale "
                                    "first (e.g. PIL's Image.convert('L'))")
                frames.append(np.array(frame))
    except DataError:
        raise
    except Exception as err:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError, bombs)
        raise DataError(f"{path}: not a readable image file ({error_reason(err)})") from err
    if len({frame.shape for frame in frames}) > 1:
        raise DataError(f"{path}: its frames differ in size ({', '.join(str(f.shape) for f in frames[:4])})")
    pages = np.stack(frames)
    if pages.dtype == np.int32 and pages.size and pages.min() >= 0 and pages.max() <= 65535:
        pages = pages.astype(np.uint16)  # PIL opens some 16-bit PNGs as 32-bit integers
    check_pages(pages, str(path))
    return pages


def read_pages(path: str | os.PathLike) -> list[np.ndarray]:
    """Return the grey pages of one image file (multipage TIFF, or a PNG) as a list of (H, W) arrays in its dtype."""
    path = Path(path)
    return list(read_stack(path) if path.suffix.lower() in TIFF_SUFFIXES else read_picture(path))
