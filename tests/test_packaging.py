"""The package as `pip install .` (not editable) leaves it: named configs and package data travel with it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built the way `pip install .` builds it (an isolated build with pyproject's backend)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    return next(out.glob("edge_pipeline-*.whl"))


def test_wheel_carries_configs_and_spdx_licence(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(name for name in names if name.endswith(".dist-info/METADATA"))).decode()
    for config in (ROOT / "configs").glob("*.yaml"):
        assert f"pipeline/configs/{config.name}" in names
    assert "train/imagenet_labels.txt" in names
    # The vendored schema module that writes the standard metadata, and the page that says where it came from.
    assert {"quantize/vendored/metadata_schema_py_generated.py", "quantize/vendored/README.md"} <= set(names)
    assert "License-Expression: Apache-2.0" in metadata.splitlines()


@pytest.mark.slow
def test_installed_package_trains_a_named_config(wheel: Path, tmp_path: Path) -> None:
    # Installed files only (pip's --target), run from a folder outside the repository: nothing can come from it.
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "train",
            "--config",
            "fashion_mnist",
            "--name",
            "installed",
            "--set",
            f"runs_dir={tmp_path / 'runs'}",
            "--set",
            "max_images_per_class=20",
            "--epochs",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    config = (tmp_path / "runs" / "installed" / "config.yaml").read_text()
    assert "model: small_cnn" in config
    where = subprocess.run(
        [sys.executable, "-c", "import pipeline.config as c; print(c.CONFIG_DIR)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where) == site / "pipeline" / "configs"
