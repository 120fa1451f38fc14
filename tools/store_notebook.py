"""Refresh the committed notebook's outputs from a finished run, as a maintainer does after shipping a model.

    .venv/bin/python tools/store_notebook.py runs/cpu          # or: make notebook-outputs RUN=runs/cpu

Runs unet-isbi.ipynb headless (papermill) on the run with `train_model = False`: its curves and image history
come from the run's logs, its results from the run's best model, in Keras (the runtime the model card's
scores use). The data are read from data/ so that no path of this machine is stored. TensorFlow's native
log lines (cli.NATIVE_LOG), which the kernel captures from its stderr, and the redrawn progress-bar states
are dropped; everything else is stored as the run printed and drew it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nbformat  # noqa: E402

import cli  # noqa: E402

NOTEBOOK = ROOT / "unet-isbi.ipynb"


def cleaned(text: str) -> str:
    """Return stderr text without TensorFlow's native log lines, and a progress bar only in its last state."""
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines(keepends=True)]
    return "".join(line for line in lines if cli.keep(line))


def store(run_dir: str) -> Path:
    """Execute the notebook on `run_dir` (relative to the project) and write it, outputs included, in place."""
    import papermill

    os.environ["UNET_ISBI_RUNTIME"] = "keras"
    os.environ.pop("ISBI_DATA_DIR", None)
    out = NOTEBOOK.with_suffix(".executing.ipynb")
    papermill.execute_notebook(str(NOTEBOOK), str(out), cwd=str(ROOT), kernel_name="python3", progress_bar=False,
                               parameters={"preset": "cpu", "run_dir": run_dir, "data_dir": "data",
                                           "train_model": False, "tensorboard": False})
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
        cell.outputs = [output for output in kept if output is not stderr or stderr.text.strip()]
    notebook.metadata.get("papermill", {}).update({"input_path": NOTEBOOK.name, "output_path": NOTEBOOK.name})
    nbformat.write(notebook, NOTEBOOK)
    out.unlink()
    return NOTEBOOK


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(f"wrote {store(sys.argv[1])}")
