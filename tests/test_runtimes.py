"""runtimes.py: the model card beside a model, and the segmentation it names (the loaders are tested in test_export)."""

import json
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import affinities
import cards
import runtimes
import segment


def test_card_path_sits_beside_the_model():
    assert cards.card_path("models/unet-isbi-cpu.npz").as_posix() == "models/unet-isbi-cpu.json"
    assert cards.card_path("runs/cpu/best.keras").as_posix() == "runs/cpu/best.json"
    assert cards.card_path("dist/savedmodel").as_posix() == "dist/savedmodel.json"


def test_without_a_card_a_membrane_model_gets_the_multicut_and_an_affinity_model_the_mutex_watershed(tmp_path):
    model = tmp_path / "best.keras"
    assert cards.model_card(model) == {}
    assert cards.ModelIO().segmentation(model) == ("multicut", segment.SegmentParams(), None)
    assert cards.ModelIO(channels=8).segmentation(model) == ("mws", segment.SegmentParams(), affinities.OFFSETS)
    with pytest.raises(ValueError, match="4 channels but 8 offsets"):
        cards.ModelIO(channels=4)


def test_a_run_folder_gives_its_offsets_and_a_card_its_tuned_parameters(tmp_path):
    model = tmp_path / "best.keras"
    (tmp_path / "settings.json").write_text(json.dumps({"target": "affinities", "offsets": "1,3"}))
    io = cards.model_io(model)  # not written yet: the run's settings say
    assert io == cards.ModelIO(1, 4, ((-1, 0), (0, -1), (-3, 0), (0, -3))) and io.is_affinities
    method, params, offsets = io.segmentation(model)
    assert method == "mws" and offsets == ((-1, 0), (0, -1), (-3, 0), (0, -3))
    card = {"segmentation": {"method": "mws", "params": {"min_size": 25, "strides": [1, 1]}},
            "training": {"settings": {"target": "affinities", "offsets": "1,3"}}}
    cards.card_path(model).write_text(json.dumps(card))
    assert io.segmentation(model)[1] == segment.SegmentParams(min_size=25, strides=(1, 1))
    # another method asked for: its own defaults, not the parameters tuned for mws
    assert io.segmentation(model, "multicut")[:2] == ("multicut", segment.SegmentParams())


def test_model_io_reads_the_channels_of_a_file_or_a_loaded_model_and_the_offsets_its_run_recorded(tmp_path, unet_path):
    import numpy as np

    from model import build_unet

    membrane = cards.model_io(unet_path)
    assert membrane == cards.ModelIO(1, 1, None) and not membrane.is_affinities
    assert membrane.describe() == "probability of cell (1) against membrane (0), float32"
    maps = np.random.default_rng(0).random((2, 5, 6)).astype(np.float32)
    assert membrane.cell_map(maps) is maps
    np.testing.assert_array_equal(membrane.cell_map(maps[..., None], raw=True), maps)

    run = tmp_path / "run"
    run.mkdir()
    build_unet((None, None, 1), filters=2, out_channels=4).save(run / "best.keras")
    with pytest.raises(ValueError, match="4 channels but 8 offsets"):  # nothing records its offsets
        cards.model_io(run / "best.keras")
    (run / "settings.json").write_text(json.dumps({"target": "affinities", "offsets": "1,3"}))
    from_file = cards.model_io(run / "best.keras")
    loaded = cards.model_io(run / "best.keras", runtimes.load_model(run / "best.keras"))
    assert from_file == loaded == cards.ModelIO(1, 4, affinities.parse_offsets("1,3"))
    affs = np.random.default_rng(1).random((2, 5, 6, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded.cell_map(affs), affinities.cell_map(affs))
    assert loaded.describe().startswith("4 affinity channels, float32") and "(-3, 0)" in loaded.describe()


def test_model_io_refuses_what_no_model_gives():
    with pytest.raises(ValueError, match="at least one channel"):
        cards.ModelIO(channels=0)
    with pytest.raises(ValueError, match="has no offsets"):
        cards.ModelIO(channels=1, offsets=affinities.OFFSETS[:1])


def test_resolve_model_names_what_is_missing_and_what_the_caller_cannot_run(tmp_path, unet_path):
    assert runtimes.resolve_model(unet_path) == unet_path
    with pytest.raises(FileNotFoundError, match="none.keras: no such model file"):
        runtimes.resolve_model(tmp_path / "none.keras")
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights.h5: not a model this project reads \(.keras \(or compact .npz\), .onnx"):
        runtimes.resolve_model(tmp_path / "weights.h5")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / runtimes.SAVEDMODEL_FILE).write_bytes(b"")
    assert runtimes.resolve_model(tmp_path / "saved") == tmp_path / "saved"
    with pytest.raises(ValueError, match=r"saved: not a .keras \(or compact .npz\) model, which this needs"):
        runtimes.resolve_model(tmp_path / "saved", kinds=("keras",))


def test_onnx_predicts_within_1e_4_of_keras_in_float32(unet_path):
    import numpy as np

    x = np.random.default_rng(0).random((2, 64, 96, 1), dtype=np.float32)
    onnx, chosen = runtimes.load_for_prediction(unet_path, "onnx")
    assert chosen["runtime"] == "onnx" and isinstance(onnx, runtimes.OnnxModel)
    keras_model = runtimes.load_model(unet_path, precision="float32")
    assert np.abs(onnx.predict_on_batch(x) - keras_model.predict_on_batch(x)).max() < 1e-4


def test_auto_times_both_runtimes_once_and_keeps_the_faster_per_machine_and_model(unet_path, monkeypatch):
    calls = []

    def timed(model, repeats=3):
        calls.append(type(model).__name__)
        return 0.1 if isinstance(model, runtimes.OnnxModel) else 0.3  # here onnxruntime is faster

    monkeypatch.setattr(runtimes, "_seconds_per_call", timed)
    model, chosen = runtimes.load_for_prediction(unet_path, "auto")
    assert chosen == {"runtime": "onnx", "seconds": {"keras": 0.3, "onnx": 0.1}, "cached": False}
    assert isinstance(model, runtimes.OnnxModel) and len(calls) == 2
    again, remembered = runtimes.load_for_prediction(unet_path, "auto")
    assert remembered["cached"] and remembered["runtime"] == "onnx" and len(calls) == 2  # not timed again
    keras_model, forced = runtimes.load_for_prediction(unet_path, "keras")
    assert forced["runtime"] == "keras" and not isinstance(keras_model, runtimes.OnnxModel)
    with pytest.raises(ValueError, match="unknown runtime 'tflite'"):
        runtimes.load_for_prediction(unet_path, "tflite")


def test_predict_says_which_runtime_it_chose(tmp_path, unet_path, capsys):
    import numpy as np
    import tifffile

    import predict

    tifffile.imwrite(tmp_path / "page.tif", np.zeros((32, 32), np.uint8), photometric="minisblack")
    assert predict.main([str(tmp_path / "page.tif"), "--model", str(unet_path), "--runtime", "onnx"]) == 0
    assert "runtime: onnx" in capsys.readouterr().out


# ---------------------------------------------------------------- a cache that never stops a prediction

@pytest.fixture(scope="module")
def onnx_bytes(unet_path, tmp_path_factory):
    """Return the tiny model's ONNX conversion as bytes (converted once: the tests below copy it)."""
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return runtimes.write_onnx(runtimes.load_model(unet_path), path).read_bytes()


@pytest.fixture
def cache(tmp_path, monkeypatch, onnx_bytes):
    """Return an empty cache folder of this test's own, where a conversion is a copy of `onnx_bytes` and a
    timing says onnxruntime is the faster."""
    from pathlib import Path

    folder = tmp_path / "cache"
    monkeypatch.setenv(runtimes.CACHE_ENV, str(folder))
    monkeypatch.setattr(runtimes, "write_onnx", lambda model, dest: Path(dest).write_bytes(onnx_bytes) and Path(dest))
    monkeypatch.setattr(runtimes, "_seconds_per_call",
                        lambda model, repeats=3: 0.1 if isinstance(model, runtimes.OnnxModel) else 0.3)
    return folder


def key_of(model_path):
    import files

    return runtimes.timing_key(files.sha256(model_path))


@pytest.mark.parametrize("content", [b"garbage{", b"", b"\xff\xfe\x00", b"[1, 2]", b'"text"', b"null",
                                     b"[" * 100000 + b"]" * 100000, "entry"])
def test_a_damaged_timings_file_is_timed_again_with_a_warning_naming_it(unet_path, cache, content):
    timings = cache / runtimes.TIMINGS_FILE
    cache.mkdir()
    if content == "entry":  # valid JSON, but not the shape of a timing
        content = json.dumps({key_of(unet_path): {"runtime": "onnx", "seconds": "fast"}}).encode()
    timings.write_bytes(content)
    with pytest.warns(UserWarning, match=f"{timings}: .*timing again") as caught:
        model, chosen = runtimes.load_for_prediction(unet_path, "auto")
    # one warning about the file (the first conversion in a process may add the converter's own deprecations)
    assert len([w for w in caught if str(timings) in str(w.message)]) == 1
    assert isinstance(model, runtimes.OnnxModel)
    assert chosen == {"runtime": "onnx", "seconds": {"keras": 0.3, "onnx": 0.1}, "cached": False}
    assert json.loads(timings.read_text())[key_of(unet_path)]["runtime"] == "onnx"  # repaired


@pytest.mark.parametrize("cut", [0, 1, 100, 0.5])
def test_a_damaged_cached_conversion_is_converted_again_with_a_warning_naming_it(unet_path, cache, onnx_bytes, cut):
    import files

    cache.mkdir()
    cached = cache / f"{files.sha256(unet_path)}.onnx"
    cached.write_bytes(onnx_bytes[: int(cut * len(onnx_bytes)) if isinstance(cut, float) else cut])
    for runtime in ("onnx", "auto"):
        with pytest.warns(UserWarning, match=f"{cached}: a damaged cached ONNX conversion"):
            model, _ = runtimes.load_for_prediction(unet_path, runtime)
        assert isinstance(model, runtimes.OnnxModel) and cached.read_bytes() == onnx_bytes
        cached.write_bytes(b"\x00" * 7)


def test_an_unwritable_cache_predicts_in_keras_or_converts_for_the_run_with_a_warning(unet_path, cache, tmp_path,
                                                                                    monkeypatch, capsys):
    import numpy as np
    import tifffile

    import predict

    (tmp_path / "a-file").write_text("a cache folder cannot be made below a file")
    monkeypatch.setenv(runtimes.CACHE_ENV, str(tmp_path / "a-file" / "cache"))  # as a read-only file system
    for runtime, expected, consequence in (("auto", "keras", "predicting with Keras"),
                                           ("onnx", "onnx", "converting it for this run only")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, chosen = runtimes.load_for_prediction(unet_path, runtime)
        assert chosen["runtime"] == expected and isinstance(model, runtimes.OnnxModel) == (expected == "onnx")
        assert any("cannot keep the ONNX conversion in the runtime cache" in str(w.message)
                   and consequence in str(w.message) for w in caught), [str(w.message) for w in caught]
    tifffile.imwrite(tmp_path / "page.tif", np.zeros((32, 32), np.uint8), photometric="minisblack")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert predict.main([str(tmp_path / "page.tif"), "--model", str(unet_path), "--runtime", "auto"]) == 0
    assert "warning: " in capsys.readouterr().err and (tmp_path / "page-prediction.tif").is_file()


def test_two_processes_timing_two_models_at_once_keep_both_timings(unet_path, cache, monkeypatch):
    timings = cache / runtimes.TIMINGS_FILE
    other = {"runtime": "keras", "seconds": {"keras": 0.2, "onnx": 0.4}}

    def timed_while_another_process_writes(model, repeats=3):
        # what a second process, timing another model meanwhile, keeps in the cache
        timings.write_text(json.dumps({"another model": other}))
        return 0.1 if isinstance(model, runtimes.OnnxModel) else 0.3

    monkeypatch.setattr(runtimes, "_seconds_per_call", timed_while_another_process_writes)
    runtimes.load_for_prediction(unet_path, "auto")
    kept = json.loads(timings.read_text())
    assert kept["another model"] == other and kept[key_of(unet_path)]["runtime"] == "onnx"


def test_bytes_named_keras_that_are_no_zip_archive_are_not_a_keras_model(tmp_path):
    import files

    fake = tmp_path / "random.keras"
    fake.write_bytes(bytes(range(256)) * 20)
    for runtime in ("keras", "onnx", "auto"):
        with pytest.raises(files.DataError, match="random.keras: not a Keras model") as error:
            runtimes.load_for_prediction(fake, runtime)
        assert "not found" not in str(error.value)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(timings=st.one_of(st.none(), st.binary(max_size=64), JSON_VALUES.map(lambda v: json.dumps(v).encode())),
       entry=st.one_of(st.none(), JSON_VALUES), conversion=st.one_of(st.none(), st.binary(max_size=64),
                                                                   st.floats(0, 1)),
       runtime=st.sampled_from(["auto", "onnx"]))
def test_any_cache_content_predicts_with_warnings_or_gives_one_error_line(unet_path, cache, onnx_bytes, tmp_path,
                                                                         capsys, timings, entry, conversion, runtime):
    import shutil

    import files
    import numpy as np
    import tifffile

    import predict

    page = tmp_path / "page.tif"
    if not page.exists():
        tifffile.imwrite(page, np.zeros((32, 32), np.uint8), photometric="minisblack")
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir()
    if timings is not None:
        (cache / runtimes.TIMINGS_FILE).write_bytes(timings)
    if entry is not None:  # an entry for this very model and machine
        (cache / runtimes.TIMINGS_FILE).write_text(json.dumps({key_of(unet_path): entry}))
    if conversion is not None:  # random bytes, or the real conversion cut somewhere
        content = onnx_bytes[: int(conversion * len(onnx_bytes))] if isinstance(conversion, float) else conversion
        (cache / f"{files.sha256(unet_path)}.onnx").write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code = predict.main([str(page), "--model", str(unet_path), "--runtime", runtime, "--tile", "64"])
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(("error:", "warning:"))]
    if code == 0:
        assert all(line.startswith("warning: ") for line in lines)
    else:
        assert code == 1 and [line for line in lines if line.startswith("error:")] == lines[-1:], lines
