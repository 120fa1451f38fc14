"""ISBI 2012 data and a lab's own pages: find, read and validate them, normalise, split, report.

Knows nothing of models (augmentation lives in augment.py, file helpers in files.py). Everything the
training loop eats comes from here as float32 NHWC arrays in [0, 1]; labels are exactly 0 (membrane)
or 1 (cell).

Command line (data_cli.py): ``python data.py fetch`` finds the stacks or downloads them where they are
looked for (what `make run` does first); ``download``, ``check`` and ``example`` as ``python data.py --help`` says.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np

from files import DataError, check_float_range, read_pages, read_stack, sha256, write_atomic

DATA_ENV = "ISBI_DATA_DIR"
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"
IMAGES_FILE = "train-volume.tif"
LABELS_FILE = "train-labels.tif"
TEST_FILE = "test-volume.tif"
FILES = (IMAGES_FILE, LABELS_FILE, TEST_FILE)
# Public mirror of the challenge files (the challenge site itself is gone); $ISBI_DATA_URL names another.
DOWNLOAD_URL = "https://github.com/alexklibisz/isbi-2012/raw/master/data/"
URL_ENV = "ISBI_DATA_URL"
# SHA-256 of the three files as that mirror serves them: a download that differs is refused.
CHECKSUMS = {
    IMAGES_FILE: "a05df637d576b2387966b7323a34e90e2cdbf86dcaeee86c44d1fd2d616be489",
    LABELS_FILE: "9a9f1056ffd8bac61060b58dc84ad40295c02fc5ff15e68ddfc2f12d211c3dcf",
    TEST_FILE: "046fbb869a953f1ffa63a9722849fe0aa693ad7a21aa9278a2bff2397d00b16f",
}

# The original notebook's split by page index; everything else trains.
VALIDATION_PAGES = (5, 15, 25)
TEST_PAGES = (0, 10, 20)

HOW_TO_GET = (
    f"Put {IMAGES_FILE} and {LABELS_FILE} in the data/ folder of this project, "
    f"or point ${DATA_ENV} at the folder that holds them, "
    "or run `python data.py fetch` to download them."
)


# ---------------------------------------------------------------- finding

def find_data_dir(path: str | os.PathLike | None = None) -> Path:
    """Return the folder holding the ISBI stacks: `path`, else $ISBI_DATA_DIR, else data/."""
    if path is not None:
        candidates = [("the path given", Path(path))]
    elif os.environ.get(DATA_ENV):
        candidates = [(f"${DATA_ENV}", Path(os.environ[DATA_ENV]))]
    else:
        candidates = [("the project's data/ folder", DEFAULT_DATA_DIR)]
    for _, folder in candidates:
        if (folder / IMAGES_FILE).is_file() and (folder / LABELS_FILE).is_file():
            return folder
    where = "; ".join(f"{name}: {folder}" for name, folder in candidates)
    raise DataError(f"ISBI 2012 data not found (looked in {where}). {HOW_TO_GET}")


# ---------------------------------------------------------------- reading

def check_labels(labels: np.ndarray, name: str = "labels") -> None:
    """Raise DataError unless `labels` holds exactly two distinct values."""
    values = np.unique(labels)
    if len(values) != 2:
        shown = ", ".join(str(v) for v in values[:6]) + (" ..." if len(values) > 6 else "")
        raise DataError(
            f"{name}: labels must be two-valued (membrane / cell), "
            f"found {len(values)} distinct values: {shown}"
        )


def load_isbi(data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return the raw (images, labels) stacks, validated, as read from disk (uint8, N x H x W)."""
    folder = find_data_dir(data_dir)
    images = read_stack(folder / IMAGES_FILE)
    check_float_range(images, str(folder / IMAGES_FILE))
    labels = read_stack(folder / LABELS_FILE)
    if images.shape != labels.shape:
        raise DataError(
            f"{folder / IMAGES_FILE} has shape {images.shape} but "
            f"{folder / LABELS_FILE} has shape {labels.shape}; they must match page for page"
        )
    check_labels(labels, str(folder / LABELS_FILE))
    return images, labels


# ---------------------------------------------------------------- normalising

def normalize_images(images: np.ndarray) -> np.ndarray:
    """Return images as float32 in [0, 1]: integers divided by their dtype's maximum."""
    images = np.asarray(images)
    if np.issubdtype(images.dtype, np.integer):
        return (images / np.iinfo(images.dtype).max).astype(np.float32)
    return images.astype(np.float32)


def binarize_labels(labels: np.ndarray) -> np.ndarray:
    """Return labels as float32 {0, 1}: 1 where above the midpoint of the value range (cell)."""
    labels = np.asarray(labels, dtype=np.float32)
    midpoint = (labels.min() + labels.max()) / 2
    return (labels > midpoint).astype(np.float32)


def add_channel(stack: np.ndarray) -> np.ndarray:
    """Return an (N, H, W) stack as (N, H, W, 1)."""
    return stack[..., np.newaxis]


def check_context(context: int) -> int:
    """Return `context` (sections seen at once) after checking that it is a positive odd whole number."""
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 1 or context % 2 == 0:
        raise ValueError(f"context must be an odd number of sections (1, 3, 5, ...), got {context!r}")
    return int(context)


def neighbour_indices(index: int, count: int, context: int) -> list[int]:
    """Return the `context` page indices centred on `index` in a stack of `count` pages, mirrored at its ends
    (page -1 is page 1, page `count` is page `count` - 2), as numpy's 'reflect' padding does."""
    check_context(context)
    if not 0 <= index < count:
        raise IndexError(f"page {index} is not in a stack of {count} page(s)")
    period = max(2 * (count - 1), 1)
    indices = []
    for j in range(index - context // 2, index + context // 2 + 1):
        j %= period
        indices.append(min(j, period - j) if count > 1 else 0)
    return indices


def with_context(pages, context: int = 1):
    """Return the pages of a stack ((N, H, W) array or list of (H, W) pages) as network inputs: unchanged for
    `context` 1, else each (H, W, context) with its neighbours in stack order around it (`neighbour_indices`).
    DataError when the pages differ in size (neighbours must line up)."""
    if check_context(context) == 1:
        return pages
    shapes = {np.shape(page) for page in pages}
    if len(shapes) > 1:
        raise DataError(f"context {context} stacks each page with its neighbours, so all pages must have one "
                        f"size; got {sorted(shapes)}")
    made = [np.stack([np.asarray(pages[j]) for j in neighbour_indices(i, len(pages), context)], axis=-1)
            for i in range(len(pages))]
    return np.stack(made) if isinstance(pages, np.ndarray) else made


# ---------------------------------------------------------------- splitting

def split_indices(n_pages: int = 30) -> dict[str, list[int]]:
    """Return the page indices of the 'train', 'validation' and 'test' parts."""
    held = set(VALIDATION_PAGES) | set(TEST_PAGES)
    if n_pages <= max(held):
        raise DataError(f"the original split needs at least {max(held) + 1} pages, got {n_pages}")
    return {
        "train": [i for i in range(n_pages) if i not in held],
        "validation": list(VALIDATION_PAGES),
        "test": list(TEST_PAGES),
    }


def load_split(data_dir: str | os.PathLike | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return {'train'|'validation'|'test': (images, labels)}, float32 NHWC, normalised."""
    images, labels = load_isbi(data_dir)
    x = add_channel(normalize_images(images))
    y = add_channel(binarize_labels(labels))
    return {part: (x[idx], y[idx]) for part, idx in split_indices(len(x)).items()}


# ---------------------------------------------------------------- augmenting

# ---------------------------------------------------------------- a lab's own data

PICTURE_SUFFIXES = (".tif", ".tiff", ".png")
DEFAULT_VALIDATION_FRACTION = 0.2


def pair_folders(
    images_dir: str | os.PathLike, labels_dir: str | os.PathLike, allow_unpaired: bool = False
) -> list[tuple[Path, Path]]:
    """Return the (image, mask) files of two folders paired by file stem, sorted by stem.

    Every image without a mask and every mask without an image is named in
    one DataError, unless `allow_unpaired`: then each is skipped with a warning.
    """
    def pictures(folder: Path) -> dict[str, Path]:
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder")
        files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES]
        if not files:
            raise DataError(f"{folder}: no image files ({', '.join(PICTURE_SUFFIXES)}) in this folder")
        found = {p.stem: p for p in files}
        if len(found) < len(files):
            shared = sorted(p.name for p in files if found[p.stem] != p)
            raise DataError(f"{folder}: several files share a name apart from the suffix ({', '.join(shared)} ...); "
                            "pairing is by name, keep one of each")
        return found

    images, labels = pictures(Path(images_dir)), pictures(Path(labels_dir))
    lonely = [f"image {images[s].name} has no mask in {labels_dir}" for s in sorted(images.keys() - labels.keys())]
    lonely += [f"mask {labels[s].name} has no image in {images_dir}" for s in sorted(labels.keys() - images.keys())]
    pairs = [(images[s], labels[s]) for s in sorted(images.keys() & labels.keys())]
    if lonely and not (allow_unpaired and pairs):
        hint = "; pass allow_unpaired=True (--allow-unpaired) to skip them" if pairs else ""
        raise DataError(f"{len(lonely)} unpaired file(s): " + "; ".join(lonely) + hint)
    for line in lonely:
        warnings.warn(f"skipping unpaired file: {line}", UserWarning, stacklevel=2)
    return pairs


def read_pairs(images: str | os.PathLike, labels: str | os.PathLike, allow_unpaired: bool = False) -> dict:
    """Return {'images', 'labels': lists of raw (H, W) pages, 'names': one per page} of a TIFF pair or a folder pair."""
    images, labels = Path(images), Path(labels)
    if images.is_dir() != labels.is_dir():
        raise DataError(f"{images} and {labels}: give two files (multipage TIFFs) or two folders, not one of each")
    if images.is_dir():
        files = pair_folders(images, labels, allow_unpaired)
    else:
        files = [(images, labels)]
    result = {"images": [], "labels": [], "names": []}
    for image_file, label_file in files:
        pages, masks = read_pages(image_file), read_pages(label_file)
        if len(pages) != len(masks):
            raise DataError(f"{image_file} has {len(pages)} pages but {label_file} has {len(masks)}")
        for i, (page, mask) in enumerate(zip(pages, masks)):
            if page.shape != mask.shape:
                raise DataError(f"{image_file} page {i} is {page.shape} but its mask {label_file} is {mask.shape}")
        result["images"] += pages
        result["labels"] += masks
        result["names"] += [image_file.name if len(pages) == 1 else f"{image_file.name}[{i}]"
                            for i in range(len(pages))]
    return result


def label_convention(labels: list[np.ndarray], name: str, membrane_value: int | None = None) -> dict:
    """Return {'values', 'membrane_value', 'cell_fraction'} of two-valued masks; DataError says what is wrong.

    The two values may be in any encoding (0/1, 0/255, 0/65535, ...); the
    membrane value is `membrane_value`, by default the lower one (ISBI: 0).
    More than two values are refused with the values listed; with the default,
    membranes as the majority class are refused as inverted polarity, naming
    the setting that reads them the other way.
    """
    values = np.unique(np.concatenate([np.unique(page) for page in labels]))
    if len(values) != 2:
        shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
        raise DataError(f"{name}: masks must hold two values (membrane / cell), found {len(values)}: {shown}; "
                        "masks saved with smoothing or as JPEG gain extra values, save them as PNG or TIFF")
    low, high = (v.item() for v in values)
    membrane = low if membrane_value is None else membrane_value
    if membrane not in (low, high):
        raise DataError(f"{name}: membrane_value {membrane_value} is not one of the mask values {low}, {high}")
    membrane_pixels = sum(int(np.count_nonzero(page == membrane)) for page in labels)
    cell_fraction = 1.0 - membrane_pixels / sum(page.size for page in labels)
    other = high if membrane == low else low
    if cell_fraction < 0.5:
        message = (f"{name}: membranes (value {membrane}) are {100 * (1 - cell_fraction):.0f} % of the pixels, "
                   f"the majority; in EM they are the minority, so the masks look inverted (cells = {membrane})")
        if membrane_value is None:
            raise DataError(f"{message}. If {other} marks membranes, set membrane_value={other} "
                            f"(--membrane-value {other}); to keep this reading, set membrane_value={membrane}")
        warnings.warn(f"{message}; kept, as membrane_value={membrane} was given", UserWarning, stacklevel=2)
    return {"values": [low, high], "membrane_value": membrane, "cell_fraction": cell_fraction}


def parse_split(split: str | None, n_pages: int, seed: int = 0) -> dict[str, list[int]]:
    """Return {'train', 'validation'} page indices: `split` is page indices ('3,7'), a fraction ('0.2', seeded)
    or 'isbi' (the original split, with its 'test' part); None means a fraction of DEFAULT_VALIDATION_FRACTION."""
    if split == "isbi":
        return split_indices(n_pages)
    text = str(DEFAULT_VALIDATION_FRACTION) if split is None else split.strip()
    try:
        if "," in text or text.isdigit():
            validation = sorted({int(part) for part in text.split(",") if part.strip()})
        else:
            fraction = float(text)
            if not 0 < fraction < 1:
                raise ValueError
            count = min(max(1, round(fraction * n_pages)), n_pages - 1)
            validation = sorted(np.random.default_rng(seed).choice(n_pages, count, replace=False).tolist())
    except ValueError:
        raise DataError(f"split {split!r}: give validation page indices (e.g. '3,7'), a fraction between 0 and 1 "
                        "(e.g. '0.2'), 'isbi', or separate validation files") from None
    if not validation or any(not 0 <= i < n_pages for i in validation) or len(validation) == n_pages:
        raise DataError(f"split {split!r} does not leave both training and validation pages among {n_pages} "
                        "page(s); with a single page give separate validation files")
    return {"train": [i for i in range(n_pages) if i not in validation], "validation": validation}


def _fit_page(page: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Return an (H, W) page reflect-padded where smaller than `shape` and centre-cropped where larger."""
    missing = [max(target - size, 0) for size, target in zip(page.shape, shape)]
    if any(missing):
        page = np.pad(page, [(m // 2, m - m // 2) for m in missing] + [(0, 0)] * (page.ndim - 2), mode="reflect")
    top, left = (page.shape[0] - shape[0]) // 2, (page.shape[1] - shape[1]) // 2
    return page[top : top + shape[0], left : left + shape[1]]


def stack_pages(pages: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Return (H, W) or (H, W, C) pages as one (N, *shape, C) float32 array (C = 1 for (H, W) pages), each
    reflect-padded or centre-cropped to `shape`."""
    stack = np.stack([_fit_page(np.asarray(page, dtype=np.float32), shape) for page in pages])
    return add_channel(stack) if stack.ndim == 3 else stack


def part_shapes(train_sizes: list[tuple[int, int]], validation_sizes: list[tuple[int, int]],
                crop: int, multiple: int = 16) -> dict[str, tuple[int, int]]:
    """Return the common page shape of each part, pixels: training pages reach at least `crop` (reflect
    padding) and the largest page; validation pages, seen whole, shrink to the smallest page cut to a
    `multiple` (at least one `multiple`)."""
    train = tuple(max(crop, *(size[axis] for size in train_sizes)) for axis in range(2))
    validation = tuple(max(multiple, min(size[axis] for size in validation_sizes) // multiple * multiple)
                       for axis in range(2))
    return {"train": train, "validation": validation}


def load_pages(
    images: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    val_images: str | os.PathLike | None = None,
    val_labels: str | os.PathLike | None = None,
    split: str | None = None,
    membrane_value: int | None = None,
    allow_unpaired: bool = False,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    context: int = 1,
) -> tuple[dict[str, tuple[list[np.ndarray], list[np.ndarray]]], dict]:
    """Return ({part: (images, labels)}, report): pages as lists of float32 (H, W) arrays, images in [0, 1],
    labels 1 = cell, 0 = membrane, and the data report (`data_report`).

    Without `images` the ISBI stacks (`find_data_dir(data_dir)`) with the
    original split; otherwise `images` and `labels` are two multipage TIFFs or
    two folders of PNG/TIFF pages paired by stem, split by `split`
    (`parse_split`) or by separate `val_images` / `val_labels`. With `context` > 1 each image is
    (H, W, context), its neighbours in its own stack's page order around it (`with_context`), taken before
    the split: a training page may see a held-out page's image, never its label.
    """
    if (images is None) != (labels is None) or (val_images is None) != (val_labels is None):
        raise DataError("give images and labels together (and val_images with val_labels)")
    if images is None:
        if val_images is not None:
            raise DataError("val_images need images and labels to train on")
        folder = find_data_dir(data_dir)
        images, labels, split = folder / IMAGES_FILE, folder / LABELS_FILE, split or "isbi"
    sources = {"train": read_pairs(images, labels, allow_unpaired)}
    if val_images is not None:
        sources["validation"] = read_pairs(val_images, val_labels, allow_unpaired)
        indices = {"train": list(range(len(sources["train"]["images"]))),
                   "validation": list(range(len(sources["validation"]["images"])))}
        split_text = f"validation files {val_images}, {val_labels}"
    else:
        indices = parse_split(split, len(sources["train"]["images"]), seed)
        split_text = split or f"fraction {DEFAULT_VALIDATION_FRACTION} (seed {seed})"
    all_labels = [page for source in sources.values() for page in source["labels"]]
    where = f"{labels}" + (f" and {val_labels}" if val_labels else "")
    convention = label_convention(all_labels, where, membrane_value)
    inputs = {name: with_context([normalize_images(page) for page in source["images"]], context)
              for name, source in sources.items()}
    parts = {}
    for part, idx in indices.items():
        source = sources.get(part, sources["train"])
        parts[part] = ([inputs.get(part, inputs["train"])[i] for i in idx],
                       [(source["labels"][i] != convention["membrane_value"]).astype(np.float32) for i in idx])
    report = data_report(sources, indices, convention, {"images": str(images), "labels": str(labels),
                         "val_images": val_images and str(val_images), "val_labels": val_labels and str(val_labels),
                         "split": split_text})
    return parts, report


def data_report(sources: dict, indices: dict, convention: dict, origin: dict) -> dict:
    """Return the data report: origin, pages, sizes, dtypes, intensity ranges, label values, cell fraction, split."""
    def describe(source: dict, idx: list[int]) -> dict:
        pages = [source["images"][i] for i in idx]
        sizes, dtypes = {}, {}
        for page in pages:
            sizes[f"{page.shape[0]}x{page.shape[1]}"] = sizes.get(f"{page.shape[0]}x{page.shape[1]}", 0) + 1
            dtypes[str(page.dtype)] = dtypes.get(str(page.dtype), 0) + 1
        cells = [np.count_nonzero(source["labels"][i] != convention["membrane_value"]) for i in idx]
        return {
            "pages": len(pages),
            "sizes": sizes,
            "dtypes": dtypes,
            "intensity_range": [min(p.min().item() for p in pages), max(p.max().item() for p in pages)],
            "normalised_range": [float(min(normalize_images(p).min() for p in pages)),
                                 float(max(normalize_images(p).max() for p in pages))],
            "cell_fraction": float(sum(cells) / sum(p.size for p in pages)),
            "names": [source["names"][i] for i in idx],
        }

    return {
        **origin,
        "label_values": convention["values"],
        "membrane_value": convention["membrane_value"],
        "cell_fraction": convention["cell_fraction"],
        "parts": {part: describe(sources.get(part, sources["train"]), idx) for part, idx in indices.items()},
        "split_pages": indices,
    }


def format_report(report: dict) -> str:
    """Return the data report as a few lines of text."""
    lines = [f"data: images {report['images']}, labels {report['labels']}",
             f"  labels: values {report['label_values']}, membrane = {report['membrane_value']}, "
             f"cell fraction {report['cell_fraction']:.3f}",
             f"  split: {report['split']}"]
    for part, info in report["parts"].items():
        names = info["names"]
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        lines.append(
            f"  {part}: {info['pages']} page(s), sizes {info['sizes']}, dtypes {info['dtypes']}, intensities "
            f"{info['intensity_range'][0]}..{info['intensity_range'][1]} (scaled to {info['normalised_range'][0]:.3f}"
            f"..{info['normalised_range'][1]:.3f}), cell fraction {info['cell_fraction']:.3f}: {shown}")
    return "\n".join(lines)


def write_report(report: dict, folder: str | os.PathLike) -> list[Path]:
    """Write the report as data_report.json and data_report.txt in `folder`, atomically; return their paths."""
    folder = Path(folder)
    return [write_atomic(folder / "data_report.json", json.dumps(report, indent=2) + "\n"),
            write_atomic(folder / "data_report.txt", format_report(report) + "\n")]


# ---------------------------------------------------------------- downloading

def _fetch(url: str, name: str, part: Path, checksum: str | None, progress: bool) -> None:
    """Download `url` into the file `part` with a progress bar named `name`; check its SHA-256 (if known)
    and that it is a readable stack. DataError says what went wrong, offline included."""
    from tqdm import tqdm

    try:
        with open(part, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:  # no network, no server, HTTP errors
        reason = getattr(err, "reason", None) or err
        raise DataError(f"cannot download {url} ({reason}); if this machine is offline, copy {', '.join(FILES)} "
                        f"by hand into {part.parent}, or point ${DATA_ENV} at a folder holding them") from err
    if checksum is not None and sha256(part) != checksum:
        raise DataError(f"{url}: the download's SHA-256 is {sha256(part)}, not {checksum}: not the ISBI 2012 file, "
                        "or corrupted on the way; nothing was kept")
    read_stack(part)  # validated before it takes the real name


def download(dest: str | os.PathLike = DEFAULT_DATA_DIR, base_url: str | None = None, files=FILES,
             checksums: dict[str, str] | None = None, progress: bool = True) -> Path:
    """Download the ISBI stacks into `dest` (atomically, checked); return `dest`. Files already there are kept.

    `base_url` defaults to $ISBI_DATA_URL, else DOWNLOAD_URL; the files are
    checked against `checksums` (default: CHECKSUMS for DOWNLOAD_URL, none for
    another mirror, whose files are only checked to be readable stacks).
    """
    base_url = base_url or os.environ.get(URL_ENV) or DOWNLOAD_URL
    if checksums is None:
        checksums = CHECKSUMS if base_url == DOWNLOAD_URL else {}
    dest = Path(dest)
    for name in files:
        if not (dest / name).is_file():
            url = base_url.rstrip("/") + "/" + name
            write_atomic(dest / name, lambda part: _fetch(url, name, part, checksums.get(name), progress))
    if LABELS_FILE in files:
        load_isbi(dest)
    return dest


def ensure_data(data_dir: str | os.PathLike | None = None, progress: bool = True) -> tuple[Path, bool]:
    """Return (the folder holding the ISBI stacks, whether they were downloaded now).

    The stacks are looked for as `find_data_dir` does; when they are missing,
    they are downloaded (`download`) into `data_dir`, else $ISBI_DATA_DIR, else
    the project's data/ folder.
    """
    try:
        return find_data_dir(data_dir), False
    except DataError:
        dest = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR
        return download(dest, progress=progress), True


if __name__ == "__main__":
    # `python data.py ...` runs the command line, data_cli.py, as a script: a leaf never imports a face
    import runpy

    runpy.run_path(str(Path(__file__).with_name("data_cli.py")), run_name="__main__")
