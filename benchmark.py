"""Measure training and inference speed of the U-Net on this machine.

    python benchmark.py                                   # the seed model (64 filters, 512x512, batch 5), auto precision
    python benchmark.py --filters 16 --size 256 --batch 4 --precision float32 --precision mixed_bfloat16

Prints a table (median and min-max of timed steps after warm-up) and writes
JSON. Train figures are seconds per optimizer step on random data; inference
is `predict_on_batch`. FLOPs are counted from the convolution layers (2 x
multiply-adds); a training step is taken as 3 forward passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import keras

import hardware
from model import build_unet


def conv_flops(model: keras.Model) -> int:
    """Return the FLOPs of one forward pass of one image through the model's convolutions."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            total += 2 * h * w * kh * kw * c_in * c_out
    return int(total)


def time_calls(fn, warmup: int, repeats: int) -> list[float]:
    """Return the wall-clock seconds of `repeats` calls of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def benchmark(filters: int = 64, size: int = 512, batch: int = 5, precision: str = "auto",
              warmup: int = 2, repeats: int = 5) -> dict:
    """Return train and inference timings (seconds) and throughput for one configuration."""
    policy = hardware.choose_precision(precision)
    model = build_unet((size, size, 1), filters=filters, dtype_policy=policy)
    model.compile(keras.optimizers.Adam(1e-4), "binary_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 1), dtype=np.float32)
    y = (rng.random((batch, size, size, 1)) > 0.5).astype(np.float32)
    train = time_calls(lambda: model.train_on_batch(x, y), warmup, repeats)
    infer = time_calls(lambda: model.predict_on_batch(x), warmup, repeats)
    flops = conv_flops(model)
    step = float(np.median(train))
    return {
        "filters": filters, "size": size, "batch": batch, "precision": policy,
        "parameters": model.count_params(),
        "forward_gflop_per_image": flops / 1e9,
        "train_s_per_step": {"median": step, "min": min(train), "max": max(train)},
        "train_images_per_s": batch / step,
        "train_tflops": 3 * flops * batch / step / 1e12,
        "infer_s_per_image": float(np.median(infer)) / batch,
        "infer_images_per_s": batch / float(np.median(infer)),
        "infer_tflops": flops * batch / float(np.median(infer)) / 1e12,
    }


def table(rows: list[dict]) -> str:
    """Return the results as a text table."""
    head = f"{'filters':>7} {'size':>5} {'batch':>5} {'precision':>15} {'train s/step (min-max)':>24} " \
           f"{'img/s':>6} {'TFLOP/s':>7} {'infer s/img':>11} {'TFLOP/s':>7}"
    lines = [head]
    for r in rows:
        t = r["train_s_per_step"]
        lines.append(
            f"{r['filters']:>7} {r['size']:>5} {r['batch']:>5} {r['precision']:>15} "
            f"{t['median']:>8.3f} ({t['min']:.3f}-{t['max']:.3f}) {r['train_images_per_s']:>6.2f} "
            f"{r['train_tflops']:>7.3f} {r['infer_s_per_image']:>11.4f} {r['infer_tflops']:>7.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--precision", action="append", help="repeat to compare; default: auto")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmark.json")
    args = parser.parse_args(argv)
    print(f"machine: {hardware.describe()}")
    rows = []
    for precision in args.precision or ["auto"]:
        rows.append(benchmark(args.filters, args.size, args.batch, precision, args.warmup, args.repeats))
        print(table(rows[-1:]), flush=True)
    print(table(rows))
    with open(args.out, "w") as f:
        json.dump({"machine": hardware.describe(), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
