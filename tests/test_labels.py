import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.segmentation import relabel_sequential

import labels


def same_partition(a, b) -> bool:
    """Return whether two label images cut the pixels the same way, whatever their numbers."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(pairs[0]) == len(np.unique(a)) == len(np.unique(b))


def test_labels_are_renumbered_in_order_of_their_values_as_skimage_does():
    image = np.random.default_rng(0).choice([0, 3, 7, 70000, 2**40], size=(20, 30))
    for sparse in (image, image + 1, image % 1000):  # ids far apart or dense, with or without 0
        out = labels.renumbered(sparse)
        assert out.dtype == np.uint32
        np.testing.assert_array_equal(out, relabel_sequential(sparse)[0])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 40))
def test_small_segments_flood_box_by_box_as_elf_floods_the_whole_page(seed, min_size):
    from elf.segmentation import watershed

    rng = np.random.default_rng(seed)
    # segments of every size, small ones touching each other and the page's edges
    blocks = rng.integers(1, 6, (12, 16)).repeat(4, 0).repeat(3, 1)
    seg = labels.renumbered(blocks + 10 * (rng.random((48, 48)) < 0.05) * rng.integers(1, 60, (48, 48)))
    heights = rng.random(seg.shape).astype(np.float32)
    filtered = labels.size_filtered(seg, heights, min_size)
    expected = labels.renumbered(watershed.apply_size_filter(seg.copy(), heights, min_size)[0])
    kept = (np.bincount(seg.ravel()) >= min_size)[seg]
    assert same_partition(filtered[kept], seg[kept]) and filtered.max() == expected.max()
    assert np.bincount(filtered.ravel())[1:].min() >= min_size
    # a pixel pushed by two neighbours at its own height is a tie, which either side may win
    assert np.mean(filtered == expected) > 0.99
