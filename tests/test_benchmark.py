import keras
import pytest

import benchmark
from model import build_unet


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
