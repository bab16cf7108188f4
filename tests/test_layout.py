"""The package arrows: pipeline -> train, quantize, serve; train -> serve; quantize -> serve; serve -> none of ours.
And no import cycle between modules, even through imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

ALLOWED = {
    "serve": {"serve"},
    "train": {"train", "serve"},
    "quantize": {"quantize", "serve"},
    "pipeline": {"pipeline", "train", "quantize", "serve"},
}
HEAVY = {"tensorflow", "tf_keras", "keras", "tensorflow_model_optimization", "horovod"}


def imported_top_levels(package: str) -> dict[str, set[str]]:
    """Every module each file of `package` imports, at any depth (imports inside functions too)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if "node_modules" in path.parts:
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_point_one_way(package):
    ours = set(ALLOWED)
    for path, names in imported_top_levels(package).items():
        assert names & ours <= ALLOWED[package], f"{path} imports {sorted(names & ours - ALLOWED[package])}"


def test_serve_imports_nothing_heavy():
    for path, names in imported_top_levels("serve").items():
        assert not names & HEAVY, f"{path} imports {sorted(names & HEAVY)}"


def module_name(path: Path) -> str:
    """`serve.classifier` for serve/classifier.py, `serve` for serve/__init__.py."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules() -> dict[str, set[str]]:
    """Each module of ours and the modules of ours it imports, at any depth (imports inside functions too).
    `from serve import classifier` is the submodule serve.classifier where one exists, else the package serve."""
    files = {module_name(path): path for package in ALLOWED for path in (ROOT / package).rglob("*.py")}
    files = {name: path for name, path in files.items() if "node_modules" not in path.parts}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(part for part in (base, node.module) if part)
                submodules = {f"{module}.{alias.name}" for alias in node.names} & files.keys()
                targets |= submodules or {module}
        graph[name] = {target for target in targets if target in files and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None: a depth-first search that meets a module on its own path."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if cycle := visit(node):
            return cycle
    return None


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_has_the_modules_and_their_arrows():
    graph = imported_modules()
    assert "serve.bundle" in graph["pipeline.label"] and "serve.errors" in graph["serve"]
    assert "pipeline.commands" in graph["pipeline.cli"]  # imported inside main()


def test_no_import_cycle_between_modules():
    cycle = find_cycle(imported_modules())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Every file and folder of a run directory: train/rundir.py's RunDir spells them, no other module of ours.
RUN_FILE_NAMES = {
    "config.yaml",
    "data.json",
    "best.keras",
    "metrics.json",
    "metrics.csv",
    "summary.json",
    "curves.png",
    "confusion_matrix.png",
    "tensorboard",
    "membership.csv",
    "checkpoints",
    "export",
    "quantize_report.json",
    "position.json",
    "moving_stats.npz",
}


def spelled_run_files(path: Path) -> set[str]:
    """The run file names that string literals in `path` spell (a literal equal to one, or ending in /<name>);
    docstrings, which describe the layout, are left out."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found |= {name for name in RUN_FILE_NAMES if node.value == name or node.value.endswith("/" + name)}
    return found


def test_only_rundir_spells_a_run_files_name():
    owner = ROOT / "train" / "rundir.py"
    assert spelled_run_files(owner) == RUN_FILE_NAMES  # the list above is the run directory's
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != owner and "vendored" not in path.parts and "node_modules" not in path.parts:
                spelled = spelled_run_files(path)
                assert not spelled, f"{path.relative_to(ROOT)} spells {sorted(spelled)}: use train.rundir.RunDir"


def test_pipeline_labels_newest_bundle_looks_where_rundir_puts_bundles():
    """pipeline/label.py's one exception, kept for start-up time: its glob finds RunDir's bundles, nothing else."""
    from pipeline.label import BUNDLES_IN_RUNS
    from train.rundir import RunDir

    runs = Path("runs")
    bundle = RunDir(runs / "exp").bundle("int8")
    assert bundle.relative_to(runs).match(BUNDLES_IN_RUNS)
    assert not (runs / "exp" / "best.keras").relative_to(runs).match(BUNDLES_IN_RUNS)
