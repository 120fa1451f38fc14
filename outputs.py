"""What predicting an image writes, and where: the probabilities' TIFF, 0/255 masks, the cells, their picture
and boundary map (`OutputSettings` says which), each beside the prediction and written atomically."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tifffile

import files
import scores
import segment
from files import PathLike
from tiling import to_uint8

PREDICTION_SUFFIX = "-prediction"
CELLS_SUFFIX = "-cells"


def write_prediction(path: PathLike, probabilities: np.ndarray, uint8: bool = False) -> Path:
    """Write (H, W) or (pages, H, W) probabilities to a multipage TIFF atomically; return its path.

    float32 by default; with `uint8`, rounded to 0-255 (a quarter of the size).
    """
    path = Path(path)
    pages = np.asarray(probabilities, dtype=np.float32)
    if pages.ndim not in (2, 3):
        raise ValueError(f"expected (height, width) or (pages, height, width) probabilities, got shape {pages.shape}")
    if uint8:
        pages = to_uint8(pages)
    # A fresh name in the same folder, created by tifffile (so with the usual permissions), renamed into place.
    return files.write_atomic(path, lambda part: tifffile.imwrite(part, pages, photometric="minisblack"))


def write_masks(target: PathLike, probabilities: np.ndarray, threshold: float = 0.5) -> list[Path]:
    """Write each page's mask (255 = cell where probability > threshold, 0 = membrane) as a PNG
    beside `target` (name-N.png for several pages); return the paths."""
    from PIL import Image

    paths = []
    for path, page in zip(mask_paths(target, len(probabilities)), probabilities):
        mask = Image.fromarray(np.where(page > threshold, 255, 0).astype(np.uint8))
        paths.append(files.write_atomic(path, lambda part: mask.save(part, format="PNG")))
    return paths


def mask_paths(target: PathLike, pages: int) -> list[Path]:
    """Return the PNG masks' paths of a prediction of `pages` pages to `target`: name.png, or name-N.png for several."""
    target = Path(target)
    return [target.with_name(f"{target.stem}{f'-{i}' if pages > 1 else ''}.png") for i in range(pages)]


def _mask_tiff_path(target: PathLike) -> Path:
    """Return `<target stem>-mask.tif` beside `target`."""
    target = Path(target)
    return target.with_name(f"{target.stem}-mask.tif")


def write_mask_tiff(target: PathLike, probabilities: np.ndarray, threshold: float = 0.5) -> Path:
    """Write the pages' masks (255 = cell where probability > threshold, 0 = membrane) as one uint8 TIFF
    `<target stem>-mask.tif` beside `target`, atomically; return its path."""
    path = _mask_tiff_path(target)
    pages = np.where(np.asarray(probabilities) > threshold, 255, 0).astype(np.uint8)
    return files.write_atomic(path, lambda part: tifffile.imwrite(part, pages, photometric="minisblack"))


def cells_path(target: PathLike, ending: str) -> Path:
    """Return `<target stem minus -prediction>-cells<ending>` beside `target`."""
    target = Path(target)
    return target.with_name(f"{target.stem.removesuffix(PREDICTION_SUFFIX)}{CELLS_SUFFIX}{ending}")


def _write_pages(path: Path, pages: np.ndarray) -> Path:
    """Write (pages, H, W) as a grey TIFF (one page: 2-D) at `path`, atomically; return the path."""
    pages = pages if len(pages) > 1 else pages[0]
    return files.write_atomic(path, lambda part: tifffile.imwrite(part, pages, photometric="minisblack"))


def write_cells(target: PathLike, cells: np.ndarray) -> Path:
    """Write (pages, H, W) cell labels as a uint32 TIFF `<stem>-cells.tif` beside `target`; return its path."""
    return _write_pages(cells_path(target, ".tif"), np.asarray(cells, dtype=np.uint32))


def write_cell_boundaries(target: PathLike, cells: np.ndarray) -> Path:
    """Write the cells' boundary map, float32 1 = cell and 0 = a boundary between cells (`scores.label_boundaries`),
    as `<stem>-cells-boundaries.tif` beside `target`: a challenge submission made of the cells; return its path."""
    pages = np.stack([~scores.label_boundaries(page) for page in np.asarray(cells)]).astype(np.float32)
    return _write_pages(cells_path(target, "-boundaries.tif"), pages)


def write_overlay(target: PathLike, image: np.ndarray, cells: np.ndarray) -> Path:
    """Write a PNG of the cells in random colours over the grey `image` (one page) as `<stem>-cells.png`
    beside `target`; return its path."""
    from PIL import Image

    picture = Image.fromarray(segment.overlay(image, cells))
    return files.write_atomic(cells_path(target, ".png"), lambda part: picture.save(part, format="PNG"))


@dataclasses.dataclass(frozen=True)
class OutputSettings:
    """What predicting an image writes: its probabilities (float32, or 0-255 with `uint8`), 0/255 masks (`png` per
    page, one `mask_tiff`), and with `cells` the cells (by `method`, default the model card's), their `overlay`
    picture and their `boundaries` map; checked on creation."""

    uint8: bool = False
    png: bool = False
    mask_tiff: bool = False
    cells: bool = False
    method: str | None = None
    overlay: bool = False
    boundaries: bool = False

    def __post_init__(self):
        if self.method is not None and self.method not in segment.METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(segment.METHODS)}")
        if (self.overlay or self.boundaries) and not self.cells:
            raise ValueError("--overlay and --cell-boundaries draw the cells: add --cells")

    def paths(self, target: Path, pages: int) -> list[Path]:
        """Return every file that predicting `pages` pages to `target` writes with these settings."""
        chosen = [target, *(mask_paths(target, pages) if self.png else []),
                  *([_mask_tiff_path(target)] if self.mask_tiff else [])]
        endings = [ending for ending, wanted in ((".tif", self.cells), (".png", self.overlay),
                                                 ("-boundaries.tif", self.boundaries)) if wanted]
        return chosen + [cells_path(target, ending) for ending in endings]


def output_path(input_path: PathLike, out: PathLike | None = None, suffix: str = ".tif") -> Path:
    """Return where the prediction of `input_path` goes: `<stem>-prediction<suffix>` beside it, or in folder `out`."""
    input_path = Path(input_path)
    name = input_path.stem + PREDICTION_SUFFIX + suffix
    return (Path(out) if out is not None else input_path.parent) / name
