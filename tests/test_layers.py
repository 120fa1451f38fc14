"""The module map holds: every module sits in one layer of the map, an import only ever points down (or within
its layer), no import cycle, inference never reaches training code, and no numpy module loads TensorFlow.

Imports are read from the source (every `import x` / `from x import y`, at any depth, lazy ones included, except
a script's own `if __name__ == "__main__":` block), so the test needs no TensorFlow and fails as soon as a line
that breaks the layers is written. What loads at import time is read from the module level only, and checked
once more in a fresh process, which also sees a third-party package that loads TensorFlow.
"""

import ast
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

MODULES = sorted(path.stem for path in ROOT.glob("*.py"))
# The layers of the project's map (ARCHITECTURE.md), top to bottom. The jobs are functions of the faces
# (train(), predict_files(), evaluate(), export_*()) and of blocks.py and segment.py, not modules of their own.
FACES = ["train", "predict", "evaluate", "export", "benchmark", "op_profile", "figures", "data_cli"]  # op_profile:
# benchmark.py's FLOP count and per-op profile
# presets: what a run is made of (the settings, the presets, their flags); sizing: a run sized to a time budget.
TRAINING = ["presets", "sizing", "callbacks", "averaging", "runs", "distribute", "losses"]  # losses: a Keras module
# that only training reaches; averaging: the optimizer's moving average of the weights
INFERENCE = ["tiling", "runtimes", "cards", "outputs", "blocks"]  # cards: a model's card and its ModelIO;
# outputs: what predicting an image writes
LEAVES = ["data", "augment", "segment", "stitch", "labels", "affinities", "files", "hardware", "scores", "shapes", "cli",
          "model", "metrics", "compact"]
LAYERS = [FACES, TRAINING, INFERENCE, LEAVES]
KERAS_LEAVES = ["model", "metrics", "augment"]  # augment: its AugmentedBatches is a keras.utils.PyDataset
# Modules that must import without TensorFlow or Keras: the inference layer and the numpy leaves (runtimes
# loads Keras only when it loads a Keras model), and the faces that run without a model.
NO_TENSORFLOW = ([name for name in INFERENCE + LEAVES if name not in KERAS_LEAVES]
                 + ["predict", "evaluate", "figures", "data_cli"])
TENSORFLOW = {"tensorflow", "keras"}
# Scripts whose --help must start without TensorFlow.
HELP_WITHOUT_TENSORFLOW = ["segment", "predict", "evaluate", "data"]


def _is_main_block(node: ast.AST) -> bool:
    """Return whether `node` is `if __name__ == "__main__":` (a script's entry point, not an import)."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__" and isinstance(node.test.comparators[0], ast.Constant)
            and node.test.comparators[0].value == "__main__")


def imported_names(module: str, at_import: bool = False) -> set[str]:
    """Return the top-level names of the packages and modules that `module` imports: anywhere in its source,
    or with `at_import` only those that run when it is imported (not in functions, nor in its main block)."""
    names = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_main_block(child) or (at_import and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                           ast.Lambda))):
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name.split(".")[0] for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names.add(child.module.split(".")[0])
            visit(child)

    visit(ast.parse((ROOT / f"{module}.py").read_text()))
    return names


def project_imports(module: str, at_import: bool = False) -> set[str]:
    """Return the project modules that `module` imports (see `imported_names`)."""
    return {name for name in imported_names(module, at_import) if name in MODULES and name != module}


def reachable(module: str, at_import: bool = False) -> dict[str, list[str]]:
    """Return {module reached: the import chain from `module` to it}."""
    chains, todo = {module: [module]}, [module]
    while todo:
        current = todo.pop()
        for name in sorted(project_imports(current, at_import)):
            if name not in chains:
                chains[name] = chains[current] + [name]
                todo.append(name)
    return chains


def tensorflow_chain(module: str) -> list[str] | None:
    """Return the module-level import chain by which importing `module` loads TensorFlow or Keras, or None."""
    for name, chain in sorted(reachable(module, at_import=True).items()):
        found = imported_names(name, at_import=True) & TENSORFLOW
        if found:
            return chain + sorted(found)[:1]
    return None


def layer_of(module: str) -> int:
    """Return the depth of `module`'s layer (0: the faces)."""
    for depth, layer in enumerate(LAYERS):
        if module in layer:
            return depth
    raise AssertionError(f"{module} is not on the map")


def test_every_module_sits_in_exactly_one_layer():
    placed = [name for layer in LAYERS for name in layer]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    assert set(placed) == set(MODULES), (f"not on the map: {sorted(set(MODULES) - set(placed))}; "
                                         f"on the map but missing: {sorted(set(placed) - set(MODULES))}")
    assert set(KERAS_LEAVES) <= set(LEAVES) and set(HELP_WITHOUT_TENSORFLOW) <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_imports_only_point_down_or_within_a_layer(module):
    up = sorted(name for name in project_imports(module) if layer_of(name) < layer_of(module))
    assert not up, f"{module} ({layer_of(module)}) imports {up} from a layer above it"


def test_no_module_imports_itself_through_others():
    for module in MODULES:
        for name in project_imports(module):
            chain = reachable(name).get(module)
            assert chain is None, f"import cycle: {' -> '.join([module] + chain)}"


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_modules_never_reach_training_code(module):
    chains = reachable(module)
    reached = {name: chains[name] for name in TRAINING if name in chains}
    assert not reached, "; ".join(" -> ".join(chain) for chain in reached.values())


@pytest.mark.parametrize("module", LEAVES)
def test_leaves_import_only_leaves(module):
    outside = {name: chain for name, chain in reachable(module).items() if name not in LEAVES}
    assert not outside, "; ".join(" -> ".join(chain) for chain in outside.values())


@pytest.mark.parametrize("module", [name for name in LEAVES if name not in KERAS_LEAVES])
def test_numpy_leaves_never_import_the_keras_leaves(module):
    reached = {name: chain for name, chain in reachable(module).items() if name in KERAS_LEAVES}
    assert not reached, "; ".join(" -> ".join(chain) for chain in reached.values())


@pytest.mark.parametrize("module", NO_TENSORFLOW)
def test_numpy_modules_import_no_tensorflow_at_module_level(module):
    chain = tensorflow_chain(module)
    assert chain is None, f"importing {module} loads {chain[-1]}: {' -> '.join(chain)}"


def test_numpy_modules_and_their_help_load_no_tensorflow_in_a_fresh_process():
    # One process: the modules one by one, then each script's --help; the first that loads TensorFlow is named.
    code = (
        "import json, runpy, sys\n"
        f"steps = [('import', m) for m in {NO_TENSORFLOW!r}] + [('--help', m) for m in {HELP_WITHOUT_TENSORFLOW!r}]\n"
        "for kind, name in steps:\n"
        "    if kind == 'import':\n"
        "        __import__(name)\n"
        "    else:\n"
        "        sys.argv = [name + '.py', '--help']\n"
        "        try:\n"
        "            runpy.run_path(name + '.py', run_name='__main__')\n"
        "        except SystemExit:\n"
        "            pass\n"
        "    loaded = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        "    if loaded:\n"
        "        print(json.dumps([kind, name, loaded]))\n"
        "        break\n"
        "else:\n"
        "    print(json.dumps(None))\n"
    )
    env = {"PYTHONPATH": str(ROOT), "UNET_ISBI_VERBOSE": "1"}  # verbose: no stderr filter process (cli.py)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    offender = json.loads(done.stdout.strip().splitlines()[-1])
    assert offender is None, f"{offender[0]} {offender[1]} loads {offender[2]}"


def test_the_checks_catch_a_cycle_a_training_import_and_tensorflow(tmp_path, monkeypatch):
    sources = {
        "a": "import b\n",
        "b": "def f():\n    from a import x\n",
        "c": "import train\n",
        "d": "import e\n",
        "e": "import numpy\nfrom keras import ops\n",
        "f": "def g():\n    import keras\n\nclass H:\n    import e\n",
        "g": "import numpy\n\nif __name__ == '__main__':\n    import keras\n    import a\n",
        "train": "",
    }
    for name, source in sources.items():
        (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "MODULES", sorted(sources))
    assert reachable("a")["a"] == ["a"] and reachable("b")["a"] == ["b", "a"]
    assert "train" in reachable("c")
    assert "a" not in reachable("b", at_import=True)  # a function's import runs when it is called
    assert tensorflow_chain("d") == ["d", "e", "keras"]
    assert tensorflow_chain("f") == ["f", "e", "keras"]  # a class body runs at import
    assert tensorflow_chain("g") is None and "a" not in reachable("g")  # a script's main block is no import
