import json

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


def test_pipeline_and_peak_measurements_are_positive():
    assert benchmark.pipeline_pairs_per_s(64, batches=2, batch_size=2) > 0
    assert benchmark.matmul_peak("float32", n=128, repeats=1) > 0


def test_command_line_writes_json_with_every_part(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert benchmark.main(["--filters", "2", "--size", "32", "--batch", "2", "--warmup", "1", "--repeats", "1",
                           "--pipeline", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["results"][0]["filters"] == 2
    assert saved["pipeline"]["ratio"] > 0
    assert "input pipeline" in capsys.readouterr().out
