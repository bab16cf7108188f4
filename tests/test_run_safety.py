"""Run directories: names confined to runs_dir, one process per run, resumes that keep the run what it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import DEFAULTS
from tests.conftest import ROOT, make_image_folder, run_pipeline
from train.rundir import RUN_DEFINING, RunDir, RunLockedError

TINY = ["--set", "max_images_per_class=20", "--epochs", "1", "--batch-size", "32"]


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under `root`: a file's bytes, a symlink's target, or "dir"."""
    entries: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = os.readlink(path)
        elif path.is_dir():
            entries[key] = "dir"
        else:
            entries[key] = path.read_bytes()
    return entries


def last_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_names_outside_runs_dir_with_exist_ok_delete_nothing(tmp_path):
    work = tmp_path / "work"  # the current directory; runs_dir is the default, relative "runs"
    (work / "runs" / "keep").mkdir(parents=True)
    (work / "notes.txt").write_text("the user's own file")
    (work / "runs" / "keep" / "metrics.json").write_text("[]")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.txt").write_text("not a run")
    (work / "runs" / "link").symlink_to(elsewhere)
    before = snapshot(tmp_path)
    names = ["..", ".", "", str(elsewhere), "a/b", "keep/..", ".keep", "link", "a\\b"]
    for name in names:
        result = run_pipeline("train", "--name", name, "--exist-ok", *TINY, cwd=work, check=False)
        assert result.returncode == 1, name
        assert last_line(result).startswith(f"Error: name={name!r}: must name a directory inside runs_dir"), name
    result = run_pipeline("train", "--set", 'name="a\\0b"', "--exist-ok", *TINY, cwd=work, check=False)
    assert result.returncode == 1 and last_line(result).startswith("Error: name='a\\x00b'")
    assert snapshot(tmp_path) == before


def test_two_trainings_on_one_name_cannot_run_at_once(tmp_path):
    run = tmp_path / "same"
    run.mkdir()
    (run / "metrics.json").write_text("[]")
    in_use = f"{run}: in use by PID {{}} (training); wait for it to finish or use another --name"

    with RunDir(run).lock("training"):  # this test process is the first trainer
        result = run_pipeline(
            "train", "--name", "same", "--exist-ok", "--set", f"runs_dir={tmp_path}", *TINY, check=False
        )
    assert result.returncode == 1 and last_line(result) == "Error: " + in_use.format(os.getpid())
    assert (run / "metrics.json").read_text() == "[]"

    # Another process holds it, then is killed: the kernel frees the lock, no stale lock file blocks.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from pathlib import Path\nfrom train.rundir import RunDir\n"
            f"with RunDir(Path({str(run)!r})).lock('training'):\n"
            "    print('held', flush=True)\n    input()",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunLockedError) as refused:
            with RunDir(run).lock("training"):
                pass
        assert str(refused.value) == in_use.format(holder.pid)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunDir(run).lock("quantizing"):
        pass

    # With the lock free, the same training goes ahead.
    run_pipeline("train", "--name", "same", "--exist-ok", "--set", f"runs_dir={tmp_path}", *TINY)
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1


def test_resume_with_nothing_to_resume_starts_the_run_and_with_lost_checkpoints_is_refused(tmp_path):
    runs = ["--name", "new", "--set", f"runs_dir={tmp_path}"]
    run = tmp_path / "new"
    started = f"{run}: nothing to resume yet, starting it"
    # Held by another process: refused before anything is decided, even with nothing to resume.
    with RunDir(run).lock("training"):
        result = run_pipeline("train", *runs, "--resume", *TINY, check=False)
    in_use = f"{run}: in use by PID {os.getpid()} (training); wait for it to finish or use another --name"
    assert last_line(result) == f"Error: {in_use}"
    assert not run.exists()

    result = run_pipeline("train", *runs, "--resume", *TINY)
    assert started in result.stderr.splitlines()
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1

    # A run with its epochs' results but its checkpoints deleted is not started over: that would lose them.
    for path in (run / "checkpoints").iterdir():
        for file in path.iterdir():
            file.unlink()
        path.rmdir()
    before = snapshot(run)
    result = run_pipeline("train", *runs, "--resume", "--epochs", "2", check=False)
    assert result.returncode == 1 and started not in result.stderr
    assert last_line(result) == f"Error: {run}: no complete checkpoint to resume from; start it over with --exist-ok"
    assert snapshot(run) == before


def test_resume_cannot_change_what_defines_the_run(tmp_path):
    shapes = make_image_folder(tmp_path / "shapes", per_class=8)
    runs = ["--name", "shapes", "--set", f"runs_dir={tmp_path / 'runs'}"]
    folder = ["--data", str(shapes), "--set", "channels=3", "--set", "input_size=24"]
    run_pipeline("train", *runs, *folder, "--epochs", "1", "--batch-size", "8")
    run = tmp_path / "runs" / "shapes"
    before = snapshot(run)
    for change, refusal in [
        (["--set", "seed=7"], "seed (42 -> 7)"),
        (["--set", "width=0.5"], "width (1.0 -> 0.5)"),
        (["--set", "augment=true"], "augment (none -> basic)"),
        (["--data", "fashion-mnist"], f"data ({shapes} -> fashion-mnist)"),
    ]:
        result = run_pipeline("train", *runs, "--resume", *change, check=False)
        assert result.returncode == 1, change
        assert last_line(result) == f"Error: {run}: --resume cannot change {refusal}; start a new run with --name"
    assert snapshot(run) == before

    # What may change is listed in --resume's help, and does change: the documented fine-tuning resume.
    help_text = " ".join(run_pipeline("train", "--help").stdout.split())
    for key in set(DEFAULTS) - set(RUN_DEFINING) - {"name", "runs_dir"}:
        assert key in help_text.split("--resume", 1)[1].split("--exist-ok")[0], key
    run_pipeline("train", *runs, "--resume", "--epochs", "2", "--batch-size", "4", "--set", "learning_rate=0.0005")
    assert [row["epoch"] for row in json.loads((run / "metrics.json").read_text())] == [1, 2]

    # The same settings naming changed images are refused too.
    Image.new("RGB", (30, 30), (0, 0, 230)).save(shapes / "blue_stripes" / "000.png")
    before = snapshot(run)
    result = run_pipeline("train", *runs, "--resume", "--epochs", "3", check=False)
    assert result.returncode == 1
    assert last_line(result).startswith(f"Error: {run}: --resume cannot change the data ({shapes} changed")
    assert snapshot(run) == before


def test_exist_ok_keeps_the_old_run_until_the_new_one_is_built(tmp_path):
    runs = ["--name", "old", "--set", f"runs_dir={tmp_path}"]
    run_pipeline("train", *runs, *TINY)
    before = snapshot(tmp_path / "old")
    (tmp_path / "no_images").mkdir()
    for change, error in [
        (["--data", str(tmp_path / "no_images")], "no images found"),  # the data fails
        # Config and data are fine; 2x2 pixels cannot go through small_cnn's two poolings: the model build fails.
        (["--set", "input_size=2"], "MaxPooling2D"),
    ]:
        result = run_pipeline("train", *runs, "--exist-ok", *TINY, *change, check=False)
        assert result.returncode == 1 and error in last_line(result), result.stderr
        assert snapshot(tmp_path / "old") == before
