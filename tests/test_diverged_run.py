"""A run whose loss becomes nan or inf stops at once with one line, and nothing of the diverged epoch is saved:
no best.keras, no checkpoint, no metrics row, no summary.json. Alone, under --workers 2, and elastic."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_pipeline

TINY = ["--set", "max_images_per_class=20", "--epochs", "1", "--batch-size", "32"]
# Adam moves every weight by about the learning rate in its first step: the second batch's logits overflow.
DIVERGES = ["--set", "learning_rate=1e30"]


def diverged_line(result: subprocess.CompletedProcess) -> re.Match:
    """The one line of a run stopped by a nan loss; its batch number is group 1."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(
        r"Error: (\S+): loss became nan at epoch \d+ batch (\d+), so the epoch was not saved: (.*)", line
    )
    assert match, line
    return match


def saved_files(run: Path) -> set[str]:
    return {path.name for path in run.iterdir()} | {path.name for path in run.glob("checkpoints/*")}


@pytest.mark.slow
def test_a_diverged_run_stops_at_that_batch_saves_nothing_of_it_and_resumes_from_its_last_good_epoch(tmp_path):
    runs = ["--name", "nan", "--set", f"runs_dir={tmp_path}"]
    run = tmp_path / "nan"
    # Diverges in its first epoch: nothing to resume from.
    match = diverged_line(run_pipeline("train", *runs, *TINY, *DIVERGES, check=False))
    assert match[1] == str(run) and match[2] == "2"  # one process alone stops at the batch itself
    assert match[3] == "lower learning_rate (1e+30), then start over with --exist-ok"
    assert saved_files(run) == {"config.yaml", "data.json", "tensorboard"}  # no best.keras, checkpoint, metrics

    # A good first epoch, then a resume that diverges in the second: the first epoch's files stay as they were.
    run_pipeline("train", *runs, *TINY, "--exist-ok")
    before = {name: (run / name).read_bytes() for name in ("best.keras", "summary.json", "metrics.json")}
    match = diverged_line(run_pipeline("train", *runs, "--resume", "--epochs", "2", *DIVERGES, check=False))
    assert match[3] == "lower learning_rate (1e+30), then --resume from epoch 1"
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["epoch_001"]
    assert {name: (run / name).read_bytes() for name in before} == before

    # ... and it resumes from there at a lower rate, as the line says (config.yaml holds the resume's 1e30 now).
    run_pipeline("train", *runs, "--resume", "--epochs", "2", "--set", "learning_rate=1e-3")
    assert [row["epoch"] for row in json.loads((run / "metrics.json").read_text())] == [1, 2]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


@pytest.mark.slow
def test_two_workers_stop_together_at_a_diverged_batch(tmp_path):
    result = run_pipeline(
        "train", "--workers", "2", "--name", "nan2", "--set", f"runs_dir={tmp_path}", *TINY, *DIVERGES, check=False
    )
    diverged_line(result)
    assert saved_files(tmp_path / "nan2") == {"config.yaml", "data.json", "tensorboard"}


@pytest.mark.slow
def test_an_elastic_job_stops_at_a_diverged_batch(tmp_path):
    script = tmp_path / "hosts.sh"
    script.write_text("#!/bin/sh\necho localhost:1\necho 127.0.0.1:1\n")
    script.chmod(0o755)
    elastic = ["--min-workers", "1", "--max-workers", "2", "--host-discovery-script", str(script)]
    args = [*elastic, "--network-interface", "lo", "--name", "nan", "--set", f"runs_dir={tmp_path}"]
    diverged_line(run_pipeline("train", *args, *TINY, *DIVERGES, check=False))
    assert not {"best.keras", "summary.json", "metrics.json", "checkpoints"} & saved_files(tmp_path / "nan")


# Worker 1's loss turns nan at its third batch while worker 0's stays finite: Keras reports each worker's own.
AGREEMENT = textwrap.dedent(
    """
    import math, sys
    from pathlib import Path
    from pipeline.tensorflow_env import prepare
    prepare()
    import tensorflow as tf
    from train import distributed
    from train.run import Agreement, DivergedError, Position
    distributed.init()
    settings = {"learning_rate": 0.5, "batch_size": 32, "checkpoint_minutes": 0.0}
    callback = Agreement(Path(sys.argv[1]), settings, Position(0))
    callback.set_params({"steps": 100})
    callback.on_epoch_begin(0)
    for batch in range(40):
        loss = math.nan if distributed.rank() == 1 and batch >= 2 else 0.5
        try:
            callback.on_train_batch_end(batch, {"loss": tf.constant(loss)})
        except DivergedError as err:
            print(f"rank {distributed.rank()} stopped after batch {batch + 1}: {err}", flush=True)
            break
    """
)


@pytest.mark.slow
def test_workers_agree_on_the_first_bad_batch_when_only_one_sees_it(tmp_path):
    from train.run import AGREE_EVERY

    script = tmp_path / "agreement.py"
    script.write_text(AGREEMENT)
    horovodrun = str(Path(sys.executable).parent / "horovodrun")
    command = [horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(script), str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    said = "loss became nan at epoch 1 batch 3, so the epoch was not saved"
    for rank in (0, 1):
        assert f"rank {rank} stopped after batch {AGREE_EVERY}: {tmp_path}: {said}" in result.stdout, result.stdout
