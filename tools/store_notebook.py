"""Store in the committed notebook the outputs of Run All with its own defaults, as a maintainer does when the
preset changes.

    .venv/bin/python tools/store_notebook.py          # or: make notebook-outputs

Runs unet-isbi.ipynb headless (papermill, no parameters given) from a clean checkout: it trains the `auto`
preset into the preset's run folder, which must not exist yet, then draws the curves and the image history
from the run's logs and scores its best model, in Keras (the runtime the model card's scores use). The data
are read from data/ so that no path of this machine is stored. TensorFlow's native log lines
(cli.NATIVE_LOG), which the kernel captures from its stderr, and redrawn progress-bar states are dropped;
everything else is stored as the run printed and drew it. A checkout with uncommitted changes is refused:
the Training section names its commit. The shipped model is another run of the preset (README,
Results), shipped with `python export.py <run folder>`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nbformat  # noqa: E402

import cli  # noqa: E402
import runs  # noqa: E402

NOTEBOOK = ROOT / "unet-isbi.ipynb"


def cleaned(text: str) -> str:
    """Return stderr text without TensorFlow's native log lines, and a progress bar only in its last state."""
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines(keepends=True)]
    return "".join(line for line in lines if cli.keep(line))


def trained_commit(run_dir: str | Path) -> str:
    """Return the commit the finished run in `run_dir` was trained from; ValueError when it has not finished or
    was trained from a checkout with uncommitted changes, which no one can check out again."""
    summary = runs.RunFolder(run_dir).read_json(runs.RunFolder(run_dir).summary)
    if summary is None:
        raise ValueError(f"{run_dir} has no summary.json: the run has not finished")
    commit = summary.get("commit") or "unknown"
    if commit == "unknown" or commit.endswith("+dirty"):
        raise ValueError(f"{run_dir} was trained from commit {commit}, which cannot be checked out again: train it "
                         "from a clean checkout before storing its outputs")
    return commit


def without_injected_parameters(notebook) -> None:
    """Drop the cell papermill injected below the parameters and number the code cells 1, 2, ... again, as Run All
    of the committed notebook numbers them."""
    notebook.cells = [cell for cell in notebook.cells if "injected-parameters" not in cell.metadata.get("tags", [])]
    for count, cell in enumerate((cell for cell in notebook.cells if cell.cell_type == "code"), start=1):
        cell.execution_count = count
        for output in cell.outputs:
            if "execution_count" in output:
                output.execution_count = count


def store() -> Path:
    """Run All of the committed notebook with its defaults (it trains) and write it, outputs included, in place."""
    import papermill

    import train

    commit = runs.git_commit() or "unknown"
    if commit == "unknown" or commit.endswith("+dirty"):
        raise ValueError(f"the checkout is at {commit}: commit the changes first, so that the run names its commit")
    run_dir = ROOT / train.preset("auto").run_dir
    if run_dir.exists():
        raise ValueError(f"{run_dir} exists: move it away, so that Run All trains afresh")
    os.environ["UNET_ISBI_RUNTIME"] = "keras"
    os.environ.pop("ISBI_DATA_DIR", None)
    out = NOTEBOOK.with_suffix(".executing.ipynb")
    papermill.execute_notebook(str(NOTEBOOK), str(out), cwd=str(ROOT), kernel_name="python3", progress_bar=False)
    trained_commit(run_dir)
    return stored(out)


def stored(out: Path) -> Path:
    """Write the executed notebook `out` in place of the committed one, its stderr cleaned, as Run All numbers it."""
    notebook = nbformat.read(out, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        kept, stderr = [], None
        for output in cell.outputs:
            if output.output_type == "stream" and output.name == "stderr":
                if stderr is None:  # the cell's stderr as one output, where it first appeared
                    stderr = output
                    kept.append(output)
                else:
                    stderr.text += output.text
                continue
            kept.append(output)
        if stderr is not None:
            stderr.text = cleaned(stderr.text)
        for output in kept:  # the project's own paths as the reader's checkout has them: relative
            if output.output_type == "stream":
                output.text = output.text.replace(f"{ROOT}/", "")
        cell.outputs = [output for output in kept if output is not stderr or stderr.text.strip()]
    without_injected_parameters(notebook)
    notebook.metadata.get("papermill", {}).update({"input_path": NOTEBOOK.name, "output_path": NOTEBOOK.name})
    nbformat.write(notebook, NOTEBOOK)
    out.unlink()
    return NOTEBOOK


if __name__ == "__main__":
    if len(sys.argv) != 1:
        sys.exit(__doc__)
    try:
        print(f"wrote {store()}")
    except ValueError as err:
        sys.exit(f"error: {err}")
