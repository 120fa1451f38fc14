# Quick start:  make run   (set up, train the preset that fits this machine, evaluate, draw figures)
#               make test  (set up, run the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PRESET ?= auto
RUN    ?= runs/$(PRESET)
# TensorFlow's own log level; the tools also keep its native lines off the screen (cli.py: --tf-logs shows them).
export TF_CPP_MIN_LOG_LEVEL ?= 1

.PHONY: setup data run train evaluate figures submission benchmark export test notebook notebook-outputs lab clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (unet-isbi)" > /dev/null
	touch $@

# The ISBI stacks: found in $ISBI_DATA_DIR or data/, else downloaded there (checked) from $ISBI_DATA_URL or the mirror.
data: setup
	$(PY) data.py fetch

# A user's run writes its figures and scores into its own folder; the checkout stays as it was.
# evaluate.py --tune chooses how to cut the output into cells on the validation pages and keeps it in $(RUN)/best.json.
run: data
	$(PY) train.py --preset $(PRESET) --run-dir $(RUN)
	$(PY) evaluate.py $(RUN)/best.keras --tune --out $(RUN)/evaluation.json --grid $(RUN)/images/unet_results.png
	$(PY) figures.py $(RUN)/logs --out $(RUN)/images
	@echo "this run's model, scores and figures: $(RUN)/best.keras, $(RUN)/evaluation.json, $(RUN)/images/"

# The challenge's submission: test-volume.tif predicted as a 32-bit float TIFF, 1 = cell.
MODEL ?= $(RUN)/best.keras
submission: setup
	$(PY) predict.py --challenge --model $(MODEL) --out submission/test-volume-prediction.tif

benchmark: setup
	$(PY) benchmark.py --precision float32 --precision mixed_bfloat16 --out bench/seed-512-b5.json

# The shipped model (or EXPORT_MODEL=runs/<run>/best.keras) for bioimage.io tools, onnxruntime and TF Serving, in dist/.
EXPORT_MODEL ?= models/unet-isbi-cpu.npz
export: setup
	$(PY) export.py --format bioimageio --model $(EXPORT_MODEL)
	$(PY) export.py --format onnx --model $(EXPORT_MODEL)
	$(PY) export.py --format savedmodel --model $(EXPORT_MODEL)
	$(PY) export.py --format keras --model $(EXPORT_MODEL)

train: data
	$(PY) train.py --preset $(PRESET) --run-dir $(RUN)

evaluate: data
	$(PY) evaluate.py $(RUN)/best.keras --tune --out $(RUN)/evaluation.json --grid $(RUN)/images/unet_results.png

# Maintainers: redraw the README's pictures in images/ from a run, e.g. make figures RUN=runs/cpu
figures: data
	$(PY) evaluate.py $(RUN)/best.keras --tune --out $(RUN)/evaluation.json --grid images/unet_results.png
	$(PY) figures.py $(RUN)/logs --out images

# The notebook headless, as Run All does it: it trains (or resumes) $(RUN); TensorBoard is skipped without a front end.
notebook: data
	$(PY) -m papermill unet-isbi.ipynb $(RUN)-notebook.ipynb -p preset $(PRESET) -p run_dir $(RUN)

# Maintainers: Run All of the committed notebook with its defaults (it trains), outputs stored in place
notebook-outputs: data
	$(PY) tools/store_notebook.py

# The notebook in JupyterLab, on this project's venv (kernel "Python 3 (unet-isbi)"); JupyterLab comes from requirements-lab.txt.
lab: setup
	$(PY) -m pip install --quiet -r requirements-lab.txt
	$(PY) -m jupyter lab unet-isbi.ipynb

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache __pycache__ tests/__pycache__
