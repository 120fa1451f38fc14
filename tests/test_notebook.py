"""unet-isbi.ipynb runs headless from a clean kernel with the 'tiny' preset and shows its results; the committed one
runs all with a user's defaults and shows the training in its steps, under the original design's names."""

import json
import typing

import nbformat
import pytest
from conftest import ROOT

papermill = pytest.importorskip("papermill", reason="papermill is needed to run the notebook headless")

NOTEBOOK = ROOT / "unet-isbi.ipynb"


def run_notebook(tmp_path, **parameters) -> list:
    """Run the notebook headless with `parameters` (TensorBoard skipped by default: no front end); return its executed
    code cells."""
    out = tmp_path / "unet-isbi.out.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters=parameters, kernel_name="python3", cwd=str(ROOT),
                               progress_bar=False)
    return [cell for cell in nbformat.read(out, as_version=4).cells if cell.cell_type == "code"]


def printed(code_cells: list) -> str:
    """Return what the cells printed."""
    return "".join(output.get("text", "") for cell in code_cells for output in cell.outputs)


def test_notebook_runs_with_tiny_preset_and_displays_the_results_grid(tmp_path, isbi_dir):
    code_cells = run_notebook(tmp_path, preset="tiny", run_dir=str(tmp_path / "nb"), data_dir=str(isbi_dir))
    errors = [output for cell in code_cells for output in cell.outputs if output.output_type == "error"]
    assert not errors, errors
    (results,) = [cell for cell in code_cells if "results" in cell.metadata.get("tags", [])]
    assert any("image/png" in output.get("data", {}) for output in results.outputs)
    assert (tmp_path / "nb" / "best.keras").is_file()
    text = printed(code_cells)
    assert "compiled with loss binary_crossentropy; metrics accuracy, pixel_difference" in text
    assert all(f"\n{name}(" in text for name in ("TensorBoard", "ModelCheckpoint", "ImageHistory", "StopOnNaN"))
    assert "TensorBoard skipped here" in text  # headless
    # Run All again resumes the run folder, as the command line does
    again = printed(run_notebook(tmp_path, preset="tiny", run_dir=str(tmp_path / "nb"), data_dir=str(isbi_dir),
                                 epochs=3))
    assert f"resuming from {tmp_path / 'nb' / 'last.keras'} in epoch 3 after batch 0" in again


def test_notebook_without_training_shows_the_shipped_models_results(tmp_path, isbi_dir):
    code_cells = run_notebook(tmp_path, preset="tiny", run_dir=str(tmp_path / "empty"), data_dir=str(isbi_dir),
                              train_model=False)
    text = printed(code_cells)
    assert "showing the shipped models/unet-isbi-cpu.npz" in text
    card = json.loads((ROOT / "models" / "unet-isbi-cpu.json").read_text())["test_scores"]["mean"]
    mean_row = next(line.split() for line in text.splitlines() if line.split()[:1] == ["mean"])
    # the score table of the test pages: the shipped model's card, reproduced (to 0.1 % of the pixels)
    assert float(mean_row[1]) == pytest.approx(card["pixel_difference"], abs=0.1)
    (results,) = [cell for cell in code_cells if "results" in cell.metadata.get("tags", [])]
    assert any("image/png" in output.get("data", {}) for output in results.outputs)
    assert not (tmp_path / "empty" / "best.keras").exists()


def test_notebook_trains_on_a_folder_pair_of_own_pages_and_scores_its_validation_pages(tmp_path, isbi_dir):
    import data_cli

    pairs = data_cli.make_example(tmp_path / "own", isbi_dir, size=(200, 300), pages=(1, 2, 3, 4))
    code_cells = run_notebook(tmp_path, preset="tiny", run_dir=str(tmp_path / "nb"), images=str(pairs / "images"),
                              labels=str(pairs / "masks"), split="1", epochs=1)
    errors = [output for cell in code_cells for output in cell.outputs if output.output_type == "error"]
    assert not errors, errors
    text = printed(code_cells)
    assert "page-02.png" in text and "200x300" in text  # the data report names the validation page and its size
    assert "on pages [1]:" in text  # the scores are those of validation page 1, not of ISBI's test pages
    (results,) = [cell for cell in code_cells if "results" in cell.metadata.get("tags", [])]
    assert any("image/png" in output.get("data", {}) for output in results.outputs)



# ---------------------------------------------------------------- the committed notebook's stored outputs

def committed_code_cells() -> list:
    return [cell for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code"]


def tagged(cells: list, tag: str):
    (cell,) = [cell for cell in cells if tag in cell.metadata.get("tags", [])]
    return cell


def test_the_committed_notebook_ran_every_cell_in_order_without_errors():
    counts = [cell.execution_count for cell in committed_code_cells()]
    assert counts == list(range(1, len(counts) + 1)), counts  # one fresh kernel, top to bottom, nothing skipped
    errors = [output for cell in committed_code_cells() for output in cell.outputs if output.output_type == "error"]
    assert not errors


def test_the_committed_notebook_shows_the_result_grid_and_the_curves_as_pictures():
    cells = committed_code_cells()
    for tag in ("results", "curves"):
        assert any("image/png" in output.get("data", {}) for output in tagged(cells, tag).outputs), tag
    size = NOTEBOOK.stat().st_size
    assert size < 5 * 2**20, f"{size / 2**20:.1f} MB"
    text = NOTEBOOK.read_text()
    assert str(ROOT) not in text and "/home/" not in text and "/root/" not in text  # no paths of the machine


def test_the_committed_notebook_trained_the_preset_of_the_shipped_model_and_printed_whole_score_tables():
    import train

    # The notebook stores its own Run All of today's preset (seed 0); the shipped model is another seed of the same
    # preset (the median of bench/seeds.py's seeds 1-3, README: Results), at the width its machine trained.
    shipped = json.loads((ROOT / "models" / "unet-isbi-cpu.json").read_text())["training"]["settings"]
    preset = train.PRESETS[shipped["preset"]]
    assert shipped["filters"] in (preset.filters, preset.fallback_filters)
    text = "".join(output.get("text", "") for cell in committed_code_cells() for output in cell.outputs)
    started = next(line for line in text.splitlines() if line.startswith("starting training: "))
    assert started.startswith(f"starting training: preset {shipped['preset']}, {preset.filters} filters (")
    assert f"{shipped['crop']}x{shipped['crop']} crops, batch {shipped['batch_size']}, {shipped['epochs']} epochs x " in started
    scores = "".join(output.get("text", "") for output in tagged(committed_code_cells(), "scores").outputs)
    probability_rows, cell_rows = scores.split("cells (multicut):")
    for rows, column in ((probability_rows, 4), (cell_rows, 1)):  # V_rand of the map, of the cells
        pages = [float(line.split()[column]) for line in rows.splitlines() if line.split()[:1] in (["0"], ["10"], ["20"])]
        mean = [float(line.split()[column]) for line in rows.splitlines() if line.split()[:1] == ["mean"]]
        assert len(pages) == 3 and mean == [pytest.approx(sum(pages) / 3, abs=1e-4)]


# ---------------------------------------------------------------- the committed notebook's code

def test_the_committed_notebook_runs_all_with_a_users_defaults():
    cells = committed_code_cells()
    assert not [cell for cell in cells if "injected-parameters" in cell.metadata.get("tags", [])]
    defaults = {}
    exec(tagged(cells, "parameters").source, defaults)
    assert (defaults["preset"], defaults["train_model"], defaults["data_dir"], defaults["run_dir"]) == \
        ("auto", True, None, None)
    assert defaults["tensorboard"] is None  # inline where a front end shows it, skipped headless
    text = NOTEBOOK.read_text()
    assert "+dirty" not in text and "injected-parameters" not in text


def test_the_committed_notebook_trains_in_sight_with_the_designs_callbacks():
    import train

    code = "\n".join(cell.source for cell in committed_code_cells())
    assert "import model\n" not in code  # `model` is the network the notebook trains
    for step in ("prepared = train.prepare(settings", "model = prepared.model", "train.describe_compiled(model)",
                 "callbacks = train.make_callbacks(prepared)", "train.fit(prepared, callbacks"):
        assert step in code, step
    for name, kind in (("tensorboard", "TensorBoard"), ("model_checkpoint", "ModelCheckpoint"),
                       ("image_history", "ImageHistory")):
        assert f"callbacks.{name}" in code and typing.get_type_hints(train.RunCallbacks)[name].__name__ == kind


# ---------------------------------------------------------------- tools/store_notebook.py

@pytest.fixture(scope="module")
def store_notebook():
    import importlib.util

    spec = importlib.util.spec_from_file_location("store_notebook", ROOT / "tools" / "store_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stored_outputs_drop_the_injected_parameters_and_count_the_cells_as_run_all_does(store_notebook):
    cells = [nbformat.v4.new_code_cell("preset = 'auto'", execution_count=1),
             nbformat.v4.new_code_cell("preset = 'cpu'", execution_count=2), nbformat.v4.new_markdown_cell("text"),
             nbformat.v4.new_code_cell("1", execution_count=3,
                                       outputs=[nbformat.v4.new_output("execute_result", {"text/plain": "1"},
                                                                       execution_count=3)])]
    cells[1].metadata["tags"] = ["injected-parameters"]
    notebook = nbformat.v4.new_notebook(cells=cells)
    store_notebook.without_injected_parameters(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.source for cell in code] == ["preset = 'auto'", "1"]
    assert [cell.execution_count for cell in code] == [1, 2] and code[1].outputs[0].execution_count == 2


@pytest.mark.parametrize("commit", ["421c306+dirty", None])
def test_a_run_from_a_dirty_checkout_is_not_stored(store_notebook, tmp_path, commit):
    import runs

    runs.RunFolder(tmp_path).write_json(runs.RunFolder(tmp_path).summary, {"commit": commit})
    with pytest.raises(ValueError, match="clean checkout"):
        store_notebook.trained_commit(tmp_path)
    runs.RunFolder(tmp_path).write_json(runs.RunFolder(tmp_path).summary, {"commit": "421c306"})
    assert store_notebook.trained_commit(tmp_path) == "421c306"
