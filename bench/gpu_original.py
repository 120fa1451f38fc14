"""Train the `original` preset full size on one GPU with Keras 3 on JAX, then predict the held-out pages.

The original notebook's configuration (train.py PRESETS["original"]): the U-Net of `model.build_unet()` at its
defaults (64 filters, 31,031,685 parameters), whole 512x512 pages, batch 5, 3 epochs x 1000 steps, Adam 1e-4,
binary cross-entropy, metrics accuracy and pixel difference, the project's augmentation (`augment.AugmentedBatches`,
the original's transforms) on the training pages of the original split (data.py: all but validation 5, 15, 25 and
test 0, 10, 20). Unlike train.py it needs no TensorFlow (train.py's callbacks import it): it runs where only JAX is,
and it trains in mixed bfloat16 (`--precision`), which train.py's 'auto' would not choose on a GPU (it picks mixed
float16 with loss scaling).

It writes into --out: predictions.npz (the sigmoid outputs, 1 = cell, float16, of the validation and test pages
with their page indices, and the weights of the head layers OUT_3 and OUT) and gpu-original.json (timings, versions, losses, the test pages' scores). At each epoch
end it predicts the validation pages and records their loss, accuracy and pixel difference, as the original's
val_* columns. --time-limit stops training cleanly after the step that passes it, and the predictions are still
made and written.

    KERAS_BACKEND=jax python bench/gpu_original.py --out /tmp/gpu            # the original, full size
    KERAS_BACKEND=jax python bench/gpu_original.py --out /tmp/t --steps 2 --epochs 1 --filters 4 --batch 2 --crop 64
    python bench/gpu_original.py --score bench/gpu-original-h200-predictions.npz --json bench/gpu-original-h200.json

Augmentation runs in worker processes forked before Keras and JAX are imported (no fork of a process that runs
JAX's threads); they import augment.py on Keras's numpy backend.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402  (no Keras: data.py imports cli and files only)

SIZE_MULTIPLE = 16  # model.SIZE_MULTIPLE, checked once Keras is imported

# Set in the parent before the workers fork; the workers read them.
_TRAIN: dict = {}
_BATCHES = None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for predictions.npz and gpu-original.json")
    parser.add_argument("--score", metavar="NPZ", help="instead of training: score a predictions.npz here (project "
                        "venv): the challenge scores of the probabilities, and multicut cells tuned on the validation "
                        "pages; with --json, added to that JSON as 'local_scores'")
    parser.add_argument("--json", help="the run's JSON to add --score's results to")
    parser.add_argument("--data-dir", default=None, help="folder of the ISBI stacks (default: $ISBI_DATA_DIR, data/)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000, help="steps per epoch")
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument("--head-filters", type=int, default=None,
                        help="ReLU filters of OUT_3 (model.build_unet's head_filters; default: the original's 2)")
    parser.add_argument("--crop", type=int, default=512, help="training patch side (512: whole pages)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--precision", default="mixed_bfloat16", choices=("mixed_bfloat16", "float32", "mixed_float16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="augmenting processes (default: cores - 2, 1..12)")
    parser.add_argument("--ahead", type=int, default=24, help="batches prepared ahead of training")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds of training (from the first step's start) after which training stops")
    parser.add_argument("--sync-every", type=int, default=10,
                        help="steps between waits for the device (timings, the time limit)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- data (train.load_data / training_batches)

def load_data(data_dir, crop: int, seed: int) -> dict:
    """train.load_data for the ISBI stacks: {part: (images, labels)} float32 NHWC, parts train/validation/test."""
    pages, _ = data.load_pages(None, None, None, None, None, None, False, data_dir, seed)
    sizes = {part: [page.shape for page in images] for part, (images, _) in pages.items()}
    shapes = data.part_shapes(sizes["train"], sizes["validation"], crop, SIZE_MULTIPLE)
    shapes.update({part: shapes["validation"] for part in pages if part not in shapes})
    return {part: (data.stack_pages(x, shapes[part]), data.stack_pages(y, shapes[part]))
            for part, (x, y) in pages.items()}


def _make_batch(index: int):
    """Batch `index` of train.training_batches (default augmentation, no weights, membrane target), in a worker."""
    global _BATCHES
    if _BATCHES is None:
        os.environ["KERAS_BACKEND"] = "numpy"  # the worker needs Keras only for PyDataset's base class
        import augment

        t = _TRAIN
        images, labels = t["images"], t["labels"]
        crop = None if images.shape[1:3] == (t["crop"], t["crop"]) else t["crop"]
        _BATCHES = augment.AugmentedBatches(images, labels, t["batch"], t["steps"], augment.Augmentation(), crop,
                                            t["seed"], weights=None, first_step=0, target=None)
    return _BATCHES[index]


def batches(pool, ahead: int):
    """Endless batches 0, 1, 2, ... from the pool, at most `ahead` in flight."""
    pending = collections.deque()
    index = 0
    while True:
        while len(pending) < ahead:
            pending.append(pool.apply_async(_make_batch, (index,)))
            index += 1
        yield pending.popleft().get()


# ---------------------------------------------------------------- scores (numpy)

def bce_np(y: np.ndarray, p: np.ndarray) -> float:
    """Keras's binary cross-entropy of probabilities (clipped at its epsilon 1e-7), mean over pixels."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y, dtype=np.float64)
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def floor_stats(p: np.ndarray) -> dict:
    """The lowest probability and the fraction of pixels within 1e-3 of it: a head whose ReLUs are all off on the
    membranes leaves them flat at sigmoid(OUT's bias) instead of near 0."""
    p = np.asarray(p, dtype=np.float32)
    return {"min_probability": float(p.min()), "fraction_at_min": float(np.mean(p <= p.min() + 1e-3))}


def page_scores(y: np.ndarray, p: np.ndarray, numpy_scores) -> dict:
    """Pixel difference (percent), accuracy (threshold 0.5) and cross-entropy of pages, overall and per page,
    with `numpy_scores`'s pixel_difference_np and accuracy_np (inline copies when None)."""
    if numpy_scores is not None:
        pixel_difference, accuracy = numpy_scores.pixel_difference_np, numpy_scores.accuracy_np
    else:  # scores.pixel_difference_np and scores.accuracy_np, inline
        def pixel_difference(a, b):
            return float(100.0 * np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

        def accuracy(a, b):
            return float(np.mean((np.asarray(b) > 0.5) == (np.asarray(a) > 0.5)))
    return {
        "pixel_difference": pixel_difference(y, p),
        "accuracy": accuracy(y, p),
        "bce": bce_np(y, p),
        "pixel_difference_per_page": [pixel_difference(a, b) for a, b in zip(y, p)],
        "accuracy_per_page": [accuracy(a, b) for a, b in zip(y, p)],
        **floor_stats(p),
    }


# ---------------------------------------------------------------- main

def score(npz: str, json_path: str | None, data_dir) -> dict:
    """Score predictions.npz against the ISBI labels as evaluate.py scores a probability TIFF of the test pages
    (`evaluate.score_pages`: pixel difference, accuracy, pixel error, V_rand and V_info of the probabilities),
    and the test pages' cells by multicut with parameters tuned on the validation pages (`segment.tune`)."""
    import evaluate
    import segment

    saved = np.load(npz)
    _, raw_labels = data.load_isbi(data_dir)
    labels = data.binarize_labels(raw_labels)
    parts = {part: (list(map(int, saved[f"{part}_pages"])), saved[part].astype(np.float32))
             for part in ("validation", "test")}
    result: dict = {"predictions": str(npz)}
    for part, (pages, probabilities) in parts.items():
        per_page = evaluate.score_pages(labels[pages], probabilities)
        result[part] = {"pages": pages, "per_page": per_page, **floor_stats(probabilities),
                        "mean": {key: float(np.mean([page[key] for page in per_page])) for key in per_page[0]
                                 if "threshold" not in key}}
        log(f"{part} pages {pages}: " + ", ".join(f"{k} {v:.4f}" for k, v in result[part]["mean"].items()))
    val_pages, val_p = parts["validation"]
    t = time.perf_counter()
    params, table = segment.tune(val_p, labels[val_pages], "multicut")
    result["multicut"] = {"params": params.as_dict(), "tuned_on": val_pages, "tune_seconds": time.perf_counter() - t,
                          "tuning_table_top5": table[:5]}
    log(f"multicut tuned on {val_pages}: {params.as_dict()} (validation V_rand {table[0]['v_rand']:.4f})")
    test_pages, test_p = parts["test"]
    cells = segment.segment_stack(test_p, "multicut", params)
    per_page = evaluate.score_pages(labels[test_pages], None, cells)
    mean = {key: float(np.mean([page[key] for page in per_page])) for key in per_page[0]}
    result["multicut"]["test"] = {"pages": test_pages, "per_page": per_page, "mean": mean}
    log(f"test cells (multicut): " + ", ".join(f"{k} {v:.4f}" for k, v in result["multicut"]["test"]["mean"].items()))
    if json_path:
        run = json.loads(Path(json_path).read_text())
        run["local_scores"] = result
        Path(json_path).write_text(json.dumps(run, indent=1) + "\n")
        log(f"added local_scores to {json_path}")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.score:
        score(args.score, args.json, args.data_dir)
        return 0
    if not args.out:
        raise SystemExit("--out is needed to train")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict = {"args": vars(args), "host": platform.node(), "python": platform.python_version()}

    split = load_data(args.data_dir, args.crop, args.seed)
    log("data: " + ", ".join(f"{part} {x.shape}" for part, (x, _) in split.items()))

    # Fork the augmenting workers while this process has no Keras, no JAX and no threads.
    assert "keras" not in sys.modules and "jax" not in sys.modules
    workers = args.workers or min(max((os.cpu_count() or 2) - 2, 1), 12)
    _TRAIN.update(images=split["train"][0], labels=split["train"][1], batch=args.batch, steps=args.steps,
                  crop=args.crop, seed=args.seed)
    pool = multiprocessing.get_context("fork").Pool(workers)
    log(f"{workers} augmenting workers")

    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    import model as model_module

    assert model_module.SIZE_MULTIPLE == SIZE_MULTIPLE
    keras_metrics = numpy_scores = None
    try:
        import metrics as keras_metrics
    except Exception as error:  # noqa: BLE001  (a missing optional import on the device: do without)
        log(f"metrics.py did not import ({type(error).__name__}: {error}); training without pixel_difference")
    for name in ("scores", "metrics"):  # the numpy scores: scores.py, or metrics.py before it was split
        try:
            module = __import__(name)
        except Exception as error:  # noqa: BLE001
            log(f"{name}.py did not import ({type(error).__name__}: {error})")
            continue
        if hasattr(module, "pixel_difference_np") and hasattr(module, "accuracy_np"):
            numpy_scores = module
            break
    if numpy_scores is None:
        log("scoring with inline copies of pixel_difference_np and accuracy_np")
    result["numpy_scores_from"] = numpy_scores.__name__ + ".py" if numpy_scores is not None else "inline"
    backend = keras.backend.backend()
    devices = []
    if backend == "jax":
        import jax

        devices = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
        result["jax_version"] = jax.__version__
    result.update(keras_version=keras.__version__, backend=backend, devices=devices, precision=args.precision)
    log(f"keras {keras.__version__}, backend {backend}, devices {devices}, precision {args.precision}")

    keras.utils.set_random_seed(args.seed)
    input_shape = (512, 512, 1) if args.crop == 512 else (None, None, 1)
    net = model_module.build_unet(input_shape, filters=args.filters, dtype_policy=args.precision,
                                  head_filters=args.head_filters)
    metric_list = ["accuracy"] + ([keras_metrics.pixel_difference] if hasattr(keras_metrics, "pixel_difference")
                                  else [])
    net.compile(optimizer=keras.optimizers.Adam(args.learning_rate), loss="binary_crossentropy", metrics=metric_list)
    result["parameters"] = net.count_params()
    log(f"U-Net {args.filters} filters, {net.count_params():,} parameters, input {input_shape}")

    val_x, val_y = split["validation"]
    test_x, test_y = split["test"]
    total_steps = args.epochs * args.steps
    timing = {"syncs": []}  # (step done, seconds since the first step began)
    per_epoch: list[dict] = []

    class Progress(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.step = 0
            self.t0 = None
            self.stopped_by_limit = False

        def on_train_batch_begin(self, batch, logs=None):
            if self.t0 is None:
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            if self.step % args.sync_every and self.step != 1:
                return
            loss = float(np.asarray(logs["loss"]))  # waits for the device
            elapsed = time.perf_counter() - self.t0
            timing["syncs"].append((self.step, elapsed))
            if self.step == 1 or self.step % 100 == 0:
                log(f"step {self.step}/{total_steps}: loss {loss:.4f}, {elapsed:.1f} s since the first step began")
            if args.time_limit and elapsed > args.time_limit:
                log(f"time limit {args.time_limit:.0f} s reached after {self.step} steps: stopping")
                self.stopped_by_limit = True
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            t = time.perf_counter()
            p = self.model.predict(val_x, batch_size=len(val_x), verbose=0)
            scores = page_scores(val_y, p, numpy_scores)
            row = {"epoch": epoch + 1, "steps_done": self.step, **{k: float(v) for k, v in (logs or {}).items()},
                   "val_loss": scores["bce"], "val_accuracy": scores["accuracy"],
                   "val_pixel_difference": scores["pixel_difference"],
                   "val_predict_seconds": time.perf_counter() - t}
            per_epoch.append(row)
            log(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                       if isinstance(v, float)))

    progress = Progress()
    fit_start = time.perf_counter()
    history = net.fit(batches(pool, args.ahead), epochs=args.epochs, steps_per_epoch=args.steps, verbose=0,
                      callbacks=[progress], shuffle=False)
    fit_seconds = time.perf_counter() - fit_start
    pool.terminate()

    syncs = timing["syncs"]
    steady = [(b - a) / (sb - sa) for (sa, a), (sb, b) in zip(syncs, syncs[1:]) if sb > sa]
    first_step_seconds = syncs[0][1] if syncs else None
    result["training"] = {
        "steps_done": progress.step,
        "steps_planned": total_steps,
        "stopped_by_time_limit": progress.stopped_by_limit,
        "fit_seconds": fit_seconds,
        "train_seconds_from_first_step": syncs[-1][1] if syncs else None,
        "first_step_seconds_incl_compile": first_step_seconds,
        "seconds_per_step_median": float(np.median(steady)) if steady else None,
        "seconds_per_step_mean_after_first": ((syncs[-1][1] - syncs[0][1]) / (syncs[-1][0] - syncs[0][0])
                                              if len(syncs) > 1 and syncs[-1][0] > syncs[0][0] else None),
        "images_per_second": (args.batch * (syncs[-1][0] - syncs[0][0]) / (syncs[-1][1] - syncs[0][1])
                              if len(syncs) > 1 and syncs[-1][1] > syncs[0][1] else None),
        "sync_points": syncs,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "per_epoch": per_epoch,
    }
    log(f"training: {progress.step} steps in {fit_seconds:.1f} s (fit), median "
        f"{result['training']['seconds_per_step_median']} s/step")

    t = time.perf_counter()
    val_p = net.predict(val_x, batch_size=len(val_x), verbose=0)[..., 0]
    test_p = net.predict(test_x, batch_size=len(test_x), verbose=0)[..., 0]
    result["predict_seconds"] = time.perf_counter() - t
    np.savez_compressed(out / "predictions.npz", validation=val_p.astype(np.float16), test=test_p.astype(np.float16),
                        validation_pages=np.array(data.VALIDATION_PAGES), test_pages=np.array(data.TEST_PAGES),
                        **{f"{layer}_{i}": np.asarray(w, np.float32) for layer in ("OUT_3", "OUT")
                           for i, w in enumerate(net.get_layer(layer).get_weights())})
    result["validation"] = page_scores(val_y[..., 0], val_p, numpy_scores)
    result["test"] = page_scores(test_y[..., 0], test_p, numpy_scores)
    result["test_pages"] = list(data.TEST_PAGES)
    result["validation_pages"] = list(data.VALIDATION_PAGES)
    result["total_seconds"] = time.perf_counter() - started
    (out / "gpu-original.json").write_text(json.dumps(result, indent=1) + "\n")
    log(f"test pages {list(data.TEST_PAGES)}: pixel difference {result['test']['pixel_difference']:.2f} % "
        f"(per page {[round(v, 2) for v in result['test']['pixel_difference_per_page']]}), accuracy "
        f"{result['test']['accuracy']:.4f}; wrote {out}; {result['total_seconds']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
