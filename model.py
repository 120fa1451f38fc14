"""The U-Net of the original notebook, as a plain Keras 3 builder.

Reference: Ronneberger, Fischer and Brox, "U-Net: Convolutional Networks for
Biomedical Image Segmentation", MICCAI 2015 (arXiv:1505.04597). Knows nothing
of data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import numpy as np
from keras import layers

import compact
import hardware
from files import DataError, error_reason, write_atomic
from shapes import DEPTH, SIZE_MULTIPLE


@keras.saving.register_keras_serializable(package="unet_isbi")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras's `BatchNormalization` (the same math, weights and configuration) whose training steps run on
    TensorFlow's fused kernel, which oneDNN runs in one pass forwards and one backwards; Keras 3 builds it from
    separate ops (keras-team/keras-core#225), which cost the CPU preset's train step half again. Inference,
    other backends and other axes use Keras's own computation."""

    def call(self, inputs, training=None, mask=None):
        # Inference stays on Keras's own ops: with the fused kernel there, TensorFlow fuses it into the
        # convolution before it (Conv2D + FusedBatchNorm + ReLU), which under oneDNN's AVX2 kernels made
        # whole-page prediction 8x slower (3.0 s against 0.36 s per 512 x 512 page, 16 filters).
        if keras.backend.backend() != "tensorflow" or self.axis not in (-1, len(inputs.shape) - 1) or \
                len(inputs.shape) != 4 or not (self.center and self.scale and training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, self.gamma, self.beta, epsilon=self.epsilon, data_format="NHWC", is_training=True)
        # The kernel returns the unbiased variance; Keras normalises and averages with the biased one.
        count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.float32)
        variance = variance * (count - 1.0) / count
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return outputs


def conv_relu(x, filters: int, size: int, padding: str, name: str, dtype=None, batch_norm: bool = False):
    """A `size`x`size` convolution `name` + ReLU; with `batch_norm`, the convolution loses its bias
    and `name`_bn (batch normalisation, `FusedBatchNormalization`) comes before the ReLU `name`_relu."""
    if not batch_norm:
        return layers.Conv2D(filters, size, activation="relu", padding=padding, name=name, dtype=dtype)(x)
    x = layers.Conv2D(filters, size, padding=padding, use_bias=False, name=name, dtype=dtype)(x)
    # Momentum 0.9, not Keras' 0.99: after a few hundred steps 0.99 still carries enough of the initial
    # moving variance (1.0) to swamp the first layers' small activation variances at inference.
    x = FusedBatchNormalization(momentum=0.9, name=f"{name}_bn", dtype=dtype)(x)
    return layers.ReLU(name=f"{name}_relu", dtype=dtype)(x)


def conv_block(x, filters: int, padding: str, name: str, dtype=None, batch_norm: bool = False):
    """Two 3x3 convolutions + ReLU: `name`_conv_1, `name`_conv_2."""
    for i in (1, 2):
        x = conv_relu(x, filters, 3, padding, f"{name}_conv_{i}", dtype, batch_norm)
    return x


def contracting_block(x, filters: int, padding: str, name: str, pool: bool = True, dtype=None,
                      batch_norm: bool = False):
    """2x2 max-pool (unless `pool` is False), then `conv_block`."""
    if pool:
        x = layers.MaxPooling2D(2, name=f"{name}_maxpool", dtype=dtype)(x)
    return conv_block(x, filters, padding, name, dtype, batch_norm)


def center_crop(skip, target, name: str, dtype=None):
    """Crop `skip` symmetrically to the spatial size of `target` (static shapes only)."""
    dh = skip.shape[1] - target.shape[1]
    dw = skip.shape[2] - target.shape[2]
    if dh is None or dw is None:
        raise ValueError("'valid' padding needs a fixed input size (no None dimensions)")
    return layers.Cropping2D(((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)), name=f"{name}_crop", dtype=dtype)(skip)


def expanding_block(x, skip, filters: int, padding: str, name: str, dtype=None, upsampling: str = "upsample",
                    batch_norm: bool = False):
    """Upsample x2, 2x2 conv + ReLU, concatenate with the (cropped) skip, then `conv_block`.

    upsampling='transpose' replaces the upsampling and 2x2 conv by one 2x2 transposed convolution of
    stride 2 + ReLU, `name`_transpose: the same parameters, a quarter of that step's FLOPs.
    """
    if upsampling == "transpose":
        x = layers.Conv2DTranspose(filters, 2, strides=2, activation="relu", name=f"{name}_transpose", dtype=dtype)(x)
    else:
        x = layers.UpSampling2D(2, name=f"{name}_upscaling", dtype=dtype)(x)
        # The 2x2 "up-convolution" keeps the size, as in the paper, whatever the padding.
        x = conv_relu(x, filters, 2, "same", f"{name}_conv_0", dtype, batch_norm)
    if padding == "valid":
        skip = center_crop(skip, x, name, dtype)
    x = layers.Concatenate(axis=-1, name=f"{name}_concat1", dtype=dtype)([skip, x])
    return conv_block(x, filters, padding, name, dtype, batch_norm)


def _checked_head(input_shape, filters, padding, upsampling, out_channels, head_filters) -> int:
    """Return the head's filters (None: 2 per output) after checking `build_unet`'s arguments (ValueError)."""
    if padding not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
    if upsampling not in ("upsample", "transpose"):
        raise ValueError(f"upsampling must be 'upsample' or 'transpose', got {upsampling!r}")
    if filters < 1 or out_channels < 1:
        raise ValueError(f"filters and out_channels must be positive integers, got {filters!r}, {out_channels!r}")
    head_filters = 2 * out_channels if head_filters is None else head_filters
    if head_filters < 1:
        raise ValueError(f"head_filters must be a positive integer or None, got {head_filters!r}")
    if padding == "same":
        for size in input_shape[:2]:
            if size is not None and size % SIZE_MULTIPLE:
                raise ValueError(f"with 'same' padding the input size must be a multiple of {SIZE_MULTIPLE}, "
                                 f"got {input_shape}")
    return head_filters


def build_unet(
    input_shape: tuple = (512, 512, 1),
    filters: int = 64,
    padding: str = "same",
    dtype_policy: str | None = None,
    name: str = "unet",
    upsampling: str = "upsample",
    batch_norm: bool = False,
    out_channels: int = 1,
    head_filters: int | None = None,
) -> keras.Model:
    """Return the original notebook's U-Net (31,031,685 parameters at the defaults).

    Args:
        input_shape: (height, width, channels); height and width may be None
            for any size. With 'same' padding sizes must be multiples of 16;
            with 'valid' they must make every pooled size even (572 is the
            paper's example) and the output is smaller (see `output_size`).
        filters: width of the first block; block k has filters * 2**k.
        padding: 'same' (output size = input size) or 'valid' (the paper's).
        dtype_policy: a Keras dtype policy such as 'mixed_bfloat16' for every
            layer but the sigmoid output, which always computes in float32.
        name: the model's name.
        upsampling: 'upsample' (the original's: nearest-neighbour x2, then a
            2x2 convolution) or 'transpose' (one 2x2 transposed convolution
            of stride 2; same parameter count, an option only, see
            docs/PERFORMANCE.md).
        batch_norm: batch normalisation between every 3x3 (and 2x2 up-)
            convolution and its ReLU, the convolutions without bias (not in
            the original; faster convergence for short runs).
        out_channels: sigmoid outputs; 1 is the original's membrane map, more
            are affinities (affinities.py).
        head_filters: ReLU filters of the 3x3 layer before the output; None is
            the original's 2 per output channel. With so few, a run can train
            both onto one side of the membrane, leaving the other side flat
            (docs/EXPERIMENTS.md); more keep every run's map spanning 0 to 1.

    Output: per-pixel probability of "cell" (1) against membrane (0), float32,
    or of "same cell" per affinity channel.
    """
    head_filters = _checked_head(input_shape, filters, padding, upsampling, out_channels, head_filters)
    inputs = keras.Input(shape=input_shape, name="image")
    skips = []
    x = inputs
    for level in range(DEPTH + 1):
        x = contracting_block(x, filters * 2**level, padding, f"CNT_{level + 1}", pool=level > 0, dtype=dtype_policy,
                              batch_norm=batch_norm)
        skips.append(x)
    for step, level in enumerate(reversed(range(DEPTH))):
        x = expanding_block(x, skips[level], filters * 2**level, padding, f"EXP_{step + 1}", dtype=dtype_policy,
                            upsampling=upsampling, batch_norm=batch_norm)
    x = layers.Conv2D(head_filters, 3, activation="relu", padding=padding, name="OUT_3", dtype=dtype_policy)(x)
    outputs = layers.Conv2D(out_channels, 1, activation="sigmoid", name="OUT", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def output_size(input_size: int, padding: str = "same") -> int:
    """Return the output height (or width) in pixels for an input of `input_size` pixels."""
    if padding == "same":
        return input_size
    size = input_size
    for _ in range(DEPTH):
        size = (size - 4) // 2
    size -= 4
    for _ in range(DEPTH):
        size = size * 2 - 4
    return size - 2  # OUT_3


def with_dtype_policy(model: keras.Model, dtype_policy: str) -> keras.Model:
    """Return a copy of `model` whose layers compute in `dtype_policy` (the output layer stays float32),
    with the same weights and no optimizer."""
    def clone(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer) and layer.name != "OUT":
            config["dtype"] = dtype_policy
        return layer.__class__.from_config(config)

    uncompiled = keras.Model(model.inputs, model.outputs, name=model.name)  # clone_model would recompile
    copy = keras.models.clone_model(uncompiled, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def fold_batch_norm(model: keras.Model) -> keras.Model:
    """Return a copy of a `build_unet(batch_norm=True)` model with each batch normalisation folded into the
    convolution before it (inference only: the moving statistics become the kernel's scale and a bias), so that
    it has no normalisation layers and computes the same function in fewer operations; other models unchanged.

    For a convolution W (no bias) and normalisation (gamma, beta, moving mean m and variance v, epsilon e):
    scale = gamma / sqrt(v + e), W' = W * scale per output channel, b' = beta - m * scale.
    """
    names = {layer.name for layer in model.layers}
    if not any(name.endswith("_bn") for name in names):
        return model
    first = model.get_layer("CNT_1_conv_1")
    folded = build_unet(
        model.input_shape[1:], filters=first.filters, padding=first.padding, dtype_policy=first.dtype_policy.name,
        name=model.name, upsampling="transpose" if any(name.endswith("_transpose") for name in names) else "upsample",
        out_channels=model.get_layer("OUT").filters, head_filters=model.get_layer("OUT_3").filters,
    )
    for layer in folded.layers:
        if not layer.weights:
            continue
        source = model.get_layer(layer.name)
        if f"{layer.name}_bn" not in names:
            layer.set_weights(source.get_weights())
            continue
        norm = model.get_layer(f"{layer.name}_bn")
        gamma, beta, mean, variance = (np.asarray(w, np.float64) for w in norm.get_weights())
        scale = gamma / np.sqrt(variance + norm.epsilon)
        (kernel,) = source.get_weights()
        layer.set_weights([(kernel * scale).astype(np.float32), (beta - mean * scale).astype(np.float32)])
    return folded


def inference_model(model: keras.Model, float32: bool = False) -> keras.Model:
    """Return `model` for inference, the one place that makes it: its layers as a model with no optimizer and no
    compile config, the batch normalisation folded into the convolutions (`fold_batch_norm`); with `float32`,
    computing in float32 whatever its precision (`with_dtype_policy`), as the shipped model, the portable
    exports and the ONNX runtime take it.

    Saved, it holds Keras layers only, so it loads with plain
    `keras.models.load_model(path)` in a process that never imported this
    project (Keras 3 does not import the module of a custom loss or metric
    named in a compile config; it fails instead).
    """
    folded = fold_batch_norm(keras.Model(model.inputs, model.outputs, name=model.name))
    return with_dtype_policy(folded, "float32") if float32 else folded


def save_compact(model: keras.Model, path: str | os.PathLike) -> Path:
    """Write `model` (Keras layers only, as `inference_model` makes it) to `path` as a compact .npz, its kernels in
    8 bits (`compact`): a quarter of a .keras file, the way a model is shipped in the repository; return the path."""
    return write_atomic(path, lambda tmp: compact.write(tmp, model.to_json(), model.get_weights()))


def load_model(path: str | os.PathLike, precision: str | None = None, custom_objects: dict | None = None) -> keras.Model:
    """Return the Keras model saved at `path` (a .keras file, or a compact .npz: `save_compact`); the one place
    that loads Keras models.

    Without `custom_objects` the model is loaded for inference: layers and
    weights only (no optimizer, no compile config, so no training code is
    needed), recast to `precision` if given (e.g. 'auto', see
    `hardware.choose_precision`). With `custom_objects` (the losses and
    metrics it was compiled with) it is loaded whole, optimizer included, to
    train on. DataError if the file is missing or not a Keras model.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such model file")
    if compact.is_compact(path) and custom_objects is not None:
        raise DataError(f"{path}: a compact model holds no optimizer to train on; resume from a run's .keras file")
    try:
        if compact.is_compact(path):
            model = keras.models.model_from_json(json.dumps(compact.read_config(path)))
            model.set_weights(compact.read_weights(path))
        else:
            model = keras.models.load_model(path, custom_objects=custom_objects, compile=custom_objects is not None)
    except Exception as err:  # Keras raises many types for files that are not its models
        raise DataError(f"{path}: not a Keras model this project can load ({error_reason(err)})") from err
    if precision is None:
        return model
    policy = hardware.choose_precision(precision)
    if model.get_layer("CNT_1_conv_1").dtype_policy.name == policy:
        return model
    return with_dtype_policy(model, policy)
