import numpy as np
import pytest

import stitch


class CountedRows:
    """A stored page that counts how often each of its rows is read, with a zarr array's `chunks`."""

    def __init__(self, page, chunk_rows):
        self.page, self.chunks, self.shape = page, (chunk_rows, chunk_rows, page.shape[2]), page.shape
        self.reads = np.zeros(page.shape[0], int)

    def __getitem__(self, box):
        rows = box[0] if isinstance(box, tuple) else box
        self.reads[rows] += 1
        return self.page[box]


@pytest.mark.parametrize("chunk_rows", [32, 1000])  # chunks lower than a tile, or the whole page in one chunk
def test_a_stored_page_is_read_once_a_row_and_every_tile_gets_its_pixels(chunk_rows):
    page = np.random.default_rng(0).random((150, 130, 3)).astype(np.float32)
    stored = CountedRows(page, chunk_rows)
    seen = []
    segments, per_pixel = stitch.stitched(
        stored, lambda tile: (seen.append(tile.copy()) or np.ones(tile.shape[:2], np.uint64)),
        lambda tile: tile[..., 0] * 2, tile=40, halo=9, workers=2)
    assert (stored.reads == 1).all()
    np.testing.assert_array_equal(per_pixel, page[..., 0] * 2)  # each tile's inner part, from its own pixels
    assert len(seen) == 4 * 4 and {tile.shape for tile in seen} >= {(58, 58, 3)}
    assert sum(any(np.array_equal(tile, page[top:top + 58, left:left + 58]) for tile in seen)
               for top, left in [(31, 31), (71, 71)]) == 2  # inner tiles: their box with a 9-pixel halo
    assert segments.shape == (150, 130) and len(np.unique(segments)) == 1  # uniform tiles stitch into one
