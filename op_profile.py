"""Where a U-Net train step's work and time go: the FLOPs of its convolutions, and a TensorFlow profiler trace of
a few steps summed by layer group (forward and backward convolutions, upsampling, the optimizer, ...).

benchmark.py's --profile and its FLOP figures; a module of its own so that the trace reading and the op grouping
can be read (and tested) apart from the timing tables.
"""

from __future__ import annotations

import collections
import os
import re
import tempfile
import time

import keras
import numpy as np


def layer_flops(layer: keras.layers.Layer) -> int:
    """Return the FLOPs of one image through one (transposed) convolution layer; 0 for other layers."""
    kh, kw = getattr(layer, "kernel_size", (0, 0))
    if isinstance(layer, keras.layers.Conv2DTranspose):  # each input pixel spreads over a kh x kw patch
        _, h, w, c_in = layer.input.shape
        return int(2 * h * w * kh * kw * c_in * layer.filters)
    if isinstance(layer, keras.layers.Conv2D):
        _, h, w, c_out = layer.output.shape
        return int(2 * h * w * kh * kw * layer.input.shape[-1] * c_out)
    return 0


def conv_flops(model: keras.Model) -> int:
    """Return the FLOPs of one forward pass of one image through the model's convolutions."""
    return sum(layer_flops(layer) for layer in model.layers)


def op_group(name: str, kind: str, optimizer: str = "adam") -> str:
    """Return the layer group of one TensorFlow op from its name (scope path) and type."""
    backward = name.startswith("gradient_tape/")
    if "Conv2D" in kind and not backward:  # a transposed convolution's forward op is a Conv2DBackpropInput
        return "forward convolutions"
    if "Conv2DBackpropFilter" in kind:
        return "backward convolutions: filter (and bias) gradients"
    if "Conv2D" in kind:
        return "backward convolutions: input gradients"
    for group, marker in (("upsampling", "_upscaling"), ("concatenation", "_concat"), ("pooling", "_maxpool")):
        if marker in name:
            return group
    if kind == "ReluGrad":
        return "ReLU gradients"
    if name.startswith(f"{optimizer}/") or kind.startswith("Assign"):
        return "optimizer update"
    if kind == "Cast":
        return "casts"
    if name.startswith("compile_loss/") or name.startswith("gradient_tape/compile_loss/"):
        return "loss"
    return "other"


def layer_of(op_name: str, layer_names: set[str]) -> str | None:
    """Return the layer an op belongs to, from its scope path (Keras may append '_1' to the layer's scope)."""
    for part in op_name.split("/"):
        for candidate in (part, re.sub(r"_\d+$", "", part)):
            if candidate in layer_names:
                return candidate
    return None


def trace_ops(logdir: str) -> list[tuple[str, str, int, int]]:
    """Return (op name, op type, start ps, duration ps) of every TensorFlow op in a profiler trace's host plane."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    ops = []
    for root, _, names in os.walk(logdir):
        for file in names:
            if not file.endswith(".xplane.pb"):
                continue
            space = xplane_pb2.XSpace()
            with open(os.path.join(root, file), "rb") as f:
                space.ParseFromString(f.read())
            for plane in space.planes:
                for line in plane.lines:
                    if not line.name.startswith("tf_Compute"):  # the executor threads (not Python, not Eigen)
                        continue
                    for event in line.events:
                        meta = plane.event_metadata[event.metadata_id]
                        if meta.display_name:  # an op; the executor's own spans have no type
                            ops.append((meta.name.split(":")[0], meta.display_name,
                                        line.timestamp_ns * 1000 + event.offset_ps, event.duration_ps))
    return ops


def busy_seconds(ops: list[tuple[str, str, int, int]]) -> float:
    """Return the seconds during which at least one op ran (the union of the ops' intervals)."""
    total, end = 0, None
    for _, _, start, duration in sorted(ops, key=lambda op: op[2]):
        stop = start + duration
        if end is None or start > end:
            total += duration
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1e12


def profile_steps(model: keras.Model, x: np.ndarray, y: np.ndarray, warmup: int = 2, steps: int = 3) -> dict:
    """Return where a train step of compiled `model` on the batch (x, y) goes: seconds per step (wall, summed over
    the ops, busy), and per layer group its ms per step, % of op time and, for the convolutions, GFLOP and TFLOP/s,
    and ms by op type.

    Traces `steps` steps with the TensorFlow profiler and sums the durations of the ops that TensorFlow's
    executor threads ran. With two executor threads ops can overlap, so their sum can exceed the wall time.
    """
    import tensorflow as tf

    for _ in range(warmup):
        model.train_on_batch(x, y)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(x, y)
        wall = time.perf_counter() - start
        tf.profiler.experimental.stop()
        ops = trace_ops(logdir)
    if not ops:
        raise RuntimeError("the TensorFlow profiler recorded no ops")
    flops = {layer.name: layer_flops(layer) for layer in model.layers}
    seconds, kinds, layers = collections.Counter(), collections.Counter(), collections.defaultdict(set)
    for name, kind, _, duration in ops:
        group = op_group(name, kind, model.optimizer.name)
        seconds[group] += duration / 1e12
        kinds[kind] += duration / 1e12
        layers[group].add(layer_of(name, set(flops)))
    op_seconds = sum(seconds.values())
    groups = {}
    for group, s in seconds.most_common():
        groups[group] = {"ms_per_step": 1000 * s / steps, "percent": 100 * s / op_seconds}
        if "convolutions" in group:
            gflop = len(x) * sum(flops.get(layer, 0) for layer in layers[group]) / 1e9
            groups[group].update(gflop_per_step=gflop, tflops=gflop * steps / s / 1e3)
    return {
        "steps": steps, "wall_s_per_step": wall / steps, "op_s_per_step": op_seconds / steps,
        "busy_s_per_step": busy_seconds(ops) / steps,
        "groups": groups,
        "op_types_ms_per_step": {kind: 1000 * s / steps for kind, s in kinds.most_common(15)},
    }


def profile_table(profile: dict) -> str:
    """Return a profile as a text table of layer groups."""
    lines = [f"profile: {profile['filters']} filters, {profile['size']}x{profile['size']}, batch {profile['batch']}, "
             f"{profile['precision']}: {profile['wall_s_per_step']:.3f} s/step wall while tracing, "
             f"ops {profile['op_s_per_step']:.3f} s/step summed over threads, {profile['busy_s_per_step']:.3f} busy",
             f"{'group':>52} {'ms/step':>8} {'% ops':>6} {'TFLOP/s':>8}"]
    for group, g in profile["groups"].items():
        tflops = f"{g['tflops']:8.3f}" if "tflops" in g else ""
        lines.append(f"{group:>52} {g['ms_per_step']:8.1f} {g['percent']:6.1f} {tflops}")
    return "\n".join(lines)
