"""The module map holds: no import cycle among the project's modules, and inference never reaches training code.

Imports are read from the source (every `import x` / `from x import y`, at any depth, lazy ones included), so
the test needs no TensorFlow and fails as soon as a line that breaks the layers is written.
"""

import ast

import pytest
from conftest import ROOT

MODULES = sorted(path.stem for path in ROOT.glob("*.py"))
TRAINING = {"train", "callbacks", "losses", "distribute"}
INFERENCE = ["tiling", "runtimes", "predict", "blocks", "export", "figures", "evaluate"]
LEAVES = ["files", "data", "augment", "model", "metrics", "hardware", "cli", "affinities", "segment"]


def project_imports(module: str) -> set[str]:
    """Return the project modules that `module` imports anywhere in its source."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if name in MODULES and name != module}


def reachable(module: str) -> dict[str, list[str]]:
    """Return {module reached: the import chain from `module` to it}."""
    chains, todo = {module: [module]}, [module]
    while todo:
        current = todo.pop()
        for name in sorted(project_imports(current)):
            if name not in chains:
                chains[name] = chains[current] + [name]
                todo.append(name)
    return chains


def test_the_layers_name_real_modules():
    assert set(INFERENCE + LEAVES) | TRAINING <= set(MODULES)


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


def test_the_checks_catch_a_cycle_and_a_training_import(tmp_path, monkeypatch):
    for name, source in (("a", "import b\n"), ("b", "def f():\n    from a import x\n"), ("c", "import train\n")):
        (tmp_path / f"{name}.py").write_text(source)
    (tmp_path / "train.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "MODULES", ["a", "b", "c", "train"])
    assert reachable("a")["a"] == ["a"] and reachable("b")["a"] == ["b", "a"]
    assert "train" in reachable("c")
