"""Shared test fixtures: the real ISBI data when it can be found, small synthetic stacks otherwise."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def isbi_dir():
    """Return the folder of the real ISBI stacks, or skip the test saying how to get them."""
    import data

    try:
        return data.find_data_dir()
    except data.DataError as err:
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
