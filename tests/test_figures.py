"""figures.py: curves and snapshots read back from a real (tiny) run's logs, and the result grid."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import cell_mask
from PIL import Image

import figures
from scores import segment_cells

VALIDATION_PAGES = 3
PAGE = 512


def test_read_scalars_has_one_epoch_loss_per_epoch_for_train_and_validation(tiny_run):
    scalars = figures.read_scalars(tiny_run["logs"])
    for part in ("train", "validation"):
        steps = [step for step, _ in scalars[part]["epoch_loss"]]
        assert steps == [0, 1]
        assert all(np.isfinite(value) for _, value in scalars[part]["epoch_loss"])
    # update_freq=1: one 'batch_loss' per optimizer step, 3 steps per epoch.
    assert [step for step, _ in scalars["train"]["batch_loss"]] == [1, 2, 3, 4, 5, 6]
    assert figures.steps_per_epoch(tiny_run["logs"]) == 3


def test_plot_curves_writes_nonempty_pngs_named_as_in_the_write_up(tiny_run, tmp_path):
    paths = figures.plot_curves(tiny_run["logs"], tmp_path / "images")
    assert sorted(p.name for p in paths) == ["acc.png", "loss.png", "pixel_difference.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 1000


def test_read_images_returns_prediction_and_label_rows_of_all_validation_pages(tiny_run):
    images = figures.read_images(tiny_run["logs"])
    assert [step for step, _ in images["epoch"]] == [1, 2]
    assert [step for step, _ in images["batch"]] == [2, 4, 6]  # draw_interval=2
    for _, image in images["batch"] + images["epoch"]:
        assert image.dtype == np.uint8
        assert image.shape == (2 * PAGE, VALIDATION_PAGES * PAGE)


def test_save_snapshots_writes_the_label_row_and_one_prediction_row_per_step(tiny_run, tmp_path):
    paths = figures.save_snapshots(tiny_run["logs"], tmp_path, steps=[2, 6])
    assert [p.name for p in paths] == ["labels.png", "step2.png", "step6.png"]

    for path in paths:
        assert Image.open(path).size == (VALIDATION_PAGES * PAGE, PAGE)  # PIL gives (width, height)
    with pytest.raises(ValueError, match="no 'batch' picture at steps \\[5\\]"):
        figures.save_snapshots(tiny_run["logs"], tmp_path, steps=[5])


def test_snapshot_steps_are_dense_early_and_end_at_the_last():
    assert figures.snapshot_steps(range(200, 4201, 200)) == [200, 400, 1000, 2000, 4200]
    assert figures.snapshot_steps([2, 4, 6]) == [2, 4, 6]
    assert figures.snapshot_steps([]) == []


def test_resumed_logs_merge_with_later_writes_winning_and_batch_steps_made_global(tmp_path):
    # Two fit() sessions in the order Keras writes them (2 steps per epoch): the second
    # resumed at epoch 1 and counted its 'batch_*' steps from 1 again.
    log_dir = tmp_path / "logs"
    sessions = [
        [("batch_loss", 1, 1.0), ("batch_loss", 2, 0.95), ("epoch_loss", 0, 0.9),
         ("batch_loss", 3, 0.9), ("batch_loss", 4, 0.85), ("epoch_loss", 1, 0.8)],
        [("batch_loss", 1, 0.75), ("batch_loss", 2, 0.72), ("epoch_loss", 1, 0.7),
         ("batch_loss", 3, 0.7), ("batch_loss", 4, 0.65), ("epoch_loss", 2, 0.6)],
    ]
    for events in sessions:
        writer = tf.summary.create_file_writer(str(log_dir / "train"))
        with writer.as_default():
            for tag, step, value in events:
                tf.summary.scalar(tag, value, step=step)
        writer.close()
    assert len(list((log_dir / "train").iterdir())) == 2

    scalars = figures.read_scalars(log_dir)["train"]

    epochs, values = zip(*scalars["epoch_loss"])
    assert epochs == (0, 1, 2) and values == pytest.approx([0.9, 0.7, 0.6])
    steps, values = zip(*scalars["batch_loss"])
    assert steps == (1, 2, 3, 4, 5, 6) and values == pytest.approx([1.0, 0.95, 0.75, 0.72, 0.7, 0.65])
    assert figures.steps_per_epoch(log_dir) == 2


def test_results_grid_has_images_labels_and_predictions_titled_with_pixel_difference():
    rng = np.random.default_rng(0)
    labels = (rng.random((3, 32, 48, 1)) > 0.5).astype(np.float32)
    predictions = labels.copy()
    predictions[1] = 1 - predictions[1]  # all wrong: 100 %
    figure = figures.results_grid(rng.random((3, 32, 48, 1)), labels, predictions, ["page 0", "page 10", "page 20"])
    assert len(figure.axes) == 9
    titles = [ax.get_title() for ax in figure.axes]
    assert titles[:3] == ["page 0", "page 10", "page 20"]
    assert titles[6:] == ["pixel difference 0.0%", "pixel difference 100.0%", "pixel difference 0.0%"]


def test_results_grid_shows_the_cells_in_colour_titled_with_their_counts_and_v_rand():
    labels = np.ones((2, 32, 48), np.float32)
    labels[:, 15:17, :] = 0  # two cells per page
    cells = np.stack([segment_cells(label > 0) for label in labels]).astype(np.uint32)
    cells[1] = 1  # the second page merges them, membrane and all
    figure = figures.results_grid(labels, labels, labels, cells=cells)
    assert len(figure.axes) == 8
    assert figure.axes[6].get_images()[0].get_array().shape == (32, 48, 3)
    titles = [ax.get_title() for ax in figure.axes[6:]]
    assert titles[0] == "2 cells (2 true), V_rand 1.000" and titles[1].startswith("1 cells (2 true), V_rand 0.")


def test_architecture_diagram_names_every_block_with_its_width_and_side():
    figure = figures.architecture_figure(filters=16, size=256, out_channels=8, batch_norm=True)
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert "CNT_1: 16 filters\n256 x 256" in texts and "CNT_5: 256 filters\n16 x 16" in texts
    assert "EXP_4: 16 filters\n256 x 256" in texts and any("8 channels" in t for t in texts)
    assert any("BN" in t for t in texts)


def test_a_runs_architecture_has_the_outputs_of_its_model_or_else_of_its_settings(tmp_path):
    import json

    from model import build_unet

    def out_text(run):
        return next(t.get_text() for t in figures.run_architecture(run).axes[0].texts if t.get_text().startswith("OUT"))

    run = tmp_path / "run"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({"filters": 8, "target": "affinities", "offsets": "1,3"}))
    assert out_text(run).endswith("sigmoid, 4 channels")  # no model yet: its settings say
    (run / "settings.json").write_text(json.dumps({"filters": 8}))
    build_unet((None, None, 1), filters=2, out_channels=2, head_filters=2).save(run / "best.keras")
    (run / "best.json").write_text(json.dumps({"segmentation": {"offsets": [[-1, 0], [0, -1]]}}))
    assert out_text(run).endswith("sigmoid, 2 channels")  # the model's own outputs
    assert out_text(tmp_path / "nothing").endswith("sigmoid, 1 channel")  # the original's


def test_results_grid_refuses_rows_of_different_lengths():
    with pytest.raises(ValueError, match="3 images, 2 labels"):
        figures.results_grid(np.zeros((3, 16, 16)), np.zeros((2, 16, 16)), np.zeros((3, 16, 16)))


def test_masks_grid_shows_each_page_with_its_predicted_mask_and_membrane_dice():
    import figures

    label = cell_mask(low=0, high=1).astype(np.float32)
    figure = figures.masks_grid(label[None], label[None], (1.0 - label)[None], titles=["inverted"])
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["image", "mask", "predicted mask, membrane Dice 0.000"]


def test_command_line_draws_into_the_runs_own_folder_by_default(tiny_run, capsys):
    assert figures.main([str(tiny_run["logs"])]) == 0
    folder = tiny_run["logs"].parent / "images"
    assert {"loss.png", "acc.png", "pixel_difference.png", "labels.png", "architecture.png"} <= \
        {p.name for p in folder.iterdir()}
    assert str(folder / "loss.png") in capsys.readouterr().out
    assert figures.main([str(folder)]) == 1  # not a log folder: one error line
    assert "holds no train/ folder" in capsys.readouterr().err
