"""Measure training and inference speed of the U-Net on this machine.

    python benchmark.py                                   # the seed model (64 filters, 512x512, batch 5), auto precision
    python benchmark.py --filters 16 --size 256 --batch 4 --precision float32 --precision mixed_bfloat16
    python benchmark.py --preset cpu --pipeline --peak    # the quick start's configuration, its input
                                                          # pipeline, and the matmul peak of this CPU
    python benchmark.py --volume test-volume.tif          # predict a stack with predict.py's path

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


def matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """Return the best TFLOP/s of an n x n matrix product in `dtype` ('float32' or 'bfloat16')."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    product = tf.function(lambda x: tf.matmul(x, x))
    times = time_calls(lambda: product(a).numpy(), 1, repeats)
    return 2 * n**3 / min(times) / 1e12


def pipeline_pairs_per_s(crop: int | None, augmentation=None, batches: int = 10, batch_size: int = 4) -> float:
    """Return augmented (image, label) pairs per second that `data.AugmentedBatches` makes on one core."""
    import data

    rng = np.random.default_rng(0)
    images = rng.random((4, 512, 512, 1), dtype=np.float32)
    labels = (images > 0.5).astype(np.float32)
    pairs = data.AugmentedBatches(images, labels, batch_size, batches, augmentation, crop)
    start = time.perf_counter()
    for i in range(batches):
        pairs[i]
    return batches * batch_size / (time.perf_counter() - start)


def volume_prediction(model_path, volume_path, precision: str = "auto") -> dict:
    """Return the seconds and pages/s of predicting a TIFF stack with predict.py's tiled path."""
    import data
    import predict
    from train import load_model

    stack = data.read_stack(volume_path)
    model = load_model(model_path, precision=precision)
    predict.predict_stack(model, stack[:1], progress=False)  # warm-up
    start = time.perf_counter()
    predict.predict_stack(model, stack, progress=False)
    seconds = time.perf_counter() - start
    return {"volume": str(volume_path), "pages": len(stack), "seconds": seconds, "pages_per_s": len(stack) / seconds}


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
    parser.add_argument("--preset", help="take filters, size (crop) and batch from a train.py preset")
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--precision", action="append", help="repeat to compare; default: auto")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak", action="store_true", help="also measure the bf16 and fp32 matmul peaks")
    parser.add_argument("--pipeline", action="store_true", help="also measure the augmentation pipeline alone")
    parser.add_argument("--volume", help="also time predicting this TIFF stack with --model")
    parser.add_argument("--model", default="models/unet-isbi-cpu.keras", help="model for --volume")
    parser.add_argument("--out", default="benchmark.json")
    args = parser.parse_args(argv)
    if args.preset:
        from train import preset

        settings = preset(args.preset)
        args.filters, args.size, args.batch = settings.filters, settings.crop, settings.batch_size
    report = {"machine": hardware.describe(), "results": []}
    print(f"machine: {report['machine']}")
    if args.peak:
        report["peak_tflops"] = {dtype: matmul_peak(dtype) for dtype in ("bfloat16", "float32")}
        print("matmul peak TFLOP/s: " + ", ".join(f"{k} {v:.3f}" for k, v in report["peak_tflops"].items()))
    for precision in args.precision or ["auto"]:
        row = benchmark(args.filters, args.size, args.batch, precision, args.warmup, args.repeats)
        if args.peak:
            peak = report["peak_tflops"]["bfloat16" if "bfloat16" in row["precision"] else "float32"]
            row["train_fraction_of_peak"] = row["train_tflops"] / peak
            row["infer_fraction_of_peak"] = row["infer_tflops"] / peak
        report["results"].append(row)
        print(table([row]), flush=True)
    print(table(report["results"]))
    if args.pipeline:
        crop = args.size if args.size < 512 else None
        pairs = pipeline_pairs_per_s(crop, batch_size=args.batch)
        consumed = max(r["train_images_per_s"] for r in report["results"])
        report["pipeline"] = {"pairs_per_s": pairs, "training_consumes_per_s": consumed, "ratio": pairs / consumed}
        print(f"input pipeline: {pairs:.1f} pairs/s on one core; training consumes {consumed:.1f}/s "
              f"({pairs / consumed:.1f}x)")
    if args.volume:
        report["volume"] = volume_prediction(args.model, args.volume)
        v = report["volume"]
        print(f"predicting {v['volume']}: {v['pages']} pages in {v['seconds']:.1f} s ({v['pages_per_s']:.2f} pages/s)")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
