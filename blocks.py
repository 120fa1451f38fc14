"""Predict volumes larger than memory, block by block, into a zarr array; optionally on a Dask cluster.

    python predict.py big.zarr                                  # writes big-prediction.zarr beside it
    python predict.py test-volume.tif --out test.zarr --block 512 --workers 2
    python predict.py big.zarr --dask tcp://scheduler:8786      # an existing cluster, see below

The output is cut into blocks of (1, block, block) pixels, one zarr chunk
each. A block is predicted with the tiles of its whole page (see
`tiling.predict_region`), so the result does not depend on the block size.
After a block is written an empty marker `<out>/.done/<page>_<block row>_<block col>` is
written; a rerun skips the blocks that have one, so an interrupted run
resumes where it stopped.

On a cluster of your own, the scheduler and the workers must import this
project's modules and read the model, input and output by the same paths:
e.g. `PYTHONPATH=/path/to/project dask scheduler` and
`PYTHONPATH=/path/to/project dask worker ADDRESS --nthreads 1`. Each worker
loads the model once, on its first block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile
import zarr
from tqdm import tqdm

import cards
import files
import runtimes
import segment
from data import neighbour_indices, normalize_images
from files import PathLike
from tiling import TileSettings, predict_region, to_uint8

DEFAULT_BLOCK = 1024  # pixels; a block and the tiles around it fit easily in memory
DONE_FOLDER = ".done"  # inside the output zarr: one empty file per finished block
SETTINGS_KEY = "prediction"  # the output's attribute holding the settings it was made with

Block = tuple[int, int, int]  # (page, block row, block column)


# ---------------------------------------------------------------- reading

def open_volume(path: PathLike, channels: bool = False) -> zarr.Array:
    """Return the grey pages of a zarr array or TIFF file, read lazily: (pages, H, W), or (H, W) for one page;
    with `channels` also a prediction's (pages, H, W, K) affinities.

    A zarr group holding exactly one array stands for that array; name
    another as `group.zarr/name`. TIFFs are read through tifffile's zarr store.
    """
    path = Path(path)
    if not path.exists():
        raise files.DataError(f"{path}: no such file or folder")
    if path.suffix.lower() in files.TIFF_SUFFIXES:
        try:
            with tifffile.TiffFile(path) as tif:
                axes, photometric = tif.series[0].axes, tif.series[0].keyframe.photometric
            volume = zarr.open(tifffile.imread(path, aszarr=True, series=0, level=0), mode="r")
        except Exception as err:  # tifffile raises several types for non-TIFF input
            raise files.DataError(f"{path}: not a readable TIFF file ({err})") from err
        if "S" in axes or "C" in axes or photometric == tifffile.PHOTOMETRIC.PALETTE:
            raise files.DataError(f"{path}: expected grey pages, got axes {axes} ({photometric.name}); "
                                 "convert colour images to greyscale first")
    elif files.is_zarr(path) or path.is_dir():
        try:
            volume = zarr.open(str(path), mode="r")
        except Exception as err:
            raise files.DataError(f"{path}: not a readable zarr array ({err})") from err
        if isinstance(volume, zarr.Group):
            arrays = dict(volume.arrays())
            if len(arrays) != 1:
                names = ", ".join(sorted(arrays)) or "none"
                raise files.DataError(f"{path}: a zarr group of {len(arrays)} arrays ({names}); "
                                     f"name one, as {path}/<array>")
            volume = next(iter(arrays.values()))
    else:
        raise files.DataError(f"{path}: expected a .zarr array or a TIFF file ({', '.join(files.TIFF_SUFFIXES)})")
    if volume.ndim not in ((2, 3, 4) if channels else (2, 3)) or volume.size == 0 or not np.issubdtype(volume.dtype, np.number):
        raise files.DataError(f"{path}: expected grey pages (pages, height, width) or one (height, width) page "
                             f"of numbers, got shape {volume.shape} of {volume.dtype}")
    return volume


def volume_shape(volume) -> tuple[int, int, int]:
    """Return (pages, height, width) of a 3-D volume, or of a 2-D page as a volume of one page."""
    return (1, *volume.shape) if len(volume.shape) == 2 else tuple(volume.shape)


@dataclasses.dataclass(frozen=True)
class PageView:
    """Page `index` of a (pages, H, W) or (H, W) array; `view[rows, cols]` reads only those pixels. With `sections`
    > 1 the page comes with its neighbours as (H, W, sections), mirrored at the stack's ends (`data.with_context`)."""

    volume: object
    index: int
    sections: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return volume_shape(self.volume)[1:] + ((self.sections,) if self.sections > 1 else ())

    def _read(self, index: int, key: tuple[slice, slice]) -> np.ndarray:
        return np.asarray(self.volume[key] if len(self.volume.shape) == 2 else self.volume[(index, *key)])

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        if self.sections == 1:
            return self._read(self.index, key)
        pages = neighbour_indices(self.index, volume_shape(self.volume)[0], self.sections)
        return np.stack([self._read(page, key) for page in pages], axis=-1)


@dataclasses.dataclass(frozen=True)
class AffinityPage:
    """Page `index` of a prediction zarr's (pages, H, W, K) affinities, float32 in [0, 1] however stored;
    `view[rows, cols]` reads only those pixels (so `segment.mws_cells` reads a large page tile by tile)."""

    volume: object
    index: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.volume.shape[1:])

    @property
    def chunks(self) -> tuple[int, ...] | None:
        """The stored chunks of a page (None when not stored in chunks): how stitch.py reads it, strip by strip."""
        chunks = getattr(self.volume, "chunks", None)
        return tuple(chunks[1:]) if chunks else None

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        return normalize_images(np.asarray(self.volume[(self.index, *key)]))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        page = self[:, :]
        return page if dtype is None else page.astype(dtype)


# ---------------------------------------------------------------- blocks

def block_layout(shape: tuple[int, int, int], block: int) -> list[Block]:
    """Return the indices (page, block row, block column) of the (1, block, block) blocks covering `shape`."""
    pages, height, width = shape
    return [(z, y, x) for z in range(pages) for y in range(math.ceil(height / block))
            for x in range(math.ceil(width / block))]


def _marker(target: Path, index: Block) -> Path:
    return target / DONE_FOLDER / "_".join(map(str, index))


def _difference(saved, wanted: dict) -> tuple[str, object, object] | None:
    """Return (name, saved value, wanted value) of the first of the `wanted` settings that `saved` does not hold
    (a.b for a setting inside another), or None when it holds them all."""
    saved = saved if isinstance(saved, dict) else {}
    for key, value in wanted.items():
        old = saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            inner = _difference(old, value)
            if inner is not None:
                return f"{key}.{inner[0]}", inner[1], inner[2]
        elif old != value:
            return key, old, value
    return None


def open_output(target: PathLike, shape: tuple[int, int, int], settings: dict) -> zarr.Array:
    """Return the output zarr array at `target`: created with chunks of one block, or, when it exists,
    checked to have been made with the same `settings` (ValueError otherwise) for resuming."""
    target = Path(target)
    block, dtype = settings["block"], settings["dtype"]
    if not target.exists():
        out = zarr.create_array(str(target), shape=shape, chunks=(1, block, block, *shape[3:]), dtype=dtype, fill_value=0,
                                attributes={SETTINGS_KEY: settings})
        (target / DONE_FOLDER).mkdir()
        return out
    try:
        out = zarr.open_array(str(target), mode="r+")
        saved = out.attrs[SETTINGS_KEY]
    except Exception as err:
        raise ValueError(f"{target} exists and is not a prediction written by predict.py ({err}); "
                         "choose another output or delete it") from err
    different = _difference(saved, settings)
    if different is not None:
        key, old, value = different
        raise ValueError(f"{target} holds a prediction made with {key}={old!r}, not {value!r}; "
                         "choose another output, or delete it to start afresh")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{target} has shape {out.shape}, the input {shape}; choose another output")
    (target / DONE_FOLDER).mkdir(exist_ok=True)
    return out


def predict_block(model, volume, out: zarr.Array, target: PathLike, index: Block, *, block: int,
                  tiling: TileSettings, io: cards.ModelIO) -> Block:
    """Predict block `index` of `volume` with the model described by `io` (a page with its neighbours for a context
    model; an affinity model's offsets move under TTA), write its cell map into `out` (or its affinities, when
    `out` has their channels) and then its marker beside it; return `index`."""
    z, by, bx = index
    _, height, width = volume_shape(volume)
    rows = (by * block, min((by + 1) * block, height))
    cols = (bx * block, min((bx + 1) * block, width))
    outputs = predict_region(model, PageView(volume, z, io.context), (rows, cols), tiling=tiling, offsets=io.offsets)
    probabilities = outputs if out.ndim == 4 else io.cell_map(outputs)
    out[z, slice(*rows), slice(*cols)] = to_uint8(probabilities) if out.dtype == np.uint8 else probabilities
    _marker(Path(target), index).touch()  # only after the data: an interrupted write leaves no marker
    return index


@functools.lru_cache(maxsize=2)
def cached_model(model_path: str, runtime: str | None = None) -> tuple[object, cards.ModelIO]:
    """Return (the model at `model_path` in the fastest runtime, `runtimes.load_for_prediction`; what it takes and
    gives, `cards.model_io`), loaded once per process (so once per Dask worker)."""
    model = runtimes.load_for_prediction(model_path, runtime)[0]
    return model, cards.model_io(model_path, model)


def _block_task(index: Block, *, model_path: str, runtime: str | None, source: str, target: str,
                settings: dict) -> Block:
    """One Dask task: predict and write one block, opening everything by path; return its index."""
    out = zarr.open_array(target, mode="r+")
    model, io = cached_model(model_path, runtime)
    return predict_block(model, open_volume(source), out, target, index, io=io, **settings)


# ---------------------------------------------------------------- the job

def predict_volume(
    model_path: PathLike,
    source,
    target: PathLike,
    *,
    block: int = DEFAULT_BLOCK,
    tiling: TileSettings = TileSettings(),
    uint8: bool = False,
    affinities: bool = False,
    client=None,
    progress: bool = True,
    on_block: Callable[[Block], None] | None = None,
    runtime: str | None = None,
) -> dict:
    """Predict a volume block by block into the zarr array `target`, skipping blocks already done;
    return {"blocks", "computed", "skipped", "seconds"} (counts of blocks, wall time in seconds).

    Args:
        model_path: any model `runtimes.resolve_model` takes (.keras, .onnx, bioimage.io .zip, SavedModel folder).
        source: a .zarr or TIFF path (`open_volume`), or in-process also a (pages, H, W)
            array-like with numpy slicing. A Dask `client` needs a path its workers can open.
        target: the output .zarr folder: float32 probabilities (an affinity model's cell map), or 0-255 with `uint8`.
            A model that sees neighbouring sections reads each page with them.
        affinities: an affinity model's prediction keeps its K affinities, (pages, H, W, K), for the mutex
            watershed (`segment_volume`), instead of their cell map.
        block: side of the (1, block, block) blocks in pixels, and of the output's chunks.
        tiling: tiles, overlap, batch and TTA, as for `tiling.predict_image`.
        client: a `distributed.Client`; its workers then predict one block per task,
            each loading the model once. None predicts in this process.
        on_block: called with each block's index (page, row, column) once it is written.
        runtime: what runs a .keras model, keras, onnx or auto (`runtimes.load_for_prediction`; None: its default).
    """
    start = time.perf_counter()
    if block < 1:
        raise ValueError(f"block must be a positive number of pixels, got {block}")
    model_path = runtimes.resolve_model(model_path).resolve()
    io = cards.model_io(model_path)
    if affinities and not io.is_affinities:
        raise ValueError(f"{model_path} predicts a membrane map, not affinities")
    from_path = isinstance(source, (str, Path))
    if client is not None and not from_path:
        raise ValueError("a Dask cluster needs the input as a path that its workers can open, not an array")
    volume = open_volume(source) if from_path else source
    shape = _checked_shape(volume, io, model_path)
    target = Path(target).resolve()
    # The model's digest too: a model retrained under the same name must not fill the blocks left.
    settings = {"model": str(model_path), "model_sha256": model_digest(model_path),
                "source": str(Path(source).resolve()) if from_path else None,
                "tile": tiling.tile, "overlap": tiling.overlap, "tta": tiling.tta, "block": block,
                "dtype": "uint8" if uint8 else "float32"}
    if affinities:
        settings["offsets"] = [list(offset) for offset in io.offsets]
    out = open_output(target, (*shape, len(io.offsets)) if affinities else shape, settings)
    blocks = block_layout(shape, block)
    pending = [index for index in blocks if not _marker(target, index).exists()]
    with tqdm(total=len(pending), desc=target.name, unit="block", disable=not progress) as bar:
        for index in _run(pending, volume, out, target, model_path, source, client,
                          dict(block=block, tiling=tiling), runtime):
            bar.update(1)
            if on_block is not None:
                on_block(index)
    return {"blocks": len(blocks), "computed": len(pending), "skipped": len(blocks) - len(pending),
            "seconds": time.perf_counter() - start}


def _checked_shape(volume, io: cards.ModelIO, model_path: Path) -> tuple[int, int, int]:
    """Return the (pages, H, W) of `volume`; ValueError when it is no volume, or a single page for a model that
    sees each page with its neighbours."""
    shape = volume_shape(volume)
    if len(shape) != 3:
        raise ValueError(f"expected a volume (pages, height, width) or one (height, width) page, got shape {shape}")
    if io.context > 1 and shape[0] < 2:
        raise ValueError(f"{model_path} sees each page with its neighbouring sections; a single page has none: "
                         "give the stack")
    return shape


def model_digest(path: PathLike) -> str:
    """Return the hex SHA-256 of a model file, or of a SavedModel folder's files (their paths and contents)."""
    path = Path(path)
    if path.is_file():
        return files.sha256(path)
    digest = hashlib.sha256()
    for part in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{part.relative_to(path).as_posix()}\0{files.sha256(part)}\0".encode())
    return digest.hexdigest()


def made_with(volume) -> dict | None:
    """Return the settings a prediction zarr was made with (`predict_volume`'s, the model's digest among them),
    or None for a volume that does not record them."""
    try:
        saved = volume.attrs.get(SETTINGS_KEY)
    except Exception:  # not a zarr array, or unreadable attributes: nothing recorded
        return None
    return dict(saved) if isinstance(saved, dict) else None


def segment_volume(source: PathLike, target: PathLike, method: str = "multicut",
                   params: segment.SegmentParams | None = None, progress: bool = True) -> dict:
    """Cut each page of a prediction zarr (`predict_volume`'s: cell probabilities, float32 or 0-255; or
    affinities) into cells, page by page, into the uint32 zarr array `target` (chunks of 1 x 1024 x 1024),
    skipping pages already done (a marker per page, as for blocks); return {"pages", "computed", "skipped",
    "seconds"}.

    A cell map is cut whole (`segment.segment`: threshold or multicut), so memory grows with the page, not
    the volume; affinities by the mutex watershed, read tile by tile (`segment.mws_cells`). The cells record
    the settings of the prediction they were cut from (its model's digest among them): cells of an earlier
    prediction, made with another model or other settings, are refused rather than resumed.
    """
    start = time.perf_counter()
    params = segment.SegmentParams() if params is None else params
    volume = open_volume(source, channels=True)
    offsets = (made_with(volume) or {}).get("offsets") if volume.ndim == 4 else None
    if volume.ndim == 4 and not offsets:
        raise ValueError(f"{source} has channels but records no affinity offsets: not a prediction of predict.py")
    allowed = ("mws",) if offsets else ("threshold", "multicut")
    if method not in allowed:
        held = "affinities" if offsets else "cell probabilities"
        raise ValueError(f"a prediction zarr holds {held}: cut it with {' or '.join(allowed)}, not {method!r}")
    shape = volume_shape(volume)[:3]
    target = Path(target).resolve()
    settings = {"source": str(Path(source).resolve()), "prediction": made_with(volume), "method": method,
                "params": params.as_dict(), "block": min(DEFAULT_BLOCK, max(shape[1:])), "dtype": "uint32"}
    out = open_output(target, shape, settings)
    pending = [z for z in range(shape[0]) if not _marker(target, (z,)).exists()]
    for z in tqdm(pending, desc=target.name, unit="page", disable=not progress):
        if offsets:
            out[z] = segment.mws_cells(AffinityPage(volume, z), params, offsets)
        else:
            page = normalize_images(volume[z])  # 0-255 or float32 probabilities: float32 in [0, 1]
            out[z] = segment.segment(page, method, params)
        _marker(target, (z,)).touch()  # only after the data
    return {"pages": shape[0], "computed": len(pending), "skipped": shape[0] - len(pending),
            "seconds": time.perf_counter() - start}


def _run(pending: list[Block], volume, out, target: Path, model_path: Path, source, client,
         settings: dict, runtime: str | None = None) -> Iterator[Block]:
    """Yield the index of each pending block once written: here, or as the Dask tasks complete."""
    if not pending:
        return
    if client is None:
        model, _ = runtimes.load_for_prediction(model_path, runtime)
        io = cards.model_io(model_path, model)
        for index in pending:
            yield predict_block(model, volume, out, target, index, io=io, **settings)
        return
    from distributed import as_completed

    # The settings go as one dict: Client.map has a `batch_size` argument of its own.
    futures = client.map(_block_task, pending, pure=False, model_path=str(model_path), runtime=runtime,
                         source=str(Path(source).resolve()), target=str(target), settings=settings)
    try:
        for future in as_completed(futures):
            yield tuple(future.result())
    finally:
        client.cancel(futures)  # nothing left running after an error or an interruption


@contextlib.contextmanager
def dask_client(workers: int | None = None, address: str | None = None):
    """Yield a `distributed.Client` of a local cluster of `workers` processes, or of the scheduler at
    `address`, or None when neither is given; closes what it opened."""
    if workers is not None and address is not None:
        raise ValueError("give either --workers (a local cluster) or --dask (a running scheduler), not both")
    if workers is None and address is None:
        yield None
        return
    from distributed import Client, LocalCluster

    if address is not None:
        with Client(address) as client:
            yield client
        return
    if workers < 1:
        raise ValueError(f"--workers must be a positive number of processes, got {workers}")
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True) as cluster, Client(cluster) as client:
        yield client
