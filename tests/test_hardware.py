"""hardware.py: the precision follows the CPU's instructions, and mixed float16 trains with loss scaling."""

import math

import pytest

import hardware
import train

AMX = frozenset({"avx512f", "amx_bf16", "amx_tile"})
ZEN4 = frozenset({"avx512f", "avx512_bf16"})
AVX2 = frozenset({"avx2", "fma"})


@pytest.mark.parametrize("gpus, flags, expected", [
    (["/physical_device:GPU:0"], AVX2, "mixed_float16"),
    ([], AMX, "mixed_bfloat16"),
    ([], ZEN4, "mixed_bfloat16"),
    ([], AVX2, "float32"),
])
def test_auto_picks_the_fastest_precision_of_the_hardware(monkeypatch, gpus, flags, expected):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert hardware.choose_precision("auto", gpus=gpus, flags=flags) == expected


@pytest.mark.parametrize("cap, expected", [
    ("", "mixed_bfloat16"), ("avx512_core_amx", "mixed_bfloat16"), ("AVX512_CORE_BF16", "mixed_bfloat16"),
    ("avx512_core", "float32"), ("AVX2", "float32"),
])
def test_a_onednn_cap_below_bf16_turns_a_bf16_cpu_into_a_float32_one(monkeypatch, cap, expected):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert hardware.choose_precision("auto", gpus=[], flags=AMX) == expected
    assert ("oneDNN capped at" in hardware.describe()) == bool(cap)


def test_a_requested_precision_wins_and_an_unknown_one_is_refused():
    assert hardware.choose_precision("float32", gpus=["GPU:0"], flags=AMX) == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        hardware.choose_precision("float8")


@pytest.mark.skipif(hardware.onednn_capped_below_bf16(), reason="oneDNN capped below its float16 kernels")
def test_mixed_float16_training_scales_its_loss_and_resumes(isbi_dir, tmp_path):
    import keras

    settings = train.preset("tiny", data_dir=str(isbi_dir), run_dir=str(tmp_path / "run"), epochs=1,
                            steps_per_epoch=1, precision="mixed_float16")  # float16 is slow on a CPU
    result = train.train(settings)
    assert all(math.isfinite(loss) for loss in result["history"]["loss"])
    model = train.load_checkpoint(result["last"])
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.get_layer("CNT_1_conv_1").compute_dtype == "float16"
    assert model.get_layer("OUT").compute_dtype == "float32"
    resumed = train.train(train.preset("tiny", data_dir=str(isbi_dir), run_dir=settings.run_dir, epochs=2,
                                       steps_per_epoch=1, precision="mixed_float16"))
    assert len(resumed["history"]["loss"]) == 1
