"""Measure training and inference speed of the U-Net on this machine.

    python benchmark.py                                   # the seed model (64 filters, 512x512, batch 5), auto precision
    python benchmark.py --filters 16 --size 256 --batch 4 --precision float32 --precision mixed_bfloat16
    python benchmark.py --preset cpu --pipeline --peak    # the quick start's configuration, its input
                                                          # pipeline, and the matmul peak of this CPU
    python benchmark.py --volume test-volume.tif          # predict a stack with predict.py's path
    python benchmark.py --preset cpu --precision mixed_bfloat16 --profile --out bench/profile-cpu.json
                                                          # where a train step's time goes (TF profiler)
    python benchmark.py --preset cpu --precision mixed_bfloat16 --options all --out bench/options-cpu.json
                                                          # threads, batch, layout, oneDNN, XLA, upsampling,
                                                          # alternated A/B/A/B

Prints a table (median and min-max of timed steps after warm-up) and writes
JSON. Train figures are seconds per optimizer step on random data; inference
is `predict_on_batch`. FLOPs are counted from the convolution layers (2 x
multiply-adds); a training step is taken as 3 forward passes.
"""

from __future__ import annotations

import cli

if __name__ == "__main__":
    cli.quiet_native_logs()  # before TensorFlow loads

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import keras

import augment
import files
import hardware
import model as model_module
from model import build_unet
from op_profile import conv_flops, profile_steps, profile_table


def time_calls(fn, warmup: int, repeats: int, clock=time.perf_counter) -> list[float]:
    """Return the seconds (by `clock`) of `repeats` calls of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return times


def matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5, clock=time.perf_counter) -> float:
    """Return the best TFLOP/s of an n x n matrix product in `dtype` ('float32' or 'bfloat16')."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    product = tf.function(lambda x: tf.matmul(x, x))
    times = time_calls(lambda: product(a).numpy(), 1, repeats, clock)
    return 2 * n**3 / min(times) / 1e12


def pipeline_pairs_per_s(crop: int | None, augmentation=None, batches: int = 10, batch_size: int = 4,
                         clock=time.perf_counter) -> float:
    """Return augmented (image, label) pairs per second (by `clock`) that `augment.AugmentedBatches` makes on one core."""
    rng = np.random.default_rng(0)
    images = rng.random((4, 512, 512, 1), dtype=np.float32)
    labels = (images > 0.5).astype(np.float32)
    pairs = augment.AugmentedBatches(images, labels, batch_size, batches, augmentation, crop)
    start = clock()
    for i in range(batches):
        pairs[i]
    return batches * batch_size / (clock() - start)


def volume_prediction(model_path, volume_path, precision: str = "auto") -> dict:
    """Return the seconds and pages/s of predicting a TIFF stack with predict.py's tiled path (`model_path` None:
    the shipped model)."""
    import runtimes
    import tiling
    from model import load_model

    stack = files.read_stack(volume_path)
    model = load_model(runtimes.resolve_model(model_path), precision=precision)
    tiling.predict_stack(model, stack[:1], progress=False)  # warm-up
    start = time.perf_counter()
    tiling.predict_stack(model, stack, progress=False)
    seconds = time.perf_counter() - start
    return {"volume": str(volume_path), "pages": len(stack), "seconds": seconds, "pages_per_s": len(stack) / seconds}


def training_model(filters: int, size: int, batch: int, precision: str = "auto", upsampling: str = "upsample",
                   jit: bool = False, batch_norm: bool | str = False) -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """Return a compiled U-Net (Adam, cross-entropy) and one random batch (x, y) of `batch` size x size images;
    `batch_norm` 'keras' builds it with Keras's own BatchNormalization instead of the fused one."""
    policy = hardware.choose_precision(precision)
    with _keras_normalisation(batch_norm == "keras"):
        model = build_unet((size, size, 1), filters=filters, dtype_policy=policy, upsampling=upsampling,
                           batch_norm=bool(batch_norm))
    model.compile(keras.optimizers.Adam(1e-4), "binary_crossentropy", jit_compile=jit)
    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 1), dtype=np.float32)
    y = (rng.random((batch, size, size, 1)) > 0.5).astype(np.float32)
    return model, x, y


@contextlib.contextmanager
def _keras_normalisation(active: bool):
    """Within the block (if `active`), model.build_unet normalises with Keras's BatchNormalization layer."""
    original = model_module.FusedBatchNormalization
    if active:
        model_module.FusedBatchNormalization = keras.layers.BatchNormalization
    try:
        yield
    finally:
        model_module.FusedBatchNormalization = original


def runtime_timings(model_path: str | None, side: int = 576, rounds: int = 5) -> dict:
    """Return the seconds per (1, side, side, 1) tile of a .keras model in Keras (precision auto and float32) and
    in onnxruntime (its cached ONNX conversion), alternating, with the largest difference from Keras float32;
    'before' is the same network in auto precision with Keras's unfolded normalisation (random weights, so its
    difference is not meaningful), as the shipped model was predicted before `model.fold_batch_norm`."""
    import runtimes

    model_path = runtimes.resolve_model(model_path)
    filters = runtimes.load_model(model_path).get_layer("CNT_1_conv_1").filters
    with _keras_normalisation(True):  # the shipped model before folding: Keras's layers, as it trained
        unfolded = build_unet((None, None, 1), filters=filters, batch_norm=True,
                              dtype_policy=hardware.choose_precision("auto"))
    variants = {"keras, unfolded (before)": unfolded,
                "keras (auto precision)": runtimes.load_model(model_path, precision="auto"),
                "keras float32": runtimes.load_model(model_path, precision="float32"),
                "onnxruntime": runtimes.load_for_prediction(model_path, "onnx")[0]}
    x = np.random.default_rng(0).random((1, side, side, 1), dtype=np.float32)
    reference = np.asarray(variants["keras float32"].predict_on_batch(x))
    times = collections.defaultdict(list)
    for model in variants.values():
        model.predict_on_batch(x)
    for _ in range(rounds):
        for label, model in variants.items():
            times[label] += time_calls(lambda: model.predict_on_batch(x), 0, 1)
    return {label: {"infer_s_per_tile": float(np.median(times[label])),
                    "max_difference": None if model is unfolded else
                    float(np.abs(np.asarray(model.predict_on_batch(x)) - reference).max())}
            for label, model in variants.items()}


def benchmark(filters: int = 64, size: int = 512, batch: int = 5, precision: str = "auto",
              warmup: int = 2, repeats: int = 5, upsampling: str = "upsample", jit: bool = False,
              batch_norm: bool = False) -> dict:
    """Return train and inference timings (seconds) and throughput for one configuration."""
    policy = hardware.choose_precision(precision)
    model, x, y = training_model(filters, size, batch, policy, upsampling, jit, batch_norm)
    train = time_calls(lambda: model.train_on_batch(x, y), warmup, repeats)
    infer = time_calls(lambda: model.predict_on_batch(x), warmup, repeats)
    flops = conv_flops(model)
    step = float(np.median(train))
    return {
        "filters": filters, "size": size, "batch": batch, "precision": policy,
        "upsampling": upsampling, "jit": jit, "batch_norm": batch_norm, "threads": threads_in_use(),
        "parameters": model.count_params(),
        "forward_gflop_per_image": flops / 1e9,
        "train_s_per_step": {"median": step, "min": min(train), "max": max(train)},
        "train_images_per_s": batch / step,
        "train_tflops": 3 * flops * batch / step / 1e12,
        "infer_s_per_image": float(np.median(infer)) / batch,
        "infer_images_per_s": batch / float(np.median(infer)),
        "infer_tflops": flops * batch / float(np.median(infer)) / 1e12,
    }


def set_threads(intra: int, inter: int) -> None:
    """Set TensorFlow's intra-op and inter-op thread counts (0 = TF's default); call before any TF op runs."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)


def threads_in_use() -> dict:
    """Return TensorFlow's intra-op and inter-op thread settings (0 = its default, one per core)."""
    import tensorflow as tf

    return {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}


def profile_train_step(filters: int, size: int, batch: int, precision: str = "auto", upsampling: str = "upsample",
                       warmup: int = 2, steps: int = 3) -> dict:
    """Return where a train step of this configuration's U-Net goes (op_profile.profile_steps), with the
    configuration and TensorFlow's thread settings."""
    model, x, y = training_model(filters, size, batch, precision, upsampling)
    return {"filters": filters, "size": size, "batch": batch, "precision": hardware.choose_precision(precision),
            "upsampling": upsampling, "threads": threads_in_use(), **profile_steps(model, x, y, warmup, steps)}


def alternate(variants: dict[str, tuple[keras.Model, np.ndarray, np.ndarray]], warmup: int = 2,
              rounds: int = 5) -> dict:
    """Return train and inference seconds of each variant, timed one step each in turn (A/B/A/B) per round."""
    train, infer = collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(warmup):
        for model, x, y in variants.values():
            model.train_on_batch(x, y)
            model.predict_on_batch(x)
    for _ in range(rounds):
        for label, (model, x, y) in variants.items():
            train[label] += time_calls(lambda: model.train_on_batch(x, y), 0, 1)
            infer[label] += time_calls(lambda: model.predict_on_batch(x), 0, 1)
    return {label: summary(train[label], infer[label], len(x)) for label, (_, x, _) in variants.items()}


def summary(train: list[float], infer: list[float], batch: int) -> dict:
    """Return the median, min and max train seconds per step, and per image, and the inference seconds per image."""
    step = float(np.median(train))
    row = {"batch": batch, "rounds": len(train), "train_s_per_step": {"median": step, "min": min(train), "max": max(train)},
           "train_s_per_image": step / batch}
    if infer:
        row["infer_s_per_image"] = float(np.median(infer)) / batch
    return row


def layout_probe(size: int, channels: int, batch: int, precision: str = "auto", warmup: int = 2,
                 rounds: int = 5) -> dict:
    """Return the train and inference seconds of two 3x3 convolutions in channels_last against channels_first.

    A variant that TensorFlow cannot run on this device is reported with its one-line error.
    """
    policy = hardware.choose_precision(precision)
    rng = np.random.default_rng(0)
    variants, results = {}, {}
    for layout in ("channels_last", "channels_first"):
        shape = (size, size, channels) if layout == "channels_last" else (channels, size, size)
        inputs = keras.Input(shape)
        x = inputs
        for i in (1, 2):
            x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", data_format=layout,
                                    dtype=policy, name=f"conv_{i}")(x)
        model = keras.Model(inputs, keras.layers.Activation("linear", dtype="float32")(x))
        model.compile(keras.optimizers.Adam(1e-4), "mse")
        data = rng.random((batch, *shape), dtype=np.float32)
        try:
            model.train_on_batch(data, data)
        except Exception as error:  # report, do not stop the benchmark: this is what is being probed
            results[layout] = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"}
            continue
        variants[layout] = (model, data, data)
    results.update(alternate(variants, warmup, rounds))
    gflop = 2 * 2 * size * size * 9 * channels * channels / 1e9
    return {"size": size, "channels": channels, "forward_gflop_per_image": gflop, "precision": policy, **results}


def benchmark_process(args: list[str], env: dict | None = None) -> dict:
    """Return the first result row of `python benchmark.py ARGS` run in a fresh process (with `env` added)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "b.json")
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *args, "--out", out],
                              env={**os.environ, **(env or {})}, capture_output=True, text=True)
        if done.returncode:
            lines = done.stderr.strip().splitlines() or ["no output"]
            raise RuntimeError(f"benchmark.py {' '.join(args)} failed: {lines[-1]}")
        with open(out) as f:
            return json.load(f)["results"][0]


def process_options(base: list[str], variants: dict[str, tuple[list[str], dict]], rounds: int) -> dict:
    """Return each variant's rows (one per fresh process, the variants run in turn per round) and their medians."""
    rows = collections.defaultdict(list)
    for _ in range(rounds):
        for label, (extra, env) in variants.items():
            rows[label].append(benchmark_process(base + extra, env))
    result = {}
    for label, runs in rows.items():
        medians = [r["train_s_per_step"]["median"] for r in runs]
        result[label] = summary(medians, [r["infer_s_per_image"] * r["batch"] for r in runs], runs[0]["batch"])
        result[label].update(runs=runs, args=variants[label][0], env=variants[label][1])
    return result


OPTIONS = ("threads", "batch", "layout", "onednn", "jit", "upsampling", "normalisation", "runtime")


def options(names: list[str], filters: int, size: int, batch: int, precision: str = "auto", rounds: int = 5,
            say=None, model_path: str | None = None) -> dict:
    """Return the timings of the options tried, each measured against the default in turn (see OPTIONS);
    `say` receives each option's table as it is measured."""
    policy = hardware.choose_precision(precision)
    base = ["--filters", str(filters), "--size", str(size), "--batch", str(batch), "--precision", policy]
    found = {}
    for name in names:
        if name == "threads":  # fixed when TensorFlow starts: one process per setting
            settings = {"default (0,0)": "0,0", "intra 2, inter 1": "2,1", "intra 1, inter 2": "1,2",
                        "intra 1, inter 1": "1,1"}
            found[name] = process_options(base + ["--warmup", "2", "--repeats", "5"],
                                          {k: (["--threads", v], {}) for k, v in settings.items()}, max(1, rounds // 2))
        elif name == "onednn":  # very slow in bf16 without oneDNN: one step
            found[name] = process_options(base + ["--warmup", "1", "--repeats", "1"],
                                          {"oneDNN on (default)": ([], {"TF_ENABLE_ONEDNN_OPTS": "1"}),
                                           "TF_ENABLE_ONEDNN_OPTS=0": ([], {"TF_ENABLE_ONEDNN_OPTS": "0"})}, 1)
        elif name == "batch":
            found[name] = alternate({f"batch {b}": training_model(filters, size, b, policy) for b in
                                     sorted({max(1, batch // 2), batch, batch * 2})}, rounds=rounds)
        elif name == "jit":
            found[name] = alternate({f"jit_compile={jit}": training_model(filters, size, batch, policy, jit=jit)
                                     for jit in (False, True)}, rounds=rounds)
        elif name == "upsampling":
            found[name] = alternate({u: training_model(filters, size, batch, policy, u)
                                     for u in ("upsample", "transpose")}, rounds=rounds)
        elif name == "normalisation":
            found[name] = alternate({"none": training_model(filters, size, batch, policy),
                                     "keras BatchNormalization": training_model(filters, size, batch, policy,
                                                                                batch_norm="keras"),
                                     "fused (model.py)": training_model(filters, size, batch, policy, batch_norm=True)},
                                    rounds=rounds)
        elif name == "runtime":
            found[name] = runtime_timings(model_path, rounds=rounds)
        elif name == "layout":
            found[name] = layout_probe(size // 2, filters * 4, batch, policy, rounds=rounds)
        else:
            raise ValueError(f"unknown option {name!r}; choose from all, {', '.join(OPTIONS)}")
        if say is not None:
            say(options_table(name, found[name]))
    return found


def options_table(name: str, rows: dict) -> str:
    """Return one option's timings as a text table."""
    lines = [f"{name}:", f"{'variant':>24} {'train s/step (min-max)':>26} {'train s/image':>13} {'infer s/image':>13}"]
    for label, r in rows.items():
        if not isinstance(r, dict):
            continue
        if "error" in r:
            lines.append(f"{label:>24} fails: {r['error']}")
        elif "infer_s_per_tile" in r:
            difference = "random weights" if r["max_difference"] is None else f"{r['max_difference']:.1e}"
            lines.append(f"{label:>24} {'':>26} {'':>13} {r['infer_s_per_tile']:>13.4f}  per 576x576 tile, "
                         f"max difference {difference}")
        elif "train_s_per_step" in r:
            t = r["train_s_per_step"]
            lines.append(f"{label:>24} {t['median']:>10.4f} ({t['min']:.4f}-{t['max']:.4f}) "
                         f"{r['train_s_per_image']:>13.4f} {r.get('infer_s_per_image', float('nan')):>13.4f}")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    """Write `report` as JSON to `path` atomically (a temporary name, then os.replace)."""
    files.write_atomic(path, json.dumps(report, indent=2))


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


def with_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Return `args` with the filters, size, batch and batch norm that were not given taken from `--preset` (else
    the seed model's: 64, 512, 5)."""
    base = (64, 512, 5, False)
    if args.preset:
        from presets import preset

        settings = preset(args.preset)
        base = (settings.filters, settings.crop, settings.batch_size, settings.batch_norm)
    args.filters, args.size, args.batch = (given or default for given, default in
                                           zip((args.filters, args.size, args.batch), base[:3]))
    args.batch_norm = args.batch_norm or base[3]
    return args


def build_parser() -> argparse.ArgumentParser:
    """Return benchmark.py's command line."""
    parser = cli.parser(__doc__)
    parser.add_argument("--preset", help="take filters, batch norm, size (crop) and batch from a train.py preset; "
                        "--filters, --size and --batch override it")
    parser.add_argument("--filters", type=int, help="default 64, or the preset's")
    parser.add_argument("--size", type=int, help="default 512, or the preset's crop")
    parser.add_argument("--batch", type=int, help="default 5, or the preset's")
    parser.add_argument("--precision", action="append", help="repeat to compare; default: auto")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak", action="store_true", help="also measure the bf16 and fp32 matmul peaks")
    parser.add_argument("--pipeline", action="store_true", help="also measure the augmentation pipeline alone")
    parser.add_argument("--volume", help="also time predicting this TIFF stack with --model")
    parser.add_argument("--model", help="model for --volume and the runtime option (default: the shipped one)")
    parser.add_argument("--threads", help="INTRA,INTER: TensorFlow's intra-op and inter-op threads (0 = default)")
    parser.add_argument("--jit", action="store_true", help="compile the train step with XLA (jit_compile=True)")
    parser.add_argument("--upsampling", default="upsample", choices=("upsample", "transpose"),
                        help="the expanding path's upsampling (model.build_unet)")
    parser.add_argument("--batch-norm", action="store_true",
                        help="batch normalisation (model.build_unet) in the timing rows; "
                             "--profile and --options time the model without it")
    parser.add_argument("--profile", action="store_true", help="also profile a train step (TensorFlow profiler)")
    parser.add_argument("--options", action="append", choices=("all",) + OPTIONS,
                        help="also time these options against the default, alternating; repeat or 'all'")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds for --options")
    parser.add_argument("--out", default="benchmark.json")
    return parser


def run(args: argparse.Namespace) -> None:
    """Run the benchmarks the parsed command line asks for; print the tables, write the JSON report."""
    if args.threads:
        try:
            set_threads(*(int(n) for n in args.threads.split(",")))
        except (TypeError, ValueError):
            raise ValueError(f"--threads takes INTRA,INTER, two whole numbers, got {args.threads!r}") from None
        except RuntimeError:
            raise ValueError("--threads must be set before TensorFlow starts (run benchmark.py afresh)") from None
    with_preset(args)
    # other jobs on the machine slow every figure: the load average says how busy it was
    report = {"machine": hardware.describe(), "load_average_1min": {"start": os.getloadavg()[0]}, "results": []}
    print(f"machine: {report['machine']}; load average {os.getloadavg()[0]:.2f}")
    if args.peak:
        # Under a oneDNN cap below bfloat16 its bfloat16 matmul aborts the process.
        report["peak_tflops"] = {dtype: matmul_peak(dtype) for dtype in ("bfloat16", "float32")
                                 if not (hardware.onednn_capped_below_bf16() and dtype == "bfloat16")}
        print("matmul peak TFLOP/s: " + ", ".join(f"{k} {v:.3f}" for k, v in report["peak_tflops"].items()))
    for precision in args.precision or ["auto"]:
        row = benchmark(args.filters, args.size, args.batch, precision, args.warmup, args.repeats,
                        args.upsampling, args.jit, args.batch_norm)
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
    precision = (args.precision or ["auto"])[0]
    if args.profile:
        report["profile"] = profile_train_step(args.filters, args.size, args.batch, precision, args.upsampling,
                                               args.warmup)
        print(profile_table(report["profile"]))
    if args.options:
        names = OPTIONS if "all" in args.options else args.options
        report["options"] = options(names, args.filters, args.size, args.batch, precision, args.rounds,
                                    say=lambda text: print(text, flush=True), model_path=args.model)
    report["load_average_1min"]["end"] = os.getloadavg()[0]
    write_json(report, args.out)


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
