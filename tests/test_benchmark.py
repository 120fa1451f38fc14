"""benchmark.py: its figures are consistent with each other, its profile accounts for every op, and its command line
writes every part it is asked for."""

import json
import sys
import time
from pathlib import Path

import keras
import pytest

import benchmark
from model import build_unet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import epoch_overhead  # noqa: E402


def test_conv_flops_counts_two_flops_per_multiply_add():
    inputs = keras.Input((8, 10, 3))
    outputs = keras.layers.Conv2D(5, 3, padding="same")(inputs)
    assert benchmark.conv_flops(keras.Model(inputs, outputs)) == 2 * 8 * 10 * 3 * 3 * 3 * 5


def test_seed_model_forward_pass_is_0_437_tflop():
    assert benchmark.conv_flops(build_unet()) / 1e12 == pytest.approx(0.437, abs=0.001)


def test_benchmark_reports_consistent_throughput(tmp_path):
    result = benchmark.benchmark(filters=2, size=32, batch=2, precision="float32", warmup=1, repeats=2)
    step = result["train_s_per_step"]
    assert step["min"] <= step["median"] <= step["max"]
    assert result["train_images_per_s"] == pytest.approx(2 / step["median"])
    assert "float32" in benchmark.table([result])


class Clock:
    """A perf_counter that advances `tick` seconds at every reading."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_pipeline_and_peak_rates_divide_the_work_by_the_measured_time():
    # every timed span lasts 0.5 s by these clocks
    assert benchmark.pipeline_pairs_per_s(64, batches=3, batch_size=2, clock=Clock(0.5)) == pytest.approx(3 * 2 / 0.5)
    assert benchmark.matmul_peak("float32", n=128, repeats=2, clock=Clock(0.5)) == pytest.approx(2 * 128**3 / 0.5 / 1e12)


def test_command_line_writes_json_with_every_part(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert benchmark.main(["--filters", "2", "--size", "32", "--batch", "2", "--warmup", "1", "--repeats", "1",
                           "--pipeline", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["results"][0]["filters"] == 2
    pipeline = saved["pipeline"]
    assert pipeline["training_consumes_per_s"] == saved["results"][0]["train_images_per_s"]
    assert pipeline["ratio"] == pytest.approx(pipeline["pairs_per_s"] / pipeline["training_consumes_per_s"])
    assert "input pipeline" in capsys.readouterr().out


def test_transposed_upsampling_counts_a_quarter_of_the_up_convolution_flops():
    default, transposed = build_unet((32, 32, 1), filters=2), build_unet((32, 32, 1), filters=2, upsampling="transpose")
    up_convs = sum(benchmark.layer_flops(default.get_layer(f"EXP_{i}_conv_0")) for i in range(1, 5))
    transposes = sum(benchmark.layer_flops(transposed.get_layer(f"EXP_{i}_transpose")) for i in range(1, 5))
    assert transposes * 4 == up_convs
    assert benchmark.conv_flops(default) - benchmark.conv_flops(transposed) == up_convs - transposes


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
    assert benchmark.op_group(name, kind) == group


def test_ops_are_traced_to_their_layer():
    names = {"OUT", "OUT_3", "CNT_1_conv_2"}
    assert benchmark.layer_of("gradient_tape/unet_1/OUT_3_1/convolution/Conv2DBackpropFilter", names) == "OUT_3"
    assert benchmark.layer_of("unet_1/OUT_1/convolution", names) == "OUT"
    assert benchmark.layer_of("unet/CNT_1_conv_2/Relu", names) == "CNT_1_conv_2"
    assert benchmark.layer_of("adam/Sub_3", names) is None


def test_profile_accounts_for_every_op_of_the_train_step():
    profile = benchmark.profile_train_step(filters=2, size=32, batch=2, precision="float32", warmup=1, steps=2)
    groups = profile["groups"]
    assert sum(g["percent"] for g in groups.values()) == pytest.approx(100)
    assert sum(g["ms_per_step"] for g in groups.values()) == pytest.approx(1000 * profile["op_s_per_step"])
    for group in ("forward convolutions", "backward convolutions: filter (and bias) gradients", "optimizer update"):
        assert groups[group]["ms_per_step"] > 0
    forward = 2 * benchmark.conv_flops(build_unet((32, 32, 1), filters=2)) / 1e9
    assert groups["forward convolutions"]["gflop_per_step"] == pytest.approx(forward)
    assert 0 < profile["busy_s_per_step"] <= profile["op_s_per_step"] + 1e-9
    assert "profile" in benchmark.profile_table(profile)


def test_options_alternate_each_variant_and_report_per_image_times():
    found = benchmark.options(["batch", "upsampling", "layout"], filters=2, size=32, batch=2, precision="float32",
                              rounds=2)
    assert list(found["batch"]) == ["batch 1", "batch 2", "batch 4"]
    assert found["batch"]["batch 4"]["train_s_per_image"] == pytest.approx(
        found["batch"]["batch 4"]["train_s_per_step"]["median"] / 4)
    assert set(found["upsampling"]) == {"upsample", "transpose"}
    assert all(row["rounds"] == 2 for row in found["upsampling"].values())
    assert {"channels_last", "channels_first"} <= set(found["layout"])


def test_normalisation_and_runtime_options_time_each_kind(unet_path):
    import model

    found = benchmark.options(["normalisation", "runtime"], filters=2, size=32, batch=2, precision="float32",
                              rounds=1, model_path=str(unet_path))
    assert list(found["normalisation"]) == ["none", "keras BatchNormalization", "fused (model.py)"]
    assert model.FusedBatchNormalization.__name__ == "FusedBatchNormalization"  # put back after the Keras variant
    runtime = found["runtime"]
    assert set(runtime) == {"keras, unfolded (before)", "keras (auto precision)", "keras float32", "onnxruntime"}
    assert runtime["keras, unfolded (before)"]["max_difference"] is None
    assert runtime["keras float32"]["max_difference"] == 0 and runtime["onnxruntime"]["max_difference"] < 1e-4
    assert "per 576x576 tile" in benchmark.options_table("runtime", runtime)


def test_thread_settings_run_in_a_fresh_process():
    row = benchmark.benchmark_process(["--filters", "2", "--size", "32", "--batch", "2", "--precision", "float32",
                                       "--warmup", "1", "--repeats", "1", "--threads", "1,1"])
    assert row["threads"] == {"intra_op": 1, "inter_op": 1}
    step = row["train_s_per_step"]
    assert step["min"] <= step["median"] <= step["max"] and row["train_images_per_s"] == pytest.approx(2 / step["median"])


def test_bad_thread_setting_is_one_error_line(capsys):
    assert benchmark.main(["--threads", "two", "--out", "unused.json"]) == 1
    assert "error: --threads" in capsys.readouterr().err


def test_epoch_overhead_charges_each_moment_of_an_epoch_once(isbi_dir):
    began = time.perf_counter()
    found = epoch_overhead.measure("tiny", epochs=3, steps=4, data_dir=str(isbi_dir))
    parts = found["seconds_per_epoch"]
    assert found["steps_per_epoch"] == 4 and found["bare_step"] > 0 and found["augmentation_in_its_thread"] > 0
    assert {"ImageHistory", "ModelCheckpoint", "TensorBoard", "StepBackup", "steps", "keras validation",
            "waiting for the next batch"} <= set(parts)
    assert all(seconds >= 0 for seconds in parts.values())
    assert 2 * sum(parts.values()) < time.perf_counter() - began  # two epochs of the three, and no more
    assert "epoch / train steps in fit" in epoch_overhead.table(found)
