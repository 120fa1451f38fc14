"""A large page cut tile by tile, several tiles at a time in threads, and the tiles stitched into one
segmentation by elf's multicut on the segments' overlaps in the halos (`stitched`).

The tiles are elf's own (bioimage-cpp's `Blocking`): elf's `stitch_segmentation` asks for them one by one, in
order, and gets each from a pool of threads that is already cutting the next ones (the mutex watershed
releases the GIL). The page is read in order, in whole strips of rows (`_Strips`), so that each stored chunk of
a zarr array is decoded once rather than once for every tile and halo that touches it; each tile's inner part
of a per-pixel map is kept as it goes.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class _Boxes:
    """What elf's stitching reads its tiles from, standing in for the page: each tile is its bounding box, so
    that `_TilesAhead` reads it (in order) and cuts it in a worker thread instead."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __getitem__(self, box):
        return box


class _Strips:
    """The rows of a page read in strips of `rows` (a zarr array's chunk height), each strip once, and kept only
    while the tiles still to come need them: tiles must be asked for in order, top to bottom."""

    def __init__(self, page, rows: int):
        self.page, self.rows, self.kept = page, rows, {}  # a strip's first row -> (first row kept, those rows)

    def __getitem__(self, box) -> np.ndarray:
        rows, cols = box
        for top, (first, kept) in list(self.kept.items()):
            if first + len(kept) <= rows.start:  # no tile from here on reaches up into it
                del self.kept[top]
            elif first < rows.start:
                self.kept[top] = (rows.start, kept[rows.start - first :].copy())
        parts = []
        for top in range(rows.start - rows.start % self.rows, rows.stop, self.rows):
            if top not in self.kept:
                self.kept[top] = (top, np.asarray(self.page[top : top + self.rows], dtype=np.float32))
            first, kept = self.kept[top]
            parts.append(kept[max(rows.start - first, 0) : rows.stop - first, cols])
        return np.concatenate(parts)


def _reader(page, tile: int):
    """Return what tiles are read from: the page itself when it is in memory, else `_Strips` of its chunk rows
    (at most `tile` rows, so that a page stored as one chunk is not held whole)."""
    if isinstance(page, np.ndarray):
        return page
    rows = (getattr(page, "chunks", None) or (tile,))[0]
    rows = max(rows) if isinstance(rows, tuple) else rows  # a dask array's chunks are tuples
    return _Strips(page, min(int(rows), tile))


class _TilesAhead:
    """elf's tile function: called with tile `block_id`'s box, it returns that tile's segments, cut in a thread
    with the next `workers` tiles. The tiles are read here, in order; each also fills its inner part of `per_pixel`."""

    def __init__(self, page, cut, per_pixel_of, blocking, halo: int, workers: int, tile: int):
        self.reader, self.cut, self.per_pixel_of = _reader(page, tile), cut, per_pixel_of
        self.blocking, self.halo, self.workers = blocking, halo, workers
        self.per_pixel = np.empty(page.shape[:2], np.float32)
        self.pool, self.pending = ThreadPoolExecutor(workers), {}

    def _cut(self, values: np.ndarray, inner: tuple, local: tuple) -> np.ndarray:
        self.per_pixel[inner] = self.per_pixel_of(values)[local]
        return self.cut(values)

    def _submit(self, block_id: int):
        block = self.blocking.get_block_with_halo(block_id, [self.halo, self.halo])
        outer, inner, local = (tuple(slice(begin, end) for begin, end in zip(box.begin, box.end))
                               for box in (block.outer_block, block.inner_block, block.inner_block_local))
        return self.pool.submit(self._cut, np.asarray(self.reader[outer], dtype=np.float32), inner, local)

    def __call__(self, _box, block_id: int) -> np.ndarray:
        for ahead in range(block_id, min(block_id + self.workers + 1, self.blocking.number_of_blocks)):
            if ahead not in self.pending:
                self.pending[ahead] = self._submit(ahead)
        return self.pending.pop(block_id).result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def stitched(page, cut: Callable[[np.ndarray], np.ndarray], per_pixel_of: Callable[[np.ndarray], np.ndarray],
             tile: int, halo: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ((H, W) uint64 segments, (H, W) float32 per-pixel map) of an (H, W, ...) page (any array with numpy
    slicing: a zarr array is read tile by tile): `cut` gives each tile's uint64 segments and `per_pixel_of` its
    (h, w) map, on the tile with `halo` pixels around it; segments that overlap in the halos are joined."""
    import bioimage_cpp
    from elf.segmentation import stitching

    shape = tuple(page.shape[:2])
    blocking = bioimage_cpp.utils.Blocking([0, 0], list(shape), [tile, tile])  # elf's own tiling of the page
    tiles = _TilesAhead(page, cut, per_pixel_of, blocking, halo, workers, tile)
    try:
        seg = stitching.stitch_segmentation(_Boxes(shape), tiles, (tile, tile), (halo, halo), shape=shape,
                                            with_background=False, n_threads=workers, verbose=False)
    finally:
        tiles.close()
    return seg, tiles.per_pixel
