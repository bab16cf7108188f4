"""The training loop: one run directory (train/rundir.py), `model.fit` on the batches of train/batches.py, atomic
checkpoints at each epoch's end and inside epochs (on SIGTERM/SIGUSR1, and every checkpoint_minutes), exact resume
from either. One path for a process alone, a fixed-size Horovod job and an elastic one (train/elastic.py)."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras

from serve.errors import PipelineError, StoppedError
from serve.files import atomic_path, write_atomic
from serve.metrics import classification_report, confusion_matrix
from train import distributed
from train.batches import epoch_batches, eval_batches, image_batches, resume_point, train_batches
from train.data import Dataset, load_dataset
from train.keras_internals import dropout_generators
from train.launch import elastic_conflict
from train.models import NORMALIZATION, build_model
from train.plots import plot_confusion, plot_curves
from train.rundir import RunDir, Summary, check_resume, read_run_json, versions


class RunError(PipelineError):
    """A run directory that cannot be used as asked."""


class DivergedError(RunError):
    """A run whose loss became nan or inf: it stopped, and nothing of that epoch was saved."""


# Batches between the workers' agreements (Agreement): a loss gone bad, a stop signal, a checkpoint due.
AGREE_EVERY = 10


@dataclass(frozen=True)
class Position:
    """Where training starts: after `epoch` complete epochs, and `batches` batches into the next one when `folder`
    is a checkpoint inside it (checkpoints/epoch_NNN_batch_BBBBBB); `folder` None is a new run."""

    epoch: int
    batches: int = 0
    folder: Path | None = None


@dataclass
class RunState:
    """Where training is: `epoch` epochs done (-1 until rank 0 has decided where to start), `batch` batches and
    `images` images of the next one trained, and the metrics rows so far. An elastic job holds the same in
    train/elastic.py's TrainingState, which commits it with the weights and rolls both back."""

    epoch: int = -1
    batch: int = 0
    images: int = 0
    history: list[dict] = field(default_factory=list)


def train(config: dict, resume: bool = False, exist_ok: bool = False) -> Path:
    """Train the model `config` describes into its run directory and return that directory.

    Run by every worker of a Horovod job (or by one process alone): each trains on its own shard of the data,
    and only rank 0 (the chief) reads and writes the run directory, holding its lock throughout.
    """
    distributed.init(config["mixed_precision"])
    run = RunDir.of(config)
    with contextlib.ExitStack() as lock:

        def claim() -> Position:
            lock.enter_context(run.lock("training"))
            return _start_position(run, config, resume, exist_ok)

        if distributed.elastic():  # no collective may run before Horovod Elastic's loop: rank 0 decides in it
            return _train(run, config, claim)
        start = _on_chief(claim)  # before the data loads: a refusal comes at once
        return _train(run, config, lambda: start)


def _train(run: RunDir, config: dict, claim: Callable[[], Position]) -> Path:
    """Train on this worker, alone, in a fixed-size job or in an elastic one; `claim()`, called on rank 0 as
    training begins, says where to start.

    An elastic job (train/elastic.py) differs where it must. Its learning rate follows the number of workers, set
    before each batch. Its training runs inside Horovod Elastic's loop, which commits the state every commit_every
    batches, rolls back to the last commit when a worker is lost and takes in one that joins -- a worker that joins
    later starts here too, so no collective runs before that loop. And it takes no stop signal, so writes no
    checkpoint inside an epoch: its launcher passes none on, and a worker that stops is a worker lost.
    """
    elastic = None  # train/elastic.py in an elastic job; it imports Horovod Elastic
    if distributed.elastic():
        conflict = elastic_conflict(config)
        if conflict:  # every worker refuses, before any collective
            raise RunError(conflict)
        from train import elastic
    started = time.perf_counter()
    data = load_dataset(config)
    seconds = {"data": time.perf_counter() - started}
    count, batch_size, num_classes = len(data.train_y), config["batch_size"], len(data.class_names)
    if count < distributed.size():  # every worker decides the same, before any collective
        raise RunError(
            f"{data.source}: {count} training images for {distributed.size()} workers, who need one each at least: "
            f"start at most {count} workers (srun -n, --workers), or train on more data"
        )
    keras.utils.set_random_seed(config["seed"])
    tf.config.experimental.enable_op_determinism()
    # Dropout then draws from tf.random.Generator states, which the checkpoint can save.
    keras.backend.experimental.enable_tf_random_generator()
    model = _build(config, num_classes)
    # A fixed number of workers: a schedule of the step. Elastic: elastic.ScaledLearningRate sets it before each batch.
    rate = config["learning_rate"] if elastic else _schedule(config, math.ceil(_shard_size(count) / batch_size))
    _compile(model, config, rate, num_classes)
    rngs = dropout_generators(model)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, dropout_rngs=rngs)
    average = None  # WeightAverage with ema_decay: its model is saved as the checkpoint's "ema"
    if config["ema_decay"]:
        average = WeightAverage(model, _build(config, num_classes), config["ema_decay"])
        checkpoint.ema = average.average
    validation = eval_batches(data.val_x, data.val_y, num_classes, batch_size)
    writers = []  # rank 0's RunWriter of each fit call, for their bookkeeping time

    def begin() -> tuple[Position, list[dict], dict | None]:
        """On rank 0: where to start, the history so far and the position.json of a checkpoint inside an epoch."""
        start = claim()
        if start.folder:
            _check_same_data(run, data)
        history, inside = _open(run, config, start, checkpoint)
        # Only now: a resume that fails must leave the run's config as it was.
        _write_run_files(run, config, data, model)
        return start, history, inside

    def save_inside_epoch(epoch: int, batches: int, images: int) -> None:
        # What differs between the workers: their running metric sums, which the epoch's metrics row averages, and
        # BatchNorm's moving statistics, with which each one validates.
        states = distributed.allgather_object((_metric_sums(model), [v.numpy() for v in _moving_stats(model)]))
        if distributed.is_chief():
            position = {"epoch": epoch + 1, "batches": batches, "images": images, "workers": distributed.size()}
            sums, moving = zip(*states)
            _write_inside_epoch(run, checkpoint, position | {"metric_sums": list(sums)}, list(moving))
        distributed.barrier()  # no worker exits while rank 0 writes: srun and horovodrun would kill it

    def fit(state) -> list[str]:
        """Train from where `state` is to the last epoch; every worker's weights checksum. Horovod Elastic calls it
        again after a rollback or a change of hosts, with the state of the last commit."""
        inside = None  # the position.json of a checkpoint inside an epoch that the job starts from
        if state.epoch < 0:  # the job's start; under elastic, a worker that joins later has rank 0's state, past it
            start, state.history, inside = _on_chief(begin)
            state.epoch, state.batch, state.images = start.epoch, start.batches, inside["images"] if inside else 0
            # Every worker starts from rank 0's weights, optimizer state and dropout streams, fresh or restored...
            averaged = average.average.variables if average else []
            distributed.broadcast_from_chief(
                model.variables + model.optimizer.variables + [g.state for g in rngs] + averaged
            )
            if inside and inside["workers"] == distributed.size():  # ...and from its own BatchNorm statistics
                for variable, value in zip(_moving_stats(model), inside["moving_stats"][distributed.rank()]):
                    variable.assign(value)
            if elastic:
                state.commit()
        # Once: after the start, or on a worker that joined an elastic job later, when it first comes here.
        seconds.setdefault("setup", time.perf_counter() - started - seconds["data"])
        if elastic:
            elastic.note_membership(state, run)
        del state.history[state.epoch :]  # under elastic, a row written after the last commit is written again
        epoch, workers = state.epoch, distributed.size()
        same_workers = inside is not None and inside["workers"] == workers
        done = resume_point(count, state.images, workers)
        save = None if elastic else save_inside_epoch
        agreement = Agreement(run.path, config, Position(epoch, state.batch), done, save)
        early = EarlyStop(config["patience"], state.history)  # stopped already if the history says so

        def callbacks(images: int, steps: int) -> list:
            """The callbacks of a fit call whose epochs train `images` images in `steps` steps."""
            # WeightAverage first: a checkpoint inside the epoch saves the average with this batch in it.
            # MetricAverage next: the others log averaged metrics. Agreement before RunWriter: a diverged epoch
            # writes no checkpoint, and a stop at the epoch's end is known before the epoch's checkpoint.
            callbacks = [average] if average else []
            callbacks += [distributed.MetricAverage(), agreement]
            if distributed.is_chief():
                allreduce_bytes = distributed.allreduce_bytes_per_step(model, config["compression"])
                writers.append(
                    RunWriter(run, checkpoint, state.history, config["keep_checkpoints"], images, allreduce_bytes)
                )
                tensorboard = EpochTensorBoard(log_dir=str(run.tensorboard), write_graph=False)
                callbacks += [writers[-1], tensorboard, EpochProgress(config["epochs"])]
            callbacks.append(early)  # after RunWriter: the epoch that stops is written first
            if elastic:  # after RunWriter: an epoch's end commits once its row and checkpoint are written
                callbacks += [
                    elastic.ScaledLearningRate(state, config, count),
                    elastic.Progress(state, batch_size, count),  # before the commit, which saves what it counted
                    elastic.CommitState(state, config["commit_every"], steps),
                ]
            return callbacks

        verbose = (1 if sys.stdout.isatty() else 2) if distributed.is_chief() else 0
        with contextlib.nullcontext() if elastic else StopSignals() as agreement.signals:
            # The rest of the epoch it starts inside (a checkpoint there, an elastic rollback).
            if state.batch and not early.stopped:
                rest = (count - done) // workers * workers
                steps = math.ceil(rest // workers / batch_size)
                sums = inside["metric_sums"][distributed.rank()] if same_workers else None
                model.fit(
                    epoch_batches(data, config, epoch, done),
                    initial_epoch=epoch,
                    epochs=epoch + 1,
                    steps_per_epoch=steps,
                    validation_data=validation,
                    callbacks=[AddMetricSums(sums), *callbacks(rest, steps)],
                    verbose=verbose,
                )
                epoch += 1
            if epoch < config["epochs"] and not agreement.stopped and not early.stopped:
                steps = math.ceil(_shard_size(count) / batch_size)
                model.fit(
                    train_batches(data, config, epoch),
                    initial_epoch=epoch,
                    epochs=config["epochs"],
                    steps_per_epoch=steps,
                    validation_data=validation,
                    callbacks=callbacks(_shard_size(count) * workers, steps),
                    verbose=verbose,
                )
            if agreement.stopped:  # at an epoch's end
                distributed.barrier()  # rank 0 wrote the epoch's checkpoint before it came here
                raise agreement.stop_error()
        return distributed.all_checksums(model)

    state, train_from = RunState(), fit
    if elastic:
        state = elastic.TrainingState(model, rngs, epoch=-1, batch=0, images=0, history=[], members=[])
        train_from = elastic.hvd_elastic.run(fit)
    with _curves_on_failure(run, lambda: state.history if distributed.is_chief() else []):
        checksums = train_from(state)
    seconds["training"] = time.perf_counter() - started - seconds["data"] - seconds["setup"]
    seconds["bookkeeping"] = sum(writer.bookkeeping_seconds for writer in writers)
    if not distributed.is_chief():
        return run.path
    if len(set(checksums)) > 1:
        raise RunError(
            f"{run}: the workers' weights differ after training (checksums {checksums}); gradients were not allreduced"
        )
    # With EMA the average is the model: validated, saved as best.keras (from the best epoch's checkpoint) and exported.
    return _finish(run, config, data, state.history, average.average if average else model, seconds, checksums)


def _open(
    run: RunDir, config: dict, start: Position, checkpoint: tf.train.Checkpoint
) -> tuple[list[dict], dict | None]:
    """On rank 0: empty the run directory for a new run, or restore a resumed one's checkpoint. Returns its
    history, and the position.json of a checkpoint inside an epoch (None at an epoch's end)."""
    if start.folder is None:  # only now: a config, data or model that fails must not cost an old run
        shutil.rmtree(run.path, ignore_errors=True)
        run.path.mkdir(parents=True)
        return [], None
    previous = run.read_config()
    inside = _read_position(start.folder) if start.batches else None
    _restore(RunDir.checkpoint_prefix(start.folder), checkpoint, previous, config)
    if inside:
        workers = f", saved by {inside['workers']} workers" if inside["workers"] != distributed.size() else ""
        print(f"resuming {run} inside epoch {start.epoch + 1}, after batch {start.batches}{workers}", file=sys.stderr)
    else:
        print(f"resuming {run} after epoch {start.epoch}", file=sys.stderr)
    return [row for row in run.read_history() if row["epoch"] <= start.epoch], inside


def _read_position(folder: Path) -> dict:
    """A checkpoint inside an epoch's position.json -- where in its epoch it was written, every worker's metric
    sums -- with every worker's BatchNorm moving statistics from its moving_stats.npz, as "moving_stats"."""
    path, moving_stats = RunDir.position_file(folder), RunDir.moving_stats_file(folder)
    position = read_run_json(path)
    fields = {"epoch": int, "batches": int, "images": int, "workers": int, "metric_sums": list}
    if not isinstance(position, dict) or any(not isinstance(position.get(k), t) for k, t in fields.items()):
        raise RunError(f"{path}: not a checkpoint position (fields {', '.join(fields)}); start over with --exist-ok")
    if len(position["metric_sums"]) != position["workers"] or position["images"] < 0:
        raise RunError(f"{path}: its metric sums do not match its {position['workers']} workers")
    try:
        with np.load(moving_stats, allow_pickle=False) as arrays:
            moving = [
                [arrays[f"rank{r}_{i}"] for i in range(len(arrays) // position["workers"])]
                for r in range(position["workers"])
            ]
    except (OSError, ValueError, KeyError) as err:
        raise RunError(f"{moving_stats}: cannot be read ({err}); start over with --exist-ok") from None
    return position | {"moving_stats": moving}


def _write_run_files(run: RunDir, config: dict, data: Dataset, model) -> None:
    run.write_config(config)
    run.write_data(data.summary())
    _print_header(run, config, data, model)


def _build(config: dict, num_classes: int):
    return build_model(
        config["model"],
        config["input_size"],
        config["channels"],
        num_classes,
        config["width"],
        config["dropout"],
        config["pretrained"],
        config["fine_tune_blocks"],
    )


def _restore(path: Path, checkpoint: tf.train.Checkpoint, previous: dict, config: dict) -> None:
    """Model, optimizer and dropout streams from a checkpoint. When other weights train now than then
    (fine-tuning after the head), the optimizer's saved state fits them no longer: the weights and dropout
    streams are read into an uncompiled twin of the model, which has no optimizer to restore, and copied."""
    if previous.get("fine_tune_blocks", 0) == config["fine_tune_blocks"]:
        checkpoint.read(str(path)).expect_partial()
        return
    print("fine_tune_blocks changed: weights restored, the optimizer starts afresh", file=sys.stderr)
    model = checkpoint.model
    twin = _build(config, model.output_shape[-1])
    twin_rngs = dropout_generators(twin)
    # The weight average restores into its own model as saved: a checkpoint matches objects by their place in the
    # model, not by which weights train.
    averaged = {"ema": checkpoint.ema} if hasattr(checkpoint, "ema") else {}
    tf.train.Checkpoint(model=twin, dropout_rngs=twin_rngs, **averaged).read(str(path)).expect_partial()
    model.set_weights(twin.get_weights())
    for mine, saved in zip(checkpoint.dropout_rngs, twin_rngs):
        mine.state.assign(saved.state)


@contextlib.contextmanager
def _curves_on_failure(run: RunDir, history):
    """Plot the curves of the epochs done (`history()`'s rows) when training stops early: Ctrl-C, a lost job, an
    error. A run that ends well plots them in `_finish`, once: per epoch they would cost as much as the metrics and
    the checkpoint together."""
    try:
        yield
    except BaseException:
        if history():
            plot_curves(history(), run.curves)
        raise


def _class_reports(data: Dataset, val_pred: np.ndarray, test_pred: np.ndarray | None) -> dict[str, dict]:
    """summary.json's per-class figures of the best model: validation, and test where the data has a test split."""
    reports = {"val": classification_report(data.val_y, val_pred, data.class_names)}
    if test_pred is not None:
        reports["test"] = classification_report(data.test_y, test_pred, data.class_names)
    return reports


def _plot_confusion(class_names: list[str], labels: np.ndarray, predicted: np.ndarray, title: str, run: RunDir) -> None:
    plot_confusion(confusion_matrix(labels, predicted, len(class_names)), class_names, run.confusion_matrix, title)


def _on_chief(work):
    """Run `work` on rank 0 and give every worker its result, or the same error."""
    outcome = None
    if distributed.is_chief():
        try:
            outcome = ("ok", work())
        except PipelineError as err:
            outcome = ("error", str(err))
    status, value = distributed.broadcast_object(outcome)
    if status == "error":
        raise RunError(value)
    return value


def _shard_size(count: int) -> int:
    """Images each worker trains on per epoch: equal shards, so all take the same number of steps."""
    return count // distributed.size()


def _start_position(run: RunDir, config: dict, resume: bool, exist_ok: bool) -> Position:
    """Where to start: a new run, which may replace an old one only with exist_ok, or a resume with nothing to
    resume yet (what it replaces finished no epoch); or, resuming, the newest checkpoint -- inside an epoch if one
    was written after the last epoch's. A resumed run must keep the settings that define it.
    Decided on rank 0 alone, under the run's lock, and broadcast: every worker takes the same decision."""
    if resume:
        if run.nothing_to_resume():
            print(f"{run}: nothing to resume yet, starting it", file=sys.stderr)
            return Position(0)
        found, inside = run.checkpoints(), run.latest_inside_epoch()
        if not found and not inside:
            raise RunError(f"{run}: no complete checkpoint to resume from; start it over with --exist-ok")
        check_resume(run, run.read_config(), config)
        if inside and inside[0] <= config["epochs"]:  # (fewer epochs now: that epoch's end is not wanted)
            epoch, batches, folder = inside
            return Position(epoch - 1, batches, folder)
        return Position(found[-1][0], 0, found[-1][1])
    if run.path.exists() and any(run.path.iterdir()):
        if not exist_ok:
            raise RunError(
                f"{run}: run directory already exists; pass --resume to continue it, --exist-ok to start it "
                "over, or --name for a new run"
            )
    return Position(0)


def _check_same_data(run: RunDir, data: Dataset) -> None:
    """A resumed run must train on the images it started with: the same settings may name changed files."""
    started = run.read_data()
    started = started.get("fingerprint") if isinstance(started, dict) else None
    if not isinstance(started, str):
        raise RunError(f"{run.data_file}: no data fingerprint; start a new run with --name")
    if started != data.fingerprint:
        raise RunError(
            f"{run}: --resume cannot change the data ({data.source} changed since the run started: fingerprint "
            f"{started[:12]} -> {data.fingerprint[:12]}); start a new run with --name"
        )


def _schedule(config: dict, steps_per_epoch: int):
    """A cosine-decayed learning rate. N workers make the batch N times larger, so the rate scales by N too,
    reached by a linear warm-up over `warmup_epochs` (large rates early diverge)."""
    workers = distributed.size()
    peak = config["learning_rate"] * workers
    total_steps = config["epochs"] * steps_per_epoch
    warmup_steps = min(int(config["warmup_epochs"] * steps_per_epoch), total_steps - 1) if workers > 1 else 0
    return keras.optimizers.schedules.CosineDecay(
        config["learning_rate"] if warmup_steps else peak,
        decay_steps=total_steps - warmup_steps,
        alpha=0.01,
        warmup_target=peak if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def _compile(model, config: dict, learning_rate, num_classes: int) -> None:
    """Adam on `learning_rate` (a rate or a schedule), gradients allreduced in a distributed job."""
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(5, name="top5"))
    model.compile(
        optimizer=distributed.distributed_optimizer(keras.optimizers.Adam(learning_rate), config["compression"]),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config["label_smoothing"]),
        metrics=metrics,
    )
    # Create the optimizer's slots now, so a checkpoint restores them at once rather than lazily.
    model.optimizer.build(model.trainable_variables)


def _class_model(model):
    """`model` ending in the argmax: predicting with it keeps only the class indices, not every class's score."""
    return keras.Model(model.inputs, tf.argmax(model.outputs[0], axis=-1))


def _predicted_classes(classes, x: np.ndarray) -> np.ndarray:
    """The top class (`classes` is a `_class_model`) for each image of `x`, batch by batch, in one Keras predict
    loop (a Python loop of predict_on_batch is slower: it pays Keras' per-call overhead on every batch)."""
    return classes.predict(image_batches(x, 256), verbose=0)


class StopSignals:
    """While training: SIGTERM and SIGUSR1 -- what Slurm sends to preempt or requeue a job, and before its time
    limit with `--signal` -- are noted instead of ending the process, so that Agreement can stop every worker at
    one batch and write the checkpoint first. Later signals change nothing: SIGKILL follows after Slurm's KillWait.
    Outside the main thread (no handlers can be set there) it notes nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self.at = 0.0  # its time.monotonic()
        self._before: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._before = {number: signal.signal(number, self._note) for number in self.SIGNALS}
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None and issubclass(kind, StoppedError):
            return  # still noted, not obeyed, until the process exits 75: srun sends the others SIGTERM once one ends
        for number, handler in self._before.items():
            signal.signal(number, handler)

    def _note(self, number: int, frame) -> None:
        if self.received is None:
            self.received, self.at = signal.Signals(number).name, time.monotonic()


class Agreement(keras.callbacks.Callback):
    """What the workers of a job must decide together, at the same batch, so that none is left waiting in a
    collective: every AGREE_EVERY batches of the epoch and at its end (one process alone: every batch), one
    allreduce of three numbers says
    - whether the loss went nan or inf on any worker, and at which batch first: stop, nothing of the epoch saved
      (DivergedError). Keras reports each worker's own loss (the epoch's running mean: non-finite from the first
      bad batch on); at the epoch's end val_loss is checked too, before RunWriter's checkpoint;
    - whether any worker got SIGTERM or SIGUSR1 (StopSignals): `save_inside_epoch` writes a checkpoint at this
      batch, and the run stops (StoppedError); at the epoch's end it stops after RunWriter's checkpoint;
    - whether rank 0's clock says a periodic checkpoint is due (checkpoint_minutes): `save_inside_epoch`, go on.

    Every AGREE_EVERY batches rather than every batch: the allreduce is a small but fixed cost per step, which a
    small CNN's short step feels (benchmarks/preemption_bench.py measures the check's share). A job thus stops up
    to AGREE_EVERY - 1 batches after a bad batch or a signal, all workers at one batch.
    Batches are numbered within the epoch from `start.batches` in `start.epoch` (a resumed epoch), from 0 after."""

    _supports_tf_logs = True  # only the loss is read: the other metrics stay tensors, not copied every batch

    def __init__(self, run: Path, config: dict, start: Position, first_images: int = 0, save_inside_epoch=None):
        super().__init__()
        self.run, self.learning_rate, self.start = run, config["learning_rate"], start
        self.batch_images = config["batch_size"] * distributed.size()
        self.period = config["checkpoint_minutes"] * 60
        self.first_images, self.save_inside_epoch = first_images, save_inside_epoch
        self.signals: StopSignals | None = None
        self.stopped = ""  # where every worker stopped, once they agreed to
        self.epoch, self.first_batch, self.images_before, self.first_bad = 0, 0, 0, math.inf
        self.signal_batch = 0  # the batch at whose end this worker first saw the signal
        self.last_saved = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        resumed = epoch == self.start.epoch
        self.epoch, self.first_bad = epoch, math.inf
        self.first_batch = self.start.batches if resumed else 0
        self.images_before = self.first_images if resumed else 0

    def on_train_batch_end(self, batch, logs=None):
        number, loss = self.first_batch + batch + 1, float(logs["loss"])
        if self.first_bad == math.inf and not math.isfinite(loss):
            self.first_bad = number
        if self.signals and self.signals.received and not self.signal_batch:
            self.signal_batch = number
        last = batch + 1 == self.params["steps"]  # the epoch's end agrees next, with its checkpoint
        if not last and (distributed.size() == 1 or number % AGREE_EVERY == 0):
            stop, due = self._agree(loss)
            if stop or due:
                images = self.images_before + (batch + 1) * self.batch_images
                self.save_inside_epoch(self.epoch, number, images)
                self.last_saved = time.monotonic()
            if stop:
                self.stopped = f"at epoch {self.epoch + 1} batch {number}"
                raise self.stop_error()

    def on_epoch_end(self, epoch, logs=None):
        stop, _ = self._agree(logs["loss"])
        if not math.isfinite(logs.get("val_loss", 0.0)):  # averaged over the workers by MetricAverage
            self._diverged(f"val_loss became {logs['val_loss']} at the end of epoch {epoch + 1}")
        self.last_saved = time.monotonic()  # RunWriter's checkpoint follows
        if stop:  # RunWriter saves the epoch, then fit ends and _train raises stop_error()
            self.model.stop_training = True
            self.stopped = f"at the end of epoch {epoch + 1}"

    def _agree(self, loss: float) -> tuple[bool, bool]:
        """(stop, checkpoint due), the same on every worker (a collective in a job: every worker calls it at the
        same batch); raises DivergedError if any worker's loss went bad."""
        signalled = 1.0 if self.signals and self.signals.received else 0.0
        due = distributed.is_chief() and self.period > 0 and time.monotonic() - self.last_saved >= self.period
        first_bad, stop, due = distributed.maximum([-self.first_bad, signalled, float(due)], "agreement")
        if first_bad != -math.inf:
            loss = distributed.average(loss, "loss.bad")  # nan if any worker's is nan, else inf
            self._diverged(f"loss became {loss} at epoch {self.epoch + 1} batch {int(-first_bad)}")
        return bool(stop and self.save_inside_epoch), bool(due and self.save_inside_epoch)

    def stop_error(self) -> StoppedError:
        """The error every worker ends with once they stopped, their checkpoint written: rank 0's says why and when,
        the others' say nothing (one line for the job)."""
        if not distributed.is_chief():
            return StoppedError("")
        name = self.signals.received or "a stop signal"  # another worker's, if not this one's
        after = f" after batch {self.signal_batch}" if self.signal_batch else ""
        when = f" {time.monotonic() - self.signals.at:.1f} s after the signal" if self.signals.received else ""
        who = "every worker stopped" if distributed.size() > 1 else "stopped"
        return StoppedError(
            f"{self.run}: {name}{after}: {who} {self.stopped}, checkpoint written{when}; "
            "the same command with --resume continues it there"
        )

    def _diverged(self, what: str):
        done = RunDir(self.run).checkpoints()
        again = f"--resume from epoch {done[-1][0]}" if done else "start over with --exist-ok"
        lower = f"lower learning_rate ({self.learning_rate:g}), then {again}"
        raise DivergedError(f"{self.run}: {what}, so the epoch was not saved: {lower}")


class WeightAverage(keras.callbacks.Callback):
    """Weight EMA (ema_decay): after each batch `average` -- a twin of the trained model -- moves towards the trained
    weights, by 1 - min(decay, (1 + step) / (10 + step)) of the difference (the first steps' average would hold
    mostly the random initial weights otherwise). BatchNorm's moving statistics are copied, not averaged: each
    worker has its own. Validation swaps the average in and out again, so the epoch's val_accuracy, the best epoch
    and best.keras are the average's; the checkpoint saves it as "ema", so a resume continues it exactly.

    Not Keras' optimizer EMA (use_ema): tf_keras' fit ends by writing the average over the trained weights, which a
    run resumed inside an epoch (two fit calls) or stopped would then train on."""

    def __init__(self, trained, model, decay: float) -> None:
        super().__init__()
        model.set_weights(trained.get_weights())
        moving = {id(v) for v in _moving_stats(trained)}
        pairs = [(a, t) for a, t in zip(model.weights, trained.weights, strict=True) if a.dtype.is_floating]
        self.averaged = [(a, t) for a, t in pairs if id(t) not in moving]
        self.copied = [(a, t) for a, t in pairs if id(t) in moving]
        self.trained, self.average, self.decay = trained, model, decay

    @tf.function
    def _update(self) -> None:
        step = tf.cast(self.trained.optimizer.iterations, tf.float32)
        decay = tf.minimum(self.decay, (1.0 + step) / (10.0 + step))
        for average, trained in self.averaged:
            average.assign_add((1.0 - decay) * (trained - average))
        for average, trained in self.copied:
            average.assign(trained)

    @tf.function
    def _swap(self) -> None:
        for average, trained in self.averaged:
            value = tf.identity(trained)
            trained.assign(average)
            average.assign(value)

    def on_train_batch_end(self, batch, logs=None):
        self._update()

    def on_test_begin(self, logs=None):
        self._swap()

    def on_test_end(self, logs=None):
        self._swap()


class EarlyStop(keras.callbacks.Callback):
    """patience: stops training once `patience` epochs in a row did not beat the best val_accuracy (of equals, the
    first is best, as for best.keras). It counts from the run's history, so a resumed run counts on, and a run that
    stopped stops again at once. Every worker decides alike: val_accuracy is averaged over them (MetricAverage's
    allreduce gives each the same number) and the history is rank 0's, broadcast at the start."""

    def __init__(self, patience: int, history: list[dict]) -> None:
        super().__init__()
        self.patience = patience
        self.scores = [(row["epoch"], row["val_accuracy"]) for row in history]
        self.stopped = self._verdict()
        if self.stopped and distributed.is_chief():
            print(self.stopped, flush=True)

    def on_epoch_end(self, epoch, logs=None):
        self.scores.append((epoch + 1, float(logs["val_accuracy"])))
        self.stopped = self._verdict()
        if self.stopped:
            self.model.stop_training = True
            if distributed.is_chief():
                print(self.stopped, flush=True)

    def _verdict(self) -> str:
        """The line that says why training stops, or "" to go on."""
        if not self.patience or not self.scores:
            return ""
        best_epoch, best = max(self.scores, key=lambda score: (score[1], -score[0]))
        last = self.scores[-1][0]
        if last - best_epoch < self.patience:
            return ""
        return (
            f"early stop at epoch {last}: val_accuracy did not improve for {last - best_epoch} epochs, "
            f"best {best:.4f} at epoch {best_epoch}"
        )


class AddMetricSums(keras.callbacks.Callback):
    """In an epoch resumed from a checkpoint inside it: after its first batch, adds the metric sums saved there
    (`_metric_sums`) to the metrics, so that the epoch's row counts the batches before the stop as an
    uninterrupted epoch's does. (Keras builds its metrics at the first batch and resets them at each epoch's
    start: this is the first moment they can be added to.) None: nothing to add (another number of workers)."""

    def __init__(self, sums: list | None) -> None:
        super().__init__()
        self.sums = sums

    def on_train_batch_end(self, batch, logs=None):
        if self.sums is not None:
            for variable, saved in zip(_metric_variables(self.model), self.sums):
                variable.assign_add(tf.constant(saved, variable.dtype))
            self.sums = None


def _metric_variables(model) -> list:
    """The variables behind the model's running training metrics: each a (total, count) pair, sums all."""
    return [variable for metric in model.metrics for variable in metric.variables]


def _metric_sums(model) -> list:
    return [variable.numpy().tolist() for variable in _metric_variables(model)]


def _moving_stats(model) -> list:
    """BatchNorm's moving means and variances: each worker's own, from its own batches (not allreduced)."""
    return [variable for variable in model.non_trainable_variables if "moving_" in variable.name]


def _write_inside_epoch(run: RunDir, checkpoint: tf.train.Checkpoint, position: dict, moving: list) -> None:
    """A checkpoint inside an epoch (train/rundir.py) with every worker's `moving` statistics, written to a temp
    folder and renamed; older ones inside epochs are removed once it is in place."""
    final = run.inside_epoch_checkpoint(position["epoch"], position["batches"])
    tmp = RunDir.temp_folder(final)
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.write(str(RunDir.checkpoint_prefix(tmp)))
    written = position | {"written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_atomic(RunDir.position_file(tmp), json.dumps(written))
    arrays = {f"rank{rank}_{i}": value for rank, values in enumerate(moving) for i, value in enumerate(values)}
    np.savez(RunDir.moving_stats_file(tmp), **arrays)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for _, _, old in run.inside_epoch_checkpoints():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


class EpochProgress(keras.callbacks.ProgbarLogger):
    """Keras' progress lines, saying "Epoch 3/15" in a fit call that runs one epoch (a resumed epoch's rest, each
    epoch of the elastic loop)."""

    def __init__(self, epochs: int) -> None:
        super().__init__(count_mode="steps")
        self.total_epochs = epochs

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.total_epochs


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback without its batch hooks. With update_freq "epoch" (the default) they write
    nothing, but once any callback has batch hooks (StopOnNonFiniteLoss, the elastic ones) Keras calls them on
    every callback, and TensorBoard's builds a summary op per metric each batch."""

    def on_train_batch_begin(self, batch, logs=None):
        pass

    def on_train_batch_end(self, batch, logs=None):
        pass


class RunWriter(keras.callbacks.Callback):
    """After each epoch: metrics, then the checkpoint (last, so that a checkpoint's existence implies everything
    before it was written). Two costlier things wait until training ends (`_finish`): best.keras (`model.save`
    costs several checkpoints; until then the best epoch's checkpoint holds the best model, kept however many newer
    ones there are, so a resumed run still has it) and the curves (as long as all the rest; `_curves_on_failure`
    draws them when training stops early)."""

    def __init__(
        self,
        run: RunDir,
        checkpoint: tf.train.Checkpoint,
        history: list[dict],
        keep: int,
        images_per_epoch: int,
        allreduce_bytes: int,
    ) -> None:
        super().__init__()
        self.run, self.checkpoint, self.history, self.keep = run, checkpoint, history, keep
        self.images_per_epoch, self.allreduce_bytes = images_per_epoch, allreduce_bytes
        best = _best_row(history) if history else {"val_accuracy": -1.0, "epoch": 0}
        self.best, self.best_epoch = best["val_accuracy"], best["epoch"]
        self.bookkeeping_seconds = 0.0  # all epochs' time in on_epoch_end, for summary.json

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        started = time.time()
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
        row["learning_rate"] = float(self.model.optimizer.learning_rate)  # the rate of the last step
        seconds = started - self.epoch_started
        workers = distributed.size()
        row["seconds"] = round(seconds, 2)
        row["workers"] = workers
        row["images_per_second"] = round(self.images_per_epoch / seconds, 1)
        row["images_per_second_per_worker"] = round(self.images_per_epoch / seconds / workers, 1)
        row["allreduce_bytes_per_step"] = self.allreduce_bytes
        speed = f"epoch {row['epoch']}: {row['images_per_second']:.0f} images/s"
        if workers > 1:
            speed += (
                f" ({workers} workers, {row['images_per_second_per_worker']:.0f} each), allreduce "
                f"{self.allreduce_bytes / 1024:.0f} KiB per step per worker"
            )
        print(speed, flush=True)
        self.history.append(row)
        if row["val_accuracy"] > self.best:
            self.best, self.best_epoch = row["val_accuracy"], row["epoch"]
        self.run.write_history(self.history)
        self._save_checkpoint(epoch + 1)
        self.bookkeeping_seconds += time.time() - started

    def _save_checkpoint(self, epoch: int) -> None:
        final = self.run.epoch_checkpoint(epoch)
        tmp = RunDir.temp_folder(final)
        shutil.rmtree(tmp, ignore_errors=True)
        self.checkpoint.write(str(RunDir.checkpoint_prefix(tmp)))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, _, inside in self.run.inside_epoch_checkpoints():  # this epoch's end supersedes them
            shutil.rmtree(inside, ignore_errors=True)
        for number, old in self.run.checkpoints()[: -self.keep]:
            if number != self.best_epoch:
                shutil.rmtree(old, ignore_errors=True)


def _print_header(run: RunDir, config: dict, data: Dataset, model) -> None:
    test = f" / {len(data.test_y)} test" if data.test_y is not None else ""
    skipped = f", {len(data.skipped)} unreadable skipped" if data.skipped else ""
    print(f"run:   {run}")
    print(
        f"data:  {data.source}: {len(data.train_y)} train / {len(data.val_y)} val{test} images, "
        f"{len(data.class_names)} classes{skipped}"
    )
    print(
        f"model: {config['model']} {config['input_size']}x{config['input_size']}x{config['channels']}, "
        f"{model.count_params():,} parameters, {config['epochs']} epochs of batch {config['batch_size']}"
    )
    sys.stdout.flush()


def _best_row(history: list[dict]) -> dict:
    """The epoch with the best validation accuracy; of equals, the first."""
    return max(history, key=lambda row: row["val_accuracy"])


def _best_model(run: RunDir, config: dict, epoch: int, num_classes: int):
    """The model as it was after `epoch`, from that epoch's checkpoint (RunWriter keeps the best epoch's), read into
    a new model: the one training has another epoch's weights, and maybe other trainable layers. A run directory
    written before the best epoch's checkpoint was kept has best.keras instead."""
    path = run.epoch_checkpoint(epoch)
    if not path.is_dir():
        return keras.models.load_model(run.best_model, compile=False)
    model = _build(config, num_classes)
    # With ema_decay, the weight average (WeightAverage) saved beside the training weights.
    saved = tf.train.Checkpoint(ema=model) if config["ema_decay"] else tf.train.Checkpoint(model=model)
    saved.read(str(RunDir.checkpoint_prefix(path))).expect_partial()
    return model


def _finish(
    run: RunDir, config: dict, data: Dataset, history: list[dict], model, seconds: dict, checksums: list[str]
) -> Path:
    """Save the best model, evaluate it on validation (and test) data, plot the curves and its confusion matrix,
    write summary.json. `model` holds the weights of the last epoch in `history`."""
    started = time.perf_counter()
    plot_curves(history, run.curves)
    best = _best_row(history)
    if best is not history[-1]:
        model = _best_model(run, config, best["epoch"], len(data.class_names))
    classes = _class_model(model)  # one for both splits: Keras traces its predict function once
    val_pred = _predicted_classes(classes, data.val_x)
    val_accuracy = float(np.mean(val_pred == data.val_y))
    title = f"validation, epoch {best['epoch']}: accuracy {val_accuracy:.4f}"
    _plot_confusion(data.class_names, data.val_y, val_pred, title, run)
    test_pred = _predicted_classes(classes, data.test_x) if data.test_y is not None else None
    with atomic_path(run.best_model) as tmp:
        model.save(tmp)
    seconds["evaluation"] = time.perf_counter() - started
    summary = Summary(
        best_epoch=best["epoch"],
        epochs=len(history),
        val_accuracy=val_accuracy,
        test_accuracy=None if test_pred is None else float(np.mean(test_pred == data.test_y)),
        train_seconds=round(seconds["training"], 1),
        seconds={name: round(value, 3) for name, value in seconds.items()},
        skipped_images=len(data.skipped),
        data_fingerprint=data.fingerprint,
        workers=distributed.size(),
        compression=config["compression"],
        rank_weight_checksums=checksums,
        metrics=_class_reports(data, val_pred, test_pred),
        normalization=dict(zip(("mean", "std"), NORMALIZATION[config["model"]])),
        versions=versions(),
    )
    run.write_summary(summary)
    test = f", test accuracy {summary.test_accuracy:.4f}" if summary.test_accuracy is not None else ""
    print(f"best epoch {best['epoch']}: val accuracy {summary.val_accuracy:.4f}{test}")
    print(f"run directory: {run}")
    return run.path
