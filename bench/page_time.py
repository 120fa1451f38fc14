"""Seconds to predict one 512 x 512 test page and cut it into cells, in process, with the shipped model and its card.

    .venv/bin/python bench/page_time.py

One warm-up page first; then each test page 0, 10, 20: the prediction (`tiling.predict_stack`, Keras) and the
cells (`segment.segment_stack` with the card's method and parameters), timed apart.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cards  # noqa: E402
import data  # noqa: E402
import hardware  # noqa: E402
import runtimes  # noqa: E402
import segment  # noqa: E402
import tiling  # noqa: E402


def main() -> int:
    images, _ = data.load_isbi(None)
    model, _ = runtimes.load_for_prediction(runtimes.DEFAULT_MODEL, "keras")
    how, params, offsets = cards.model_io(runtimes.DEFAULT_MODEL, model).segmentation(runtimes.DEFAULT_MODEL)
    tiling.predict_stack(model, images[[0]])  # warm-up
    print(f"{runtimes.DEFAULT_MODEL.name}, cells by {how}, on {hardware.describe()}")
    for page in data.TEST_PAGES:
        began = time.perf_counter()
        prediction = tiling.predict_stack(model, images[[page]])
        predicted = time.perf_counter()
        segment.segment_stack(prediction, how, params, offsets)
        done = time.perf_counter()
        print(f"page {page}: predict {predicted - began:.3f} s, cells {done - predicted:.3f} s, "
              f"total {done - began:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
