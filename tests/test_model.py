"""model.py: the U-Net's shapes, parameters and options, precision policies, and loading a saved model."""

import keras
import numpy as np
import pytest
from conftest import bf16_refused

import files
import hardware
import runtimes
import train
from model import build_unet, load_model, output_size, with_dtype_policy


def test_default_model_has_original_parameter_count_and_layer_names():
    model = build_unet()
    assert model.count_params() == 31_031_685
    names = [layer.name for layer in model.layers]
    for expected in ["CNT_1_conv_1", "CNT_2_maxpool", "CNT_5_conv_2", "EXP_1_upscaling", "EXP_1_conv_0",
                     "EXP_1_concat1", "EXP_4_conv_2", "OUT_3", "OUT"]:
        assert expected in names
    assert names[-1] == "OUT"
    assert model.output_shape == (None, 512, 512, 1)


@pytest.mark.parametrize("shape", [(48, 80), (16, 16), (112, 64)])
def test_any_size_multiple_of_16_keeps_its_shape(shape):
    model = build_unet((None, None, 1), filters=2)
    out = model.predict_on_batch(np.random.rand(2, *shape, 1).astype("float32"))
    assert out.shape == (2, *shape, 1)
    assert np.all((out >= 0) & (out <= 1))


def test_size_not_multiple_of_16_is_refused_with_the_shape():
    with pytest.raises(ValueError, match="multiple of 16"):
        build_unet((100, 100, 1), filters=2)


@pytest.mark.parametrize("size", [188, 572])
def test_valid_padding_output_size_matches_formula_and_crops_skips(size):
    model = build_unet((size, size, 1), filters=2, padding="valid")
    assert model.output_shape[1:3] == (output_size(size, "valid"),) * 2
    assert "EXP_1_crop" in [layer.name for layer in model.layers]
    assert output_size(572, "valid") == 386  # the paper's 388 minus the OUT_3 3x3 conv


@pytest.mark.skipif(bf16_refused(), reason="oneDNN capped below its bfloat16 kernels")
def test_bfloat16_policy_keeps_float32_output():
    model = build_unet((32, 32, 1), filters=2, dtype_policy="mixed_bfloat16")
    assert model.get_layer("CNT_1_conv_1").compute_dtype == "bfloat16"
    assert model.predict_on_batch(np.zeros((1, 32, 32, 1), "float32")).dtype == np.float32


def test_bad_padding_is_refused():
    with pytest.raises(ValueError, match="padding"):
        build_unet(padding="full")


@pytest.mark.parametrize("padding, size", [("same", 32), ("valid", 188)])
def test_transposed_upsampling_option_trains_a_step_with_the_default_shapes(padding, size):
    default = build_unet((size, size, 1), filters=2, padding=padding)
    model = build_unet((size, size, 1), filters=2, padding=padding, upsampling="transpose")
    names = [layer.name for layer in model.layers]
    assert "EXP_1_transpose" in names and "EXP_1_upscaling" not in names and "EXP_1_conv_0" not in names
    assert model.output_shape == default.output_shape
    assert model.count_params() == default.count_params()  # a 2x2 kernel either way
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    x = np.random.default_rng(0).random((2, size, size, 1), dtype=np.float32)
    y = np.zeros((2, *model.output_shape[1:]), np.float32)
    before = model.get_layer("EXP_1_transpose").get_weights()[0].copy()
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    assert not np.allclose(model.get_layer("EXP_1_transpose").get_weights()[0], before)


def test_unknown_upsampling_is_refused():
    with pytest.raises(ValueError, match="upsampling"):
        build_unet((32, 32, 1), filters=2, upsampling="bilinear")


def test_batch_norm_option_normalises_every_convolution_but_the_head(tmp_path):
    plain = build_unet((32, 32, 1), filters=2)
    model = build_unet((32, 32, 1), filters=2, batch_norm=True)
    convs = [layer.name for layer in plain.layers if isinstance(layer, keras.layers.Conv2D)]
    normalised = [name for name in convs if name not in ("OUT_3", "OUT")]
    names = [layer.name for layer in model.layers]
    assert all(f"{name}_bn" in names and f"{name}_relu" in names for name in normalised)
    assert not any(model.get_layer(name).use_bias for name in normalised)
    # Each normalised convolution trades its bias (1 per channel) for 4 per channel (2 trained, 2 moving).
    channels = sum(plain.get_layer(name).filters for name in normalised)
    assert model.count_params() == plain.count_params() + 3 * channels
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    x = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    model.train_on_batch(x, (x > 0.5).astype(np.float32))
    moving = model.get_layer("CNT_1_conv_1_bn").moving_mean.numpy()
    assert not np.allclose(moving, 0)  # the moving statistics follow the training batches
    model.save(tmp_path / "bn.keras")
    loaded = keras.models.load_model(tmp_path / "bn.keras", compile=False)
    np.testing.assert_allclose(loaded.predict_on_batch(x), model.predict_on_batch(x), atol=1e-6)


def test_a_model_file_that_is_not_a_model_gives_a_data_error(not_models, tmp_path):
    for path in not_models + [tmp_path / "missing.keras"]:
        for load in (load_model, train.load_checkpoint):  # for inference, and whole to train on
            with pytest.raises(files.DataError) as error:
                load(path)
            assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


@pytest.mark.skipif(bf16_refused(), reason="oneDNN capped below its bfloat16 kernels")
def test_load_model_recasts_to_the_requested_precision(tmp_path):
    model = build_unet((None, None, 1), filters=2, dtype_policy="mixed_bfloat16")
    model.save(tmp_path / "m.keras")
    recast = runtimes.load_model(tmp_path / "m.keras", precision="float32")
    assert recast.get_layer("CNT_1_conv_1").compute_dtype == "float32"
    assert recast.get_layer("OUT").compute_dtype == "float32"
    back = with_dtype_policy(recast, "mixed_bfloat16")
    x = np.random.default_rng(1).random((1, 32, 32, 1), dtype=np.float32)
    np.testing.assert_array_equal(back.predict_on_batch(x), model.predict_on_batch(x))


@pytest.mark.parametrize("policy", ["float32", pytest.param("mixed_bfloat16", marks=pytest.mark.skipif(
    bf16_refused(), reason="oneDNN capped below its bfloat16 kernels")), pytest.param("mixed_float16",
    marks=pytest.mark.skipif(hardware.onednn_capped_below_bf16(), reason="oneDNN capped below its float16 kernels"))])
def test_each_precision_policy_builds_trains_a_step_and_predicts(policy):
    import keras

    model = build_unet((None, None, 1), filters=2, dtype_policy=policy)
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    x = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    loss = model.train_on_batch(x, (x > 0.5).astype("float32"))
    assert np.isfinite(loss)
    out = model.predict_on_batch(x)
    assert out.dtype == np.float32 and out.shape == x.shape


def test_an_affinity_head_has_one_sigmoid_channel_per_offset():
    model = build_unet((32, 32, 1), filters=2, out_channels=8)
    assert model.output_shape == (None, 32, 32, 8)
    assert model.get_layer("OUT_3").filters == 16 and model.get_layer("OUT").activation.__name__ == "sigmoid"
    with pytest.raises(ValueError, match="out_channels"):
        build_unet((32, 32, 1), filters=2, out_channels=0)


def test_a_wider_head_is_an_option_and_the_default_keeps_the_originals_two_filters():
    assert build_unet((32, 32, 1), filters=2).get_layer("OUT_3").filters == 2
    wide = build_unet((32, 32, 1), filters=2, head_filters=12)
    assert wide.get_layer("OUT_3").filters == 12 and wide.output_shape == (None, 32, 32, 1)
    with pytest.raises(ValueError, match="head_filters"):
        build_unet((32, 32, 1), filters=2, head_filters=0)


@pytest.mark.parametrize("upsampling, channels", [("upsample", 1), ("transpose", 8)])
def test_folding_the_normalisation_into_the_convolutions_keeps_the_outputs_and_drops_the_layers(upsampling, channels):
    from model import fold_batch_norm, inference_model

    model = build_unet((None, None, 1), filters=4, batch_norm=True, upsampling=upsampling, out_channels=channels,
                       head_filters=5)
    rng = np.random.default_rng(0)
    for layer in model.layers:  # moving statistics and affine parameters far from their initial values
        if layer.name.endswith("_bn"):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 2, gamma.shape), rng.normal(0, 0.5, beta.shape),
                               rng.normal(0, 0.5, mean.shape), rng.uniform(0.2, 3, variance.shape)])
    x = rng.random((2, 48, 64, 1)).astype(np.float32)
    folded = inference_model(model)
    assert not [layer.name for layer in folded.layers if "_bn" in layer.name or "_relu" in layer.name]
    assert folded.count_params() < model.count_params() and folded.get_layer("OUT_3").filters == 5
    np.testing.assert_allclose(folded.predict_on_batch(x), model.predict_on_batch(x), atol=2e-5)
    plain = build_unet((None, None, 1), filters=4)
    assert fold_batch_norm(plain) is plain


def test_the_float32_inference_model_is_folded_without_optimizer_whatever_the_models_precision():
    from model import inference_model

    model = build_unet((None, None, 1), filters=4, batch_norm=True, dtype_policy="mixed_bfloat16")
    model.compile("adam", "binary_crossentropy")
    portable = inference_model(model, float32=True)
    assert {layer.compute_dtype for layer in portable.layers if layer.weights} == {"float32"}
    assert not [layer.name for layer in portable.layers if layer.name.endswith("_bn")]
    assert getattr(portable, "optimizer", None) is None
    x = np.random.default_rng(0).random((1, 32, 48, 1)).astype(np.float32)
    reference = with_dtype_policy(model, "float32").predict_on_batch(x)  # unfolded, in float32
    np.testing.assert_allclose(portable.predict_on_batch(x), reference, atol=2e-5)
    assert inference_model(model).get_layer("CNT_1_conv_1").compute_dtype == "bfloat16"  # its own precision kept


def test_the_fused_normalisation_computes_what_keras_batch_normalization_does():
    from model import FusedBatchNormalization

    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (3, 8, 10, 5)).astype(np.float32)
    ours, theirs = FusedBatchNormalization(momentum=0.9), keras.layers.BatchNormalization(momentum=0.9)
    weights = [rng.uniform(0.5, 2, 5), rng.normal(0, 1, 5), np.zeros(5), np.ones(5)]
    for layer in (ours, theirs):
        layer.build(x.shape)
        layer.set_weights(weights)
    np.testing.assert_allclose(ours(x, training=True), theirs(x, training=True), atol=2e-5)
    for mine, keras_weight in zip(ours.get_weights(), theirs.get_weights()):  # moving statistics updated alike
        np.testing.assert_allclose(mine, keras_weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours(x, training=False), theirs(x, training=False), atol=2e-5)


def test_training_with_the_fused_normalisation_follows_keras_losses_over_50_steps(monkeypatch):
    import model

    rng = np.random.default_rng(0)
    x = rng.random((4, 64, 64, 1)).astype(np.float32)
    y = (rng.random((4, 64, 64, 1)) > 0.3).astype(np.float32)
    losses = {}
    for kind in ("keras", "fused"):
        if kind == "keras":
            monkeypatch.setattr(model, "FusedBatchNormalization", keras.layers.BatchNormalization)
        else:
            monkeypatch.undo()
        keras.utils.set_random_seed(0)
        unet = build_unet((None, None, 1), filters=4, batch_norm=True)
        unet.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
        losses[kind] = [float(unet.train_on_batch(x, y)) for _ in range(50)]
    assert losses["fused"][0] == pytest.approx(losses["keras"][0], rel=1e-6)
    # float rounding differs between the two computations and Adam carries it on: close, not bit-equal
    np.testing.assert_allclose(losses["fused"], losses["keras"], rtol=2e-2)
    assert losses["fused"][-1] < losses["fused"][0] - 0.1
