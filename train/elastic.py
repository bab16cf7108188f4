"""Elastic training (`pipeline train --min-workers N`): what the training loop needs to survive a lost worker
and take in a returning one under `horovodrun --min-np/--max-np` (Horovod Elastic, Gloo).

Imported only in a worker of an elastic job (it imports Horovod), by train/run.py's one training path: its
position is a TrainingState here instead of a RunState, and these callbacks follow its own. The state every worker
holds in memory -- weights, optimizer, dropout streams, epoch, images done in the epoch, history, members -- is
committed every `commit_every` batches; when a worker dies, the survivors roll back to the last commit, Horovod
renumbers them, rank 0 broadcasts its state, and training goes on; a returning host is taken in at a commit.
"""

from __future__ import annotations

import csv
import io
import math
import os
import socket
import sys
import time
from collections import Counter

import tf_keras as keras
from horovod.tensorflow.keras import elastic as hvd_elastic

from serve.files import write_atomic
from train import distributed
from train.rundir import RUN_FILE_LIMIT, RunDir, RunFileError, read_text_file

MEMBERSHIP_COLUMNS = ["time", "event", "host", "epoch", "batch", "workers"]


class TrainingState(hvd_elastic.KerasState):
    """Horovod's KerasState (weights, optimizer, and plain values as attributes) plus the dropout layers'
    random generators, which Keras keeps out of `model.variables`."""

    def __init__(self, model, generators: list, **values) -> None:
        self.generators = generators
        self._save_generators()
        super().__init__(model, **values)

    def save(self) -> None:
        self._save_generators()
        super().save()

    def restore(self) -> None:
        for generator, saved in zip(self.generators, self._saved_generators):
            generator.state.assign(saved)
        super().restore()

    def sync(self) -> None:
        distributed.broadcast_from_chief([generator.state for generator in self.generators])
        self._save_generators()
        super().sync()

    def _save_generators(self) -> None:
        self._saved_generators = [generator.state.numpy() for generator in self.generators]


class Progress(keras.callbacks.Callback):
    """Counts the batches and images of the epoch done so far into the state, so that a rollback knows which
    part of the epoch's order is left; placed before the commit callback."""

    def __init__(self, state: TrainingState, batch_size: int, count: int) -> None:
        super().__init__()
        self.state, self.batch_size, self.count = state, batch_size, count

    def on_train_batch_end(self, batch, logs=None):
        self.state.batch += 1
        self.state.images = min(self.state.images + self.batch_size * distributed.size(), self.count)

    def on_epoch_end(self, epoch, logs=None):
        # Rank 0 wrote the epoch's metrics row: every worker keeps the history, whichever is rank 0 next.
        self.state.history[:] = distributed.broadcast_object(self.state.history)
        self.state.epoch, self.state.batch, self.state.images = epoch + 1, 0, 0


class CommitState(keras.callbacks.Callback):
    """Commits the state every `every` batches and at the epoch's end, but not after the last of the `steps`
    batches: a rollback to there (a lost worker in validation, a host joining at that commit) would resume an
    epoch with no batch left, and its end -- validation, metrics row, checkpoint -- was not done yet (Horovod's
    CommitStateCallback does commit there). Placed after Progress, so the epoch's end commits the next epoch."""

    def __init__(self, state: TrainingState, every: int, steps: int) -> None:
        super().__init__()
        self.state, self.every, self.steps = state, every, steps

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.every == 0 and batch + 1 < self.steps:
            self.state.commit()

    def on_epoch_end(self, epoch, logs=None):
        self.state.commit()


def rate(learning_rate: float, epochs: int, warmup_epochs: float, progress: float, workers: int) -> float:
    """The learning rate after `progress` epochs with `workers` workers: the cosine decay (to 1%) of
    workers x learning_rate, reached by a linear warm-up from learning_rate over `warmup_epochs` when
    workers > 1 -- the schedule a run with that many workers throughout would be at."""
    peak = learning_rate * workers
    warmup = min(warmup_epochs, epochs) if workers > 1 else 0.0
    if progress < warmup:
        return learning_rate + (peak - learning_rate) * progress / warmup
    done = min((progress - warmup) / max(epochs - warmup, 1e-9), 1.0)
    return peak * (0.99 * 0.5 * (1 + math.cos(math.pi * done)) + 0.01)


class ScaledLearningRate(keras.callbacks.Callback):
    """Sets the rate before each batch from the current worker count: it follows a change at once."""

    def __init__(self, state: TrainingState, config: dict, count: int) -> None:
        super().__init__()
        self.state, self.config, self.count = state, config, count

    def on_train_batch_begin(self, batch, logs=None):
        progress = self.state.epoch + self.state.images / self.count
        config = self.config
        self.model.optimizer.learning_rate = rate(
            config["learning_rate"], config["epochs"], config["warmup_epochs"], progress, distributed.size()
        )


def note_membership(state: TrainingState, run: RunDir) -> None:
    """Compare the workers now training with those of the last commit: rank 0 prints one line per worker
    lost or joined ("worker on HOST lost at epoch 3 batch 120: continuing with 1 worker") and appends a row
    per change to the run's membership.csv (the first start records each worker as "start")."""
    # horovodrun names each worker's host as its host list or discovery script does.
    hosts = distributed.hvd.allgather_object(os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname())
    before, now = Counter(state.members), Counter(hosts)
    if state.members:
        changes = [("lost", host) for host in (before - now).elements()]
        changes += [("joined", host) for host in (now - before).elements()]
    else:
        changes = [("start", host) for host in hosts]
    state.members = hosts
    if not distributed.is_chief() or not changes:
        return
    epoch, batch, workers = state.epoch + 1, state.batch, len(hosts)
    for event, host in changes:
        if event != "start":
            noun = "worker" if workers == 1 else "workers"
            print(f"worker on {host} {event} at epoch {epoch} batch {batch}: continuing with {workers} {noun}")
    sys.stdout.flush()
    path = run.membership
    before = read_text_file(path, RUN_FILE_LIMIT, "a membership.csv", RunFileError) if os.path.lexists(path) else ""
    text = io.StringIO()
    writer = csv.writer(text)
    if not before:
        writer.writerow(MEMBERSHIP_COLUMNS)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    writer.writerows([stamp, event, host, epoch, batch, workers] for event, host in changes)
    write_atomic(path, before + text.getvalue())
