"""benchmark.py: its figures are consistent with each other, its options alternate their variants, and its command
line writes every part it is asked for (the FLOPs and the per-op profile: test_op_profile.py)."""

import json
import sys
import time
from pathlib import Path

import pytest

import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import epoch_overhead  # noqa: E402


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


def test_a_preset_fills_only_the_sizes_not_given():
    parse = benchmark.build_parser().parse_args
    assert vars(benchmark.with_preset(parse(["--preset", "cpu", "--filters", "24"]))).items() >= {
        "filters": 24, "size": 256, "batch": 4, "batch_norm": True}.items()
    assert vars(benchmark.with_preset(parse([]))).items() >= {"filters": 64, "size": 512, "batch": 5, "batch_norm": False}.items()
