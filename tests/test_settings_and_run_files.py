"""Hostile settings and files: numbers in scientific notation, nan and inf, sizes out of reach, config and run files
that are pipes, devices, folders or too large, and runs_dir that cannot hold runs. Each is one line, at once."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pipeline.config import LIMITS, ConfigError, load_config, parse_override
from tests.conftest import PIPELINE, ROOT, run_pipeline
from tests.test_run_safety import TINY

FLOAT_SETTINGS = ["learning_rate", "width", "dropout", "label_smoothing", "warmup_epochs", "val_fraction"]


def pipeline(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    """`pipeline ARGS`, which must end within `timeout` seconds (a read of a named pipe would wait for good)."""
    return subprocess.run([*PIPELINE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def setting(text: str) -> dict:
    """`--set key=value` as the command line reads it."""
    return dict([parse_override(text)])


def test_scientific_notation_is_a_number_on_the_command_line_and_in_config_files(tmp_path):
    for text, value in [("1e-3", 0.001), ("5E-4", 0.0005), ("2e+0", 2.0), (".5e-2", 0.005), ("1.0e-3", 0.001)]:
        assert load_config(None, setting(f"learning_rate={text}"))["learning_rate"] == value, text
    # What `pipeline train --workers N` passes each worker: the value as JSON, which writes 5e-05 without a dot.
    assert load_config(None, setting(f"learning_rate={json.dumps(5e-05)}"))["learning_rate"] == 5e-05
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 3e-4\nwarmup_epochs: 1E0\nname: 1e3x\n")
    config = load_config(path)
    assert (config["learning_rate"], config["warmup_epochs"], config["name"]) == (0.0003, 1.0, "1e3x")
    assert load_config(None, setting("name=1e3x"))["name"] == "1e3x"  # not a number: stays a string
    for text in ["seed=2020-13-45", "epochs=[", "epochs=" + "[" * 5000]:
        with pytest.raises(ConfigError, match=r"^--set .*: not a YAML value \(\w"):
            parse_override(text)


def test_nan_and_inf_are_refused_in_every_float_setting():
    for key in FLOAT_SETTINGS:
        for text in [".nan", ".inf", "-.inf", "1e999", str(10**400)]:
            with pytest.raises(ConfigError) as refused:
                load_config(None, setting(f"{key}={text}"))
            assert str(refused.value).startswith(f"{key}="), (key, text)
            assert "\n" not in str(refused.value)


def test_sizes_have_an_upper_limit_stated_in_the_error():
    for key, limit in LIMITS.items():
        with pytest.raises(ConfigError, match=f"^{key}={limit + 1}: must be .*{limit}$"):
            load_config(None, {key: limit + 1})
        load_config(None, {key: limit if key != "input_size" else 64})  # the limit itself is allowed
    with pytest.raises(ConfigError, match="^width=9: must be a number above 0, at most 8$"):
        load_config(None, {"width": 9})
    with pytest.raises(ConfigError, match="^epochs=True: must be an integer"):  # YAML's true is not 1
        load_config(None, setting("epochs=true"))
    with pytest.raises(ConfigError, match="^seed=-1: "):
        load_config(None, {"seed": -1})
    # A few bytes of YAML aliases make a value of 10^9 items: the error shows a short form of it, at once.
    bomb = "[" + ",".join(["*a"] * 9) + "]"
    with pytest.raises(ConfigError) as refused:
        load_config(None, setting(f"epochs=[&a [&b [&c [&d [&e [&f [1,2,3,4,5,6,7,8,9]]]]]], {bomb}]"))
    assert len(str(refused.value)) < 400


def test_float_options_refuse_nan_and_inf():
    for value, problem in [("nan", "nan is not a finite number"), ("inf", "inf is not in the range 0<=x<=100")]:
        line = one_line_error(pipeline("quantize", "runs/none", "--budget", value))
        assert line.startswith(f"Error: Invalid value for '--budget': {problem}"), line
    line = one_line_error(pipeline("train", "--worker-timeout", "0"))
    assert line.startswith("Error: Invalid value for '--worker-timeout': 0 is not in the range 1<=x<=86400")


def test_config_files_are_read_by_the_regular_file_rule(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "folder.yaml").mkdir()
    with open(tmp_path / "huge.yaml", "wb") as f:
        f.truncate(100 * 1024 * 1024)  # sparse: 100 MB that take no disk
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "deep.yaml").write_text("epochs: " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "date.yaml").write_text("seed: 2020-13-45\n")
    for path, problem in [
        ("/dev/zero", "is a character device, not a YAML config file"),  # was read until memory ran out
        (tmp_path / "fifo.yaml", "is a named pipe, not a YAML config file"),  # was waited on for good
        (tmp_path / "folder.yaml", "is a directory, not a YAML config file"),
        (tmp_path / "huge.yaml", "larger than 1 MiB, too large for a YAML config file"),
        (tmp_path / "latin1.yaml", "not UTF-8 text (byte 9), not a YAML config file"),
        (tmp_path / "deep.yaml", "not a readable YAML file (nested too deeply)"),
        (tmp_path / "date.yaml", "not a readable YAML file (month must be in 1..12)"),
        (tmp_path / "missing.yaml", "no such file"),
    ]:
        assert one_line_error(pipeline("train", "--config", str(path), timeout=60)) == f"Error: {path}: {problem}"


def test_a_runs_config_yaml_that_is_a_named_pipe_is_refused_on_resume(tmp_path):
    run = tmp_path / "exp"
    (run / "checkpoints" / "epoch_001").mkdir(parents=True)  # something to resume: its config is read
    os.mkfifo(run / "config.yaml")
    result = pipeline("train", "--resume", "--set", f"runs_dir={tmp_path}", timeout=60)
    assert one_line_error(result) == f"Error: {run / 'config.yaml'}: is a named pipe, not a YAML config file"


def test_runs_dir_that_cannot_hold_runs_is_one_line(tmp_path):
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    cases = [
        (a_file, f"{a_file}: runs_dir is a file, not a folder; set runs_dir to a folder"),
        (a_file / "runs", f"{a_file / 'runs'}: runs_dir is under {a_file}, which is a file; set runs_dir to a folder"),
    ]
    if Path("/sys/kernel").is_dir():  # sysfs: no one creates a folder there, root included
        cases.append((Path("/sys/kernel/runs"), "/sys/kernel/runs: cannot create runs_dir ("))
    if os.geteuid() != 0:  # root writes into a read-only folder regardless of its mode
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        cases.append((locked, f"{locked}: runs_dir is not writable (permission denied)"))
    for runs_dir, problem in cases:
        line = one_line_error(pipeline("train", "--set", f"runs_dir={runs_dir}"))
        assert line.startswith(f"Error: {problem}"), line
    assert a_file.read_text() == "root:x:0:0\n"


@pytest.mark.slow
def test_run_files_read_back_on_resume_and_by_quantize_are_refused_when_not_regular(tmp_path):
    run_pipeline("train", "--name", "exp", "--set", f"runs_dir={tmp_path}", *TINY)
    run = tmp_path / "exp"
    for name, kind in [
        ("data.json", "a run's JSON file"),
        ("metrics.json", "a run's JSON file"),
        ("summary.json", "a run's JSON file"),
    ]:
        (run / name).rename(run / f"{name}.kept")
        os.mkfifo(run / name)
        if name == "summary.json":
            result = pipeline("quantize", str(run), "--calibration-images", "20", timeout=120)
        else:
            result = pipeline("train", "--name", "exp", "--set", f"runs_dir={tmp_path}", "--resume", "--epochs", "2")
        assert one_line_error(result) == f"Error: {run / name}: is a named pipe, not {kind}", name
        (run / name).unlink()
        (run / f"{name}.kept").rename(run / name)
