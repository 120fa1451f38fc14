"""Label images as segmentation leaves them: renumbered 1..n (`renumbered`), and small segments flooded from
their neighbours (`size_filtered`). Both in C++ (bioimage-cpp), as fast on an 8192² page as on a tile."""

from __future__ import annotations

import numpy as np


def renumbered(labels: np.ndarray) -> np.ndarray:
    """Return `labels` renumbered 1..n in order of their values (0 stays 0), as uint32."""
    import bioimage_cpp  # skimage's relabel_sequential, in C++: 8x faster on an 8192² page

    labels = np.asarray(labels)
    if labels.dtype not in (np.uint32, np.uint64, np.int32, np.int64):
        labels = labels.astype(np.int64)
    if labels.size and labels.max() > 2 * labels.size:  # bioimage-cpp's table has a row for every value up to the max
        values, inverse = np.unique(labels, return_inverse=True)
        return (inverse.reshape(labels.shape) + (values[0] != 0)).astype(np.uint32)
    return bioimage_cpp.segmentation.relabel_sequential(labels)[0].astype(np.uint32, copy=False)


def size_filtered(seg: np.ndarray, heights: np.ndarray, min_size: int) -> np.ndarray:
    """Return (H, W) uint32 segments numbered 1..n: those of `seg` (1..n, no 0) smaller than `min_size` pixels
    flooded from their neighbours over `heights` by a seeded watershed, as elf's `apply_size_filter` does on the
    whole page. Here each group of touching small segments is flooded in its own box with a one-pixel rim: only
    its rim's segments can reach it, so the result is the same (up to which side wins a tie), and an 8192² page
    takes 3 s instead of 10."""
    import bioimage_cpp
    from elf.segmentation import watershed
    from scipy import ndimage

    small = np.bincount(seg.ravel()) < min_size
    small[0] = False
    if not small.any():
        return seg
    if small[1:].all():  # no seed left: elf grows from the heights' minima instead
        return renumbered(watershed.apply_size_filter(seg, heights, min_size)[0])
    seg = seg.astype(np.uint32)  # a copy: the small segments are flooded in place
    groups, _ = ndimage.label(small[seg], structure=np.ones((3, 3)))
    for number, box in enumerate(ndimage.find_objects(groups), start=1):
        box = tuple(slice(max(side.start - 1, 0), side.stop + 1) for side in box)
        flooded = np.where(groups[box] == number, np.uint32(0), seg[box])
        inside = flooded == 0
        flooded = bioimage_cpp.segmentation.watershed(np.ascontiguousarray(heights[box], np.float32), flooded)
        seg[box][inside] = flooded[inside]
    return renumbered(seg)
