"""The package arrows: pipeline -> train, quantize, serve; train -> serve; quantize -> serve; serve -> none of ours."""

from __future__ import annotations

import ast

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
