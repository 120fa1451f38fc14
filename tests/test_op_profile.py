"""op_profile.py: the convolutions' FLOPs, and a train step's profile that groups every op by its scope and type."""

import keras
import pytest

import benchmark
import op_profile
from model import build_unet


def test_conv_flops_counts_two_flops_per_multiply_add():
    inputs = keras.Input((8, 10, 3))
    outputs = keras.layers.Conv2D(5, 3, padding="same")(inputs)
    assert op_profile.conv_flops(keras.Model(inputs, outputs)) == 2 * 8 * 10 * 3 * 3 * 3 * 5


def test_seed_model_forward_pass_is_0_437_tflop():
    assert op_profile.conv_flops(build_unet()) / 1e12 == pytest.approx(0.437, abs=0.001)


def test_transposed_upsampling_counts_a_quarter_of_the_up_convolution_flops():
    default, transposed = build_unet((32, 32, 1), filters=2), build_unet((32, 32, 1), filters=2, upsampling="transpose")
    up_convs = sum(op_profile.layer_flops(default.get_layer(f"EXP_{i}_conv_0")) for i in range(1, 5))
    transposes = sum(op_profile.layer_flops(transposed.get_layer(f"EXP_{i}_transpose")) for i in range(1, 5))
    assert transposes * 4 == up_convs
    assert op_profile.conv_flops(default) - op_profile.conv_flops(transposed) == up_convs - transposes


@pytest.mark.parametrize("name, kind, group", [
    ("unet_1/CNT_1_conv_2_1/Relu", "_MklNativeFusedConv2D", "forward convolutions"),
    ("unet_1/EXP_1_transpose_1/conv_transpose", "Conv2DBackpropInput", "forward convolutions"),
    ("gradient_tape/unet_1/EXP_4_conv_1_1/convolution/Conv2DBackpropFilter", "_MklNativeConv2DBackpropFilterWithBias",
     "backward convolutions: filter (and bias) gradients"),
    ("gradient_tape/unet_1/EXP_1_conv_1_1/convolution/Conv2DBackpropInput", "_MklNativeConv2DBackpropInput",
     "backward convolutions: input gradients"),
    ("gradient_tape/unet_1/EXP_1_upscaling_1/Repeat_1/Sum", "Sum", "upsampling"),
    ("gradient_tape/unet_1/EXP_3_concat1_1/Slice", "Slice", "concatenation"),
    ("unet_1/CNT_2_maxpool_1/MaxPoolNd", "_MklNativeMaxPool", "pooling"),
    ("gradient_tape/unet_1/EXP_4_conv_2_1/ReluGrad", "ReluGrad", "ReLU gradients"),
    ("adam/Sub_3", "Sub", "optimizer update"),
    ("unet_1/CNT_1_conv_1_1/convolution/Cast", "Cast", "casts"),
    ("compile_loss/binary_crossentropy/logistic_loss/Exp", "Exp", "loss"),
    ("AddN_4", "AddN", "other"),
])
def test_ops_are_grouped_by_their_scope_and_type(name, kind, group):
    assert op_profile.op_group(name, kind) == group


def test_ops_are_traced_to_their_layer():
    names = {"OUT", "OUT_3", "CNT_1_conv_2"}
    assert op_profile.layer_of("gradient_tape/unet_1/OUT_3_1/convolution/Conv2DBackpropFilter", names) == "OUT_3"
    assert op_profile.layer_of("unet_1/OUT_1/convolution", names) == "OUT"
    assert op_profile.layer_of("unet/CNT_1_conv_2/Relu", names) == "CNT_1_conv_2"
    assert op_profile.layer_of("adam/Sub_3", names) is None


def test_profile_accounts_for_every_op_of_the_train_step():
    profile = benchmark.profile_train_step(filters=2, size=32, batch=2, precision="float32", warmup=1, steps=2)
    groups = profile["groups"]
    assert sum(g["percent"] for g in groups.values()) == pytest.approx(100)
    assert sum(g["ms_per_step"] for g in groups.values()) == pytest.approx(1000 * profile["op_s_per_step"])
    for group in ("forward convolutions", "backward convolutions: filter (and bias) gradients", "optimizer update"):
        assert groups[group]["ms_per_step"] > 0
    forward = 2 * op_profile.conv_flops(build_unet((32, 32, 1), filters=2)) / 1e9
    assert groups["forward convolutions"]["gflop_per_step"] == pytest.approx(forward)
    assert 0 < profile["busy_s_per_step"] <= profile["op_s_per_step"] + 1e-9
    assert "profile" in op_profile.profile_table(profile)
