import functools
import http.server
import threading

import numpy as np
import pytest
import tifffile

import data


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
    with pytest.raises(data.DataError, match="nowhere") as err:
        data.find_data_dir()
    assert "data.py download" in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(data.DataError, match="absent.tif: file not found"):
        data.read_stack(tmp_path / "absent.tif")


def test_non_tiff_is_refused_with_its_name(tmp_path):
    fake = tmp_path / "train-volume.tif"
    fake.write_text("this is not an image")
    with pytest.raises(data.DataError, match="train-volume.tif: not a readable TIFF"):
        data.read_stack(fake)


def test_colour_pages_are_refused(tmp_path):
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, np.zeros((2, 16, 16, 3), np.uint8), photometric="rgb")
    with pytest.raises(data.DataError, match="2-D grey pages"):
        data.read_stack(path)


def test_stacks_of_different_shapes_are_refused(tmp_path, synthetic_stacks):
    images, labels = synthetic_stacks
    folder = write_stacks(tmp_path, images, labels[:3])
    with pytest.raises(data.DataError, match="must match page for page"):
        data.load_isbi(folder)


def test_labels_with_more_than_two_values_are_refused(tmp_path, synthetic_stacks):
    images, labels = synthetic_stacks
    labels = labels.copy()
    labels[0, 0, :3] = [17, 100, 200]
    folder = write_stacks(tmp_path, images, labels)
    with pytest.raises(data.DataError, match="two-valued.*5 distinct values"):
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


# ---------------------------------------------------------------- augmenting

def blobs(size=128, seed=0):
    """Return a binary image of large random blobs, so that misalignment shows."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.random((size, size)), 6) > 0.5).astype(np.float32)


@pytest.mark.parametrize("aug", [data.Augmentation(), data.Augmentation(40, 0.2, 0.2, 10, 0.2, True, True, True)])
def test_augmentation_moves_image_and_label_together_and_keeps_label_binary(aug):
    label = blobs()
    image = label.copy()  # an image that *is* its label: after the transform they must still agree
    agreements = []
    for seed in range(5):
        new_image, new_label = data.augment_pair(image, label, aug, np.random.default_rng(seed), crop=96)
        assert new_image.shape == new_label.shape == (96, 96)
        assert set(np.unique(new_label)) <= {0.0, 1.0}
        agreements.append(np.mean((new_image > 0.5) == (new_label > 0.5)))
    assert min(agreements) > 0.97


def test_independent_transforms_would_misalign():
    # The check above can fail: transforms drawn separately disagree much more.
    label = blobs()
    aug = data.Augmentation(40, 0.2, 0.2, 10, 0.2, True, True, True)
    a, _ = data.augment_pair(label, label, aug, np.random.default_rng(1), crop=96)
    _, b = data.augment_pair(label, label, aug, np.random.default_rng(2), crop=96)
    assert np.mean((a > 0.5) == (b > 0.5)) < 0.9


def test_no_augmentation_is_identity():
    label = blobs(64)
    image, new_label = data.augment_pair(label, label, data.Augmentation.none(), np.random.default_rng(0))
    np.testing.assert_allclose(image, label, atol=1e-6)
    np.testing.assert_array_equal(new_label, label)


def test_batches_are_float32_nhwc_binary_and_reproducible(synthetic_stacks):
    images, labels = synthetic_stacks
    x = data.add_channel(data.normalize_images(images))
    y = data.add_channel(data.binarize_labels(labels))
    batches = data.AugmentedBatches(x, y, batch_size=3, steps_per_epoch=7, crop=32, seed=5)
    assert len(batches) == 7
    bx, by = batches[2]
    assert bx.shape == by.shape == (3, 32, 32, 1)
    assert bx.dtype == by.dtype == np.float32
    assert set(np.unique(by)) <= {0.0, 1.0}
    again = data.AugmentedBatches(x, y, batch_size=3, steps_per_epoch=7, crop=32, seed=5)
    np.testing.assert_array_equal(again[2][0], bx)
    batches.on_epoch_end()
    assert not np.array_equal(batches[2][0], bx)  # a new epoch draws new transforms


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
    with pytest.raises(data.DataError, match="not a readable TIFF"):
        data.download(dest, base_url=url, files=(data.IMAGES_FILE,))
    assert list(dest.iterdir()) == []
