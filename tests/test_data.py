"""data.py: finding and validating the ISBI stacks and a lab's own pages, label conventions, splits, page sizes, the
data report and the download."""

import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import tifffile
from conftest import ROOT, cell_mask, write_png

import data
import files
import train


def write_stacks(folder, images, labels):
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / data.IMAGES_FILE, images, photometric="minisblack")
    tifffile.imwrite(folder / data.LABELS_FILE, labels, photometric="minisblack")
    return folder


# ---------------------------------------------------------------- finding and validating

def test_explicit_path_wins_over_environment(tmp_path, monkeypatch, synthetic_stacks):
    given = write_stacks(tmp_path / "given", *synthetic_stacks)
    env = write_stacks(tmp_path / "env", *synthetic_stacks)
    monkeypatch.setenv(data.DATA_ENV, str(env))
    assert data.find_data_dir(given) == given
    assert data.find_data_dir() == env


def test_missing_data_names_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(files.DataError, match="nowhere") as err:
        data.find_data_dir()
    assert "data.py fetch" in str(err.value)


def test_stacks_of_different_shapes_are_refused(tmp_path, synthetic_stacks):
    images, labels = synthetic_stacks
    folder = write_stacks(tmp_path, images, labels[:3])
    with pytest.raises(files.DataError, match="must match page for page"):
        data.load_isbi(folder)


def test_labels_with_more_than_two_values_are_refused(tmp_path, synthetic_stacks):
    images, labels = synthetic_stacks
    labels = labels.copy()
    labels[0, 0, :3] = [17, 100, 200]
    folder = write_stacks(tmp_path, images, labels)
    with pytest.raises(files.DataError, match="two-valued.*5 distinct values"):
        data.load_isbi(folder)


def test_real_data_reads_as_30_binary_pages(isbi_dir):
    images, labels = data.load_isbi(isbi_dir)
    assert images.shape == labels.shape == (30, 512, 512)
    assert set(np.unique(labels)) == {0, 255}


# ---------------------------------------------------------------- normalising and splitting

def test_split_uses_the_original_indices():
    parts = data.split_indices(30)
    assert parts["validation"] == [5, 15, 25]
    assert parts["test"] == [0, 10, 20]
    assert len(parts["train"]) == 24
    assert not set(parts["train"]) & {0, 5, 10, 15, 20, 25}


def test_load_split_normalises_images_and_binarises_labels(isbi_dir):
    split = data.load_split(isbi_dir)
    x, y = split["train"]
    assert x.shape == (24, 512, 512, 1) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 1
    assert set(np.unique(y)) == {0.0, 1.0}
    raw_images, raw_labels = data.load_isbi(isbi_dir)
    np.testing.assert_allclose(split["test"][0][1, ..., 0], raw_images[10] / 255, rtol=1e-6)
    np.testing.assert_array_equal(split["validation"][1][0, ..., 0], raw_labels[5] == 255)


def test_normalize_scales_16_bit_and_keeps_float():
    assert data.normalize_images(np.array([0, 65535], np.uint16)).tolist() == [0.0, 1.0]
    assert data.normalize_images(np.array([0.25])).tolist() == [0.25]


# ---------------------------------------------------------------- downloading

@pytest.fixture
def http_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_fetches_validates_and_leaves_no_partial_files(tmp_path, http_server, synthetic_stacks):
    served, url = http_server
    write_stacks(served, *synthetic_stacks)
    tifffile.imwrite(served / data.TEST_FILE, synthetic_stacks[0], photometric="minisblack")
    dest = data.download(tmp_path / "dest", base_url=url)
    images, labels = data.load_isbi(dest)
    np.testing.assert_array_equal(labels, synthetic_stacks[1])
    assert sorted(p.name for p in dest.iterdir()) == sorted(data.FILES)


def test_download_of_a_non_tiff_fails_and_writes_nothing(tmp_path, http_server):
    served, url = http_server
    (served / data.IMAGES_FILE).write_text("<html>not found</html>")
    dest = tmp_path / "dest"
    with pytest.raises(files.DataError, match="not a readable TIFF"):
        data.download(dest, base_url=url, files=(data.IMAGES_FILE,))
    assert list(dest.iterdir()) == []


def test_download_refuses_a_file_whose_checksum_differs(tmp_path, http_server, synthetic_stacks):
    served, url = http_server
    write_stacks(served, *synthetic_stacks)
    good = {name: files.sha256(served / name) for name in (data.IMAGES_FILE, data.LABELS_FILE)}
    with pytest.raises(files.DataError, match="train-labels.tif: the download's SHA-256 is .* not 0+"):
        data.download(tmp_path / "bad", url, files=(data.IMAGES_FILE, data.LABELS_FILE),
                      checksums={**good, data.LABELS_FILE: "0" * 64})
    assert [p.name for p in (tmp_path / "bad").iterdir()] == [data.IMAGES_FILE]  # nothing of the bad one
    data.download(tmp_path / "good", url, files=(data.IMAGES_FILE, data.LABELS_FILE), checksums=good)


def test_the_known_checksums_are_those_of_the_isbi_files(isbi_dir):
    assert {name: files.sha256(isbi_dir / name) for name in data.FILES} == data.CHECKSUMS


def fetch_env(data_dir, url) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (data.DATA_ENV, data.URL_ENV)}
    return {**env, data.DATA_ENV: str(data_dir), data.URL_ENV: url}


@pytest.mark.skipif(shutil.which("make") is None, reason="make is needed to run make's data step")
def test_make_runs_first_step_fetches_verifies_and_places_the_data(tmp_path, http_server, synthetic_stacks):
    served, url = http_server
    write_stacks(served, *synthetic_stacks)
    tifffile.imwrite(served / data.TEST_FILE, synthetic_stacks[0], photometric="minisblack")
    empty = tmp_path / "data"
    done = subprocess.run(["make", "--no-print-directory", "-o", "setup", "-o", ".venv/.installed", "data",
                           f"PY={sys.executable}"], cwd=ROOT,
                          env=fetch_env(empty, url), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"data downloaded to {empty}" in done.stdout
    assert sorted(p.name for p in empty.iterdir()) == sorted(data.FILES)
    np.testing.assert_array_equal(data.load_isbi(empty)[1], synthetic_stacks[1])
    again = subprocess.run([sys.executable, "data.py", "fetch"], cwd=ROOT, env=fetch_env(empty, url + "gone/"),
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and f"data found in {empty}" in again.stdout  # nothing downloaded twice


def test_fetch_offline_says_so_and_how_to_place_the_files(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on: the connection is refused, as offline
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/"
    done = subprocess.run([sys.executable, "data.py", "fetch"], cwd=ROOT, env=fetch_env(tmp_path / "data", url),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "cannot download" in line and "offline" in line and "by hand into" in line and data.DATA_ENV in line
    assert not any((tmp_path / "data").glob("*.tif"))


def test_folder_pairing_names_every_unpaired_file_and_stops_unless_allowed(tmp_path):
    for stem in ("a", "b", "lonely_image"):
        write_png(tmp_path / "images" / f"{stem}.png", np.zeros((8, 8), np.uint8))
    for stem in ("a", "b", "lonely_mask"):
        write_png(tmp_path / "masks" / f"{stem}.png", cell_mask((8, 8)))
    with pytest.raises(files.DataError) as err:
        data.pair_folders(tmp_path / "images", tmp_path / "masks")
    assert "lonely_image.png" in str(err.value) and "lonely_mask.png" in str(err.value)
    assert "allow_unpaired" in str(err.value)
    with pytest.warns(UserWarning) as warned:
        pairs = data.pair_folders(tmp_path / "images", tmp_path / "masks", allow_unpaired=True)
    assert [(image.name, mask.name) for image, mask in pairs] == [("a.png", "a.png"), ("b.png", "b.png")]
    messages = " ".join(str(warning.message) for warning in warned)
    assert "skipping unpaired file" in messages and "lonely_image.png" in messages and "lonely_mask.png" in messages
    tifffile.imwrite(tmp_path / "masks" / "a.tif", cell_mask((8, 8)))
    with pytest.raises(files.DataError, match="share a name"):
        data.pair_folders(tmp_path / "images", tmp_path / "masks")


def test_sixteen_bit_pages_are_normalised_and_reported(tmp_path):
    rng = np.random.default_rng(0)
    pages = rng.integers(0, 65536, (3, 40, 48), dtype=np.uint16)
    write_png(tmp_path / "images" / "p0.png", pages[0])  # a 16-bit PNG
    tifffile.imwrite(tmp_path / "images" / "p1.tif", pages[1])
    tifffile.imwrite(tmp_path / "images" / "p2.tiff", pages[2])
    (tmp_path / "masks").mkdir()
    for i in range(3):
        tifffile.imwrite(tmp_path / "masks" / f"p{i}.tif", cell_mask(low=0, high=65535, dtype=np.uint16))
    parts, report = data.load_pages(tmp_path / "images", tmp_path / "masks", split="2")
    train_images, train_labels = parts["train"]
    np.testing.assert_allclose(train_images[0], pages[0] / 65535, rtol=1e-6)
    np.testing.assert_allclose(parts["validation"][0][0], pages[2] / 65535, rtol=1e-6)
    assert set(np.unique(np.concatenate([label.ravel() for label in train_labels]))) == {0.0, 1.0}
    assert report["label_values"] == [0, 65535] and report["membrane_value"] == 0
    assert report["parts"]["train"]["dtypes"] == {"uint16": 2}
    assert report["parts"]["validation"]["names"] == ["p2.tiff"]


def test_inverted_labels_are_detected_with_the_setting_that_fixes_them(tmp_path):
    inverted = 1 - cell_mask(low=0, high=1)  # membranes as the majority class, 0/1 encoding
    tifffile.imwrite(tmp_path / "images.tif", np.zeros((2, *inverted.shape), np.uint8))
    tifffile.imwrite(tmp_path / "labels.tif", np.stack([inverted, inverted]))
    with pytest.raises(files.DataError, match=r"inverted.*--membrane-value 1"):
        data.load_pages(tmp_path / "images.tif", tmp_path / "labels.tif", split="1")
    parts, report = data.load_pages(tmp_path / "images.tif", tmp_path / "labels.tif", split="1", membrane_value=1)
    assert report["cell_fraction"] > 0.5
    np.testing.assert_array_equal(parts["train"][1][0], inverted == 0)


def test_three_valued_labels_are_refused_with_the_values_listed(tmp_path):
    labels = cell_mask()
    labels[:4, :4] = 128
    tifffile.imwrite(tmp_path / "images.tif", np.zeros((2, *labels.shape), np.uint8))
    tifffile.imwrite(tmp_path / "labels.tif", np.stack([labels, labels]))
    with pytest.raises(files.DataError, match=r"labels.tif: masks must hold two values.* found 3: 0, 128, 255"):
        data.load_pages(tmp_path / "images.tif", tmp_path / "labels.tif", split="0")


def test_splits_by_indices_fraction_or_validation_files(tmp_path):
    assert data.parse_split("3,7", 10) == {"train": [0, 1, 2, 4, 5, 6, 8, 9], "validation": [3, 7]}
    by_fraction = data.parse_split("0.3", 10, seed=1)
    assert len(by_fraction["validation"]) == 3 and by_fraction == data.parse_split("0.3", 10, seed=1)
    assert sorted(by_fraction["train"] + by_fraction["validation"]) == list(range(10))
    for bad in ("12", "1.5", "everything"):
        with pytest.raises(files.DataError, match="split"):
            data.parse_split(bad, 10)
    stack = np.zeros((2, 32, 32), np.uint8)
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}-images.tif", stack)
        tifffile.imwrite(tmp_path / f"{name}-labels.tif", np.stack([cell_mask((32, 32))] * 2))
    parts, report = data.load_pages(tmp_path / "a-images.tif", tmp_path / "a-labels.tif",
                                    tmp_path / "b-images.tif", tmp_path / "b-labels.tif")
    assert [len(parts[p][0]) for p in ("train", "validation")] == [2, 2]
    assert "validation files" in report["split"]


def test_the_isbi_data_load_as_before_by_default(isbi_dir):
    split, report = train.load_data(train.preset("tiny", data_dir=str(isbi_dir)))
    before = data.load_split(isbi_dir)
    for part in ("train", "validation", "test"):
        for new, old in zip(split[part], before[part]):
            np.testing.assert_array_equal(new, old)
    assert report["split"] == "isbi" and report["split_pages"]["validation"] == list(data.VALIDATION_PAGES)


def test_pages_are_padded_up_to_the_crop_and_validation_cut_to_sixteens():
    shapes = data.part_shapes([(700, 900), (100, 120)], [(700, 900), (650, 910)], crop=256)
    assert shapes == {"train": (700, 900), "validation": (640, 896)}
    small = data.part_shapes([(100, 120)], [(20, 30)], crop=256)
    assert small == {"train": (256, 256), "validation": (16, 16)}
    page = np.arange(100 * 120, dtype=np.float32).reshape(100, 120)
    padded = data.stack_pages([page], (256, 256))[0, ..., 0]
    assert padded.shape == (256, 256)
    np.testing.assert_array_equal(padded[78:178, 68:188], page)  # the page in the middle, mirrored around it


def test_neighbours_are_mirrored_at_the_ends_of_the_stack():
    assert data.neighbour_indices(0, 30, 3) == [1, 0, 1]
    assert data.neighbour_indices(29, 30, 5) == [27, 28, 29, 28, 27]
    assert data.neighbour_indices(10, 30, 3) == [9, 10, 11]
    assert data.neighbour_indices(0, 1, 3) == [0, 0, 0]  # a single page is its own neighbour
    for bad in (0, 2, -3, 1.0):
        with pytest.raises(ValueError, match="odd number of sections"):
            data.check_context(bad)


def test_context_stacks_each_page_with_its_neighbours_as_channels(isbi_dir):
    images, _ = data.load_isbi(isbi_dir)
    stack = data.with_context(data.normalize_images(images), 3)
    assert stack.shape == (30, 512, 512, 3)
    np.testing.assert_array_equal(stack[10, ..., 1], data.normalize_images(images[10]))
    np.testing.assert_array_equal(stack[10, ..., 0], data.normalize_images(images[9]))
    np.testing.assert_array_equal(stack[0, ..., 0], stack[0, ..., 2])  # page -1 is page 1
    assert data.with_context(images, 1) is images
    with pytest.raises(data.DataError, match="one size"):
        data.with_context([np.zeros((4, 4)), np.zeros((4, 6))], 3)


def test_context_pages_keep_their_stack_order_across_the_split_and_labels_stay_single(isbi_dir):
    parts, _ = data.load_pages(data_dir=isbi_dir, context=3)
    images, labels = parts["validation"]
    assert images[0].shape == (512, 512, 3) and labels[0].shape == (512, 512)
    full = data.normalize_images(data.load_isbi(isbi_dir)[0])
    page = data.VALIDATION_PAGES[0]
    np.testing.assert_array_equal(images[0], np.stack([full[page - 1], full[page], full[page + 1]], -1))
    stacked = data.stack_pages(images, (256, 256))
    assert stacked.shape == (len(images), 256, 256, 3)
