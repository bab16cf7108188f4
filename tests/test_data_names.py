"""Image folders with hostile names: bytes that are not UTF-8 in file and class folder names, under any locale, and
class folders that are one folder under two names."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PIPELINE, ROOT, make_image_folder
from tests.test_cache import decoded, folder_config
from train.data import DataError, load_dataset, scan_image_folder

# The C locale, and a strict UTF-8 stdout: a name Python cannot encode there stops any print that contains it.
HOSTILE_LOCALE = {**os.environ, "LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": "utf-8"}
LOAD_AND_SHOW = [
    sys.executable,
    "-c",
    "import json, sys; from pipeline.config import load_config; from train.data import load_dataset\n"
    "config = {'data': sys.argv[1], 'input_size': 24, 'channels': 3, 'cache_dir': sys.argv[2]}\n"
    "data = load_dataset(load_config(None, config))\n"
    "print(json.dumps([data.class_names, data.fingerprint, data.skipped], ensure_ascii=False))\n",
]


def not_utf8_folder(root: Path) -> Path:
    """make_image_folder's three classes, one renamed to Latin-1 "café", with a file named x + 0xff + .png and an
    unreadable bad + 0xfe + .jpg among the others."""
    make_image_folder(root, per_class=5)
    os.rename(root / "blue_stripes", root / os.fsdecode(b"caf\xe9"))
    png = next((root / "green_discs").glob("*.png"))
    os.rename(png, root / "green_discs" / os.fsdecode(b"x\xff.png"))
    (root / "red_squares" / os.fsdecode(b"bad\xfe.jpg")).write_bytes(b"not a picture")
    return root


def bytes_fingerprint(root: Path) -> str:
    """sha256 over each file's relative name, as the bytes the filesystem holds, and content hash, in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(os.fsencode(path.relative_to(root)) + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def test_names_that_are_not_utf8_cache_and_label_escaped_under_any_locale(tmp_path):
    root = not_utf8_folder(tmp_path / os.fsdecode(b"data\xfe"))
    cache_dir = tmp_path / os.fsdecode(b"cache\xfd")
    runs = [
        subprocess.run([*LOAD_AND_SHOW, str(root), str(cache_dir)], env=HOSTILE_LOCALE, capture_output=True, cwd=ROOT)
        for _ in range(2)
    ]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr.decode(errors="replace")
    assert [decoded(run.stderr.decode()) for run in runs] == [[16], []]  # the second run finds the cache
    escaped_root = str(tmp_path) + "/data\\xfe"
    assert (
        f"warning: {escaped_root}/red_squares/bad\\xfe.jpg: skipped (not a readable image)" in runs[1].stderr.decode()
    )
    class_names, fingerprint, skipped = json.loads(runs[1].stdout.decode("utf-8"))
    assert class_names == ["caf\\xe9", "green_discs", "red_squares"]
    assert fingerprint == bytes_fingerprint(root)
    assert skipped == [f"{escaped_root}/red_squares/bad\\xfe.jpg"]

    listed = subprocess.run(
        [*PIPELINE, "cache", "--cache-dir", str(cache_dir)], env=HOSTILE_LOCALE, capture_output=True, cwd=ROOT
    )
    assert listed.returncode == 0 and escaped_root.encode() in listed.stdout, listed.stderr


def test_two_class_folders_that_are_one_folder_are_refused(tmp_path):
    root = make_image_folder(tmp_path / "shapes", per_class=3)
    (root / "zebra").symlink_to(root / "green_discs")
    with pytest.raises(DataError) as refused:
        load_dataset(folder_config(root, tmp_path / "cache"))
    assert str(refused.value) == f"{root}: the class folders 'green_discs' and 'zebra' are the same folder: keep one"

    (root / "zebra").unlink()
    (root / "all").symlink_to(root)  # its images would be the other classes' too
    with pytest.raises(DataError) as refused:
        scan_image_folder(root)
    assert str(refused.value) == f"{root}: the class folder 'blue_stripes' lies inside 'all': keep one"

    (root / "all").unlink()
    image = next((root / "red_squares").glob("*.png")).read_bytes()
    for name in (os.fsdecode(b"caf\xe9"), "caf\\xe9"):  # two folders, one label
        (root / name).mkdir()
        (root / name / "0.png").write_bytes(image)
    with pytest.raises(DataError) as refused:
        scan_image_folder(root)
    assert (
        str(refused.value) == f"{root}: two class folders give the label 'caf\\xe9' (one name is not UTF-8): rename one"
    )


@pytest.mark.slow
def test_a_run_on_names_that_are_not_utf8_trains_and_writes_utf8_labels(tmp_path):
    root, runs = not_utf8_folder(tmp_path / "photos"), tmp_path / "runs"
    settings = ["input_size=24", "channels=3", f"cache_dir={tmp_path / 'cache'}", f"runs_dir={runs}"]
    train = ["train", "--data", str(root), "--name", "names", "--epochs", "1", "--batch-size", "8"]
    for command in (
        [*train, *(arg for setting in settings for arg in ("--set", setting))],
        ["quantize", str(runs / "names"), "--mode", "float16"],
    ):
        result = subprocess.run([*PIPELINE, *command], env=HOSTILE_LOCALE, capture_output=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
    class_names = ["caf\\xe9", "green_discs", "red_squares"]
    assert json.loads((runs / "names" / "data.json").read_bytes())["class_names"] == class_names
    labels = (runs / "names" / "export" / "labels.txt").read_bytes().decode("utf-8")
    assert labels.splitlines() == class_names
