"""Preemption (issue 20): what a SIGTERM costs `pipeline train`, and what watching for one costs training.

    python benchmarks/preemption_bench.py [--repeats 3] [--rounds 12]
    python benchmarks/preemption_bench.py --quick      # 1 repeat, 6 rounds: a check

Two models: small_cnn on Fashion-MNIST (1,000 images a class, batch 64), and efficientnet_lite0 as `--config
transfer` trains it (ImageNet backbone frozen, a new head; batch 32) at input_size 96 on an image folder this script
draws (three classes of coloured shapes, as tests/conftest.py's make_image_folder).

1. SIGTERM inside epoch 2: `pipeline train` starts as a subprocess; once checkpoints/epoch_001 exists and half a
   second more has passed, SIGTERM goes to the process (alone) or to both Horovod workers (`--workers 2`: they are
   found as tests/conftest.py's worker_pid finds them; Slurm signals every task, not a launcher). Measured: the
   seconds from the signal to the checkpoint inside the epoch on disk (its newest file's mtime), to the stopped line
   on stderr, and to the process's exit, its exit code, the batches trained after the signal (all saved with the
   checkpoint: nothing trained is lost) and the checkpoint's bytes.
2. The stop check's cost: model.fit over the same batches without and with train/run.py's Agreement callback
   (alone it agrees at every batch, reading the loss; in a job it allreduces every AGREE_EVERY batches), built
   from train/run.py's own functions, in one process or one 2-worker horovodrun job. A third condition, a batch
   hook that does nothing, tells Keras's per-batch callback machinery from Agreement's own work. Segments of each
   condition interleave, every order in turn; each is timed from its epoch's start to its end (fit's own set-up
   not counted), and each round's ratios to its own segment without a callback are the result.

Prints a table and writes it to benchmarks/results/preemption.md (and preemption.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HOROVODRUN = str(Path(sys.executable).parent / "horovodrun")
STOPPED = 75  # train/run.py Stopped.exit_code
OVERHEAD_TARGET = 1.01
# The stop check's cost, timed in segments of: no callback, a batch hook doing nothing, Agreement.
CONDITIONS = ("without", "hook", "with")  # issue 20: the stop check costs at most 1% of training speed
CLASSES = ("blue_stripes", "green_discs", "red_squares")
STOPPED_LINE = re.compile(
    r": SIGTERM after batch (\d+): (?:every worker )?stopped at epoch (\d+) batch (\d+), "
    r"checkpoint written ([\d.]+) s after the signal"
)


def model_settings(model: str, folder: Path) -> dict:
    """`pipeline train` settings of each model (the command line's --set values)."""
    if model == "small_cnn":
        return {"max_images_per_class": 1000, "batch_size": 64}
    return {"data": str(folder), "input_size": 96, "batch_size": 32}


def model_config(model: str) -> str:
    return "fashion_mnist" if model == "small_cnn" else "transfer"


def draw_image_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    """Three visually distinct classes of JPEGs around 96 pixels: red squares, green discs, blue stripes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(rng.integers(88, 128))
            yy, xx = np.mgrid[:side, :side]
            pixels = rng.integers(0, 60, (side, side, 3)).astype(np.uint8)
            if name == "red_squares":
                a, b = sorted(rng.integers(0, side, 2))
                pixels[a : b + 4, a : b + 4, 0] = 230
            elif name == "green_discs":
                cy, cx, r = rng.integers(side // 4, 3 * side // 4, 3)
                pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < (r // 2 + 4) ** 2, 1] = 230
            else:
                pixels[:, (xx[0] // 4) % 2 == 0, 2] = 230
            Image.fromarray(pixels).save(root / name / f"{i:04d}.jpg", quality=90)
    return root


# --- 1. SIGTERM inside epoch 2 ---------------------------------------------------------------------------------


def worker_pids(marker: str, workers: int, timeout: float = 30) -> list[int]:
    """The Horovod workers whose command line holds `marker`, by their HOROVOD_RANK (tests/conftest.py worker_pid)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            ranks = [item for item in environ if item.startswith(b"HOROVOD_RANK=")]
            if ranks and marker.encode() in cmdline:
                found[int(ranks[0].split(b"=")[1])] = int(pid)
        if len(found) == workers:
            return [found[rank] for rank in sorted(found)]
        time.sleep(0.1)
    raise SystemExit(f"found {len(found)} of {workers} Horovod workers running with {marker} in their command line")


def stop_run(model: str, workers: int, work: Path, name: str, env: dict) -> dict:
    """One `pipeline train` stopped by SIGTERM 0.5 s into epoch 2: what it cost."""
    runs = work / "runs"
    run = runs / name
    settings = {**model_settings(model, work / "photos"), "runs_dir": str(runs)}
    command = [sys.executable, "-m", "pipeline", "train", "--config", model_config(model), "--name", name]
    command += ["--epochs", "3", *(f"--set={key}={value}" for key, value in settings.items())]
    if workers > 1:
        command += ["--workers", str(workers)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []  # (time.time() at arrival, the line)

    def read() -> None:
        for line in process.stderr:
            lines.append((time.time(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while not (run / "checkpoints" / "epoch_001").is_dir():
        if process.poll() is not None:
            reader.join()
            tail = "\n".join(line for _, line in lines[-20:])
            raise SystemExit(f"{' '.join(command)} ended ({process.returncode}) before epoch 2:\n{tail}")
        time.sleep(0.02)
    time.sleep(0.5)  # into epoch 2
    targets = [process.pid] if workers == 1 else worker_pids(str(runs), workers)
    signalled = time.time()
    for pid in targets:
        os.kill(pid, signal.SIGTERM)
    code = process.wait(timeout=600)
    exited = time.time()
    reader.join()
    said = [(at, STOPPED_LINE.search(line)) for at, line in lines if STOPPED_LINE.search(line)]
    saved = sorted((run / "checkpoints").glob("epoch_*_batch_*"))
    if len(said) != 1 or len(saved) != 1:
        tail = "\n".join(line for _, line in lines if "worker alive" not in line)[-3000:]
        raise SystemExit(f"{' '.join(command)}: not one stopped line and one checkpoint inside an epoch:\n{tail}")
    (line_at, match), files = said[0], [path for path in saved[0].rglob("*") if path.is_file()]
    signal_batch, epoch, stopped_batch = int(match[1]), int(match[2]), int(match[3])
    others = [line for _, line in lines if not STOPPED_LINE.search(line) and "worker alive" not in line]
    return {
        "exit_code": code,
        "exit_seconds": exited - signalled,
        "line_seconds": line_at - signalled,
        "on_disk_seconds": max(path.stat().st_mtime for path in files) - signalled,
        "line_says_seconds": float(match[4]),
        "epoch": epoch,
        "signal_batch": signal_batch,
        "stopped_batch": stopped_batch,
        "batches_after_signal": stopped_batch - signal_batch,
        "checkpoint": saved[0].name,
        "checkpoint_bytes": sum(path.stat().st_size for path in files),
        "other_stderr": others[-3:],
    }


# --- 2. The stop check's cost ------------------------------------------------------------------------------------


def overhead_worker(args) -> None:
    """In one process or each worker of a horovodrun job: step times without and with Agreement; rank 0 writes
    them to args.out_json as JSON."""
    from pipeline.tensorflow_env import prepare

    prepare()
    import tensorflow as tf
    import tf_keras as keras

    from pipeline.config import config_file_path, load_config
    from train import distributed
    from train.batches import train_batches
    from train.run import Agreement, Position, StopSignals, _build, _compile, load_dataset

    distributed.init()
    overrides = {**model_settings(args.model, Path(args.folder or ".")), "runs_dir": args.runs}
    config = load_config(config_file_path(model_config(args.model)), overrides)
    data = load_dataset(config)
    # As _train sets them: determinism changes which kernels run, so it changes the step time too.
    keras.utils.set_random_seed(config["seed"])
    tf.config.experimental.enable_op_determinism()
    keras.backend.experimental.enable_tf_random_generator()
    model = _build(config, len(data.class_names))
    _compile(model, config, config["learning_rate"], len(data.class_names))
    distributed.broadcast_from_chief(model.variables + model.optimizer.variables)
    # Epochs enough for every fit: each starts a new iterator, so every segment trains on the same batches.
    batches = train_batches(data, config | {"epochs": 1000}, 0)

    class EpochClock(keras.callbacks.Callback):
        """Wall and CPU seconds (this process, all its threads) from the epoch's start to its end, after the other
        callbacks' on_epoch_end; no batch hooks. CPU time is the work done: other load on the machine changes it
        far less than the wall time."""

        def on_epoch_begin(self, epoch, logs=None):
            self.began = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            self.wall, self.cpu = time.perf_counter() - self.began[0], time.process_time() - self.began[1]

    class BatchHook(keras.callbacks.Callback):
        """A batch hook that does nothing: what Keras's per-batch callback calls cost by themselves."""

        _supports_tf_logs = True

        def on_train_batch_end(self, batch, logs=None):
            pass

    def segment(condition: str) -> tuple[float, float]:
        clock = EpochClock()
        callbacks = [clock]
        with StopSignals() as signals:
            if condition == "hook":
                callbacks.insert(0, BatchHook())
            elif condition == "with":  # no signal comes, and checkpoint_minutes (10) never falls due: it only checks
                agreement = Agreement(Path(args.runs), config, Position(0), 0, lambda *_: None)
                agreement.signals = signals
                callbacks.insert(0, agreement)
            model.fit(batches, steps_per_epoch=args.steps, epochs=1, callbacks=callbacks, verbose=0)
        return clock.wall / args.steps, clock.cpu / args.steps

    for condition in CONDITIONS:  # traces the train function and warms the data pipeline
        segment(condition)
    orders = list(itertools.permutations(CONDITIONS))  # every order in turn: no condition always first
    rows = []
    for round_ in range(args.rounds):
        times = {condition: segment(condition) for condition in orders[round_ % len(orders)]}
        rows.append({condition: times[condition][0] for condition in CONDITIONS})
        rows[-1].update({f"{condition}_cpu": times[condition][1] for condition in CONDITIONS})
    if distributed.is_chief():
        Path(args.out_json).write_text(json.dumps(rows))


def overhead(model: str, workers: int, steps: int, args, work: Path, env: dict) -> dict:
    out = work / f"overhead_{model}_{workers}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--overhead-worker", "--model", model]
    command += ["--steps", str(steps), "--rounds", str(args.rounds), "--out-json", str(out)]
    command += ["--runs", str(work / "runs"), "--folder", str(work / "photos")]
    if workers > 1:
        command = [HOROVODRUN, "-np", str(workers), "-H", f"localhost:{workers}", "--gloo", *command]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    rows = json.loads(out.read_text())
    return {
        "model": model,
        "workers": workers,
        "batch_size": model_settings(model, work)["batch_size"],
        "steps": steps,
        "without_ms": spread([1000 * row["without"] for row in rows]),
        "hook_ms": spread([1000 * row["hook"] for row in rows]),
        "with_ms": spread([1000 * row["with"] for row in rows]),
        "hook_ratio": spread([row["hook"] / row["without"] for row in rows]),
        "ratio": spread([row["with"] / row["without"] for row in rows]),
        "cpu_without_ms": spread([1000 * row["without_cpu"] for row in rows]),
        "cpu_hook_ratio": spread([row["hook_cpu"] / row["without_cpu"] for row in rows]),
        "cpu_ratio": spread([row["with_cpu"] / row["without_cpu"] for row in rows]),
        "raw": rows,
    }


# --- the report --------------------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cell(values: dict, digits: int = 2) -> str:
    return f"{values['median']:.{digits}f} ({values['min']:.{digits}f}-{values['max']:.{digits}f})"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown CPU"


def report(results: dict) -> str:
    stops, costs = results["stops"], results["overhead"]
    lines = [
        f"Preemption on {results['cpu']}, {results['cores']} cores, {results['date']}: small_cnn on Fashion-MNIST "
        f"(1,000 images a class, batch 64), efficientnet_lite0 as `--config transfer` (frozen ImageNet backbone, "
        f"input_size 96, batch 32) on {results['photos']:,} drawn JPEGs in 3 classes; the machine was shared with "
        "other work, so single figures are noisy.",
        "",
        f"SIGTERM 0.5 s into epoch 2 (alone: to the process; 2 workers: to both workers, the exit and its code "
        f"the launcher's, `pipeline train --workers 2`), median (min-max) of "
        f"{results['repeats']} runs each; seconds after the signal. Work lost: none -- the batches trained after "
        "the signal are in the checkpoint.",
        "",
        "| model | workers | checkpoint on disk | stopped line | process exit | exit code | signal at batch | "
        "batches trained after the signal (saved) | checkpoint size |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |",
    ]
    for row in stops:
        runs = row["runs"]
        codes = sorted({run["exit_code"] for run in runs})
        after = spread([run["batches_after_signal"] for run in runs])
        size = spread([run["checkpoint_bytes"] / 2**20 for run in runs])
        lines.append(
            f"| {row['model']} | {row['workers']} | {cell(spread([r['on_disk_seconds'] for r in runs]))} | "
            f"{cell(spread([r['line_seconds'] for r in runs]))} | {cell(spread([r['exit_seconds'] for r in runs]))} | "
            f"{', '.join(map(str, codes))} | {', '.join(str(r['signal_batch']) for r in runs)} | "
            f"{cell(after, 0)} | {size['median']:.2f} MiB |"
        )
    codes = {run["exit_code"] for row in stops for run in row["runs"]}
    if codes != {STOPPED}:
        lines += ["", f"Exit codes other than {STOPPED} seen: what the process said besides the stopped line:"]
        for row in stops:
            for run in row["runs"]:
                if run["exit_code"] != STOPPED:
                    said = " / ".join(run["other_stderr"]) or "nothing"
                    lines.append(f"- {row['model']}, {row['workers']} workers, exit {run['exit_code']}: {said}")
                    break
    lines += [
        "",
        f"The stop check's cost: model.fit over the same batches without a callback, with a batch hook that does "
        f"nothing, and with Agreement (alone: a check every batch; 2 workers: an allreduce every 10 batches), "
        f"segments interleaved in one process or job; ms per step, median (min-max) of {results['rounds']} rounds, "
        "and the ratios to the segment without a callback within each round, of the wall time and of the process's "
        "CPU time (all threads; rank 0's in the job). Other load on the machine changes the CPU time far less than "
        "the wall time: the target is judged on it.",
        "",
        "| model | workers | batch (per worker) | steps a segment | ms/step without | with a no-op batch hook | "
        "with Agreement | wall: no-op hook / without | wall: Agreement / without | CPU: no-op hook / without | "
        "CPU: Agreement / without | target (CPU) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in costs:
        met = "met" if row["cpu_ratio"]["median"] <= OVERHEAD_TARGET else "NOT met"
        lines.append(
            f"| {row['model']} | {row['workers']} | {row['batch_size']} | {row['steps']} | {cell(row['without_ms'])} | "
            f"{cell(row['hook_ms'])} | {cell(row['with_ms'])} | {cell(row['hook_ratio'], 3)} | "
            f"{cell(row['ratio'], 3)} | {cell(row['cpu_hook_ratio'], 3)} | {cell(row['cpu_ratio'], 3)} | "
            f"<= {OVERHEAD_TARGET}: {met} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="SIGTERM runs of each model and worker count")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds of the stop check's cost")
    parser.add_argument("--photos", type=int, default=600, help="drawn images of each of the 3 classes")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 6 rounds: a check")
    parser.add_argument("--out", default="preemption", help="results name under benchmarks/results/")
    # One segment-timing process (alone, or each worker of a horovodrun job): used by this script itself.
    parser.add_argument("--overhead-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--runs", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out-json", dest="out_json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.overhead_worker:
        overhead_worker(args)
        return
    if args.quick:
        args.repeats, args.rounds = 1, 6

    work = Path(tempfile.mkdtemp(prefix="preemption_bench_"))
    # A cache of its own (the image folder is new each time); unbuffered output stamps each line on arrival.
    env = {**os.environ, "PIPELINE_CACHE": str(work / "cache"), "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    try:
        draw_image_folder(work / "photos", args.photos)
        stops = []
        for model in ("small_cnn", "efficientnet_lite0"):
            for workers in (1, 2):
                runs = []
                for repeat in range(args.repeats):
                    runs.append(stop_run(model, workers, work, f"{model}_{workers}_{repeat}", env))
                    last = runs[-1]
                    print(
                        f"{model}, {workers} worker(s), run {repeat + 1}: exit {last['exit_code']} "
                        f"{last['exit_seconds']:.2f} s after SIGTERM, checkpoint on disk at "
                        f"{last['on_disk_seconds']:.2f} s, signal at batch {last['signal_batch']}, stopped at "
                        f"{last['stopped_batch']}, {last['checkpoint_bytes']:,} bytes",
                        flush=True,
                    )
                stops.append({"model": model, "workers": workers, "runs": runs})
        costs = []
        for model, workers, steps in (("small_cnn", 1, 100), ("small_cnn", 2, 50), ("efficientnet_lite0", 1, 30)):
            costs.append(overhead(model, workers, steps, args, work, env))
            last = costs[-1]
            print(
                f"stop check, {model}, {workers} worker(s): {last['without_ms']['median']:.2f} ms/step without, "
                f"{last['hook_ms']['median']:.2f} with a no-op hook, {last['with_ms']['median']:.2f} with Agreement, "
                f"ratio {last['ratio']['median']:.3f}, CPU ratio {last['cpu_ratio']['median']:.3f}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "repeats": args.repeats,
        "rounds": args.rounds,
        "photos": 3 * args.photos,
        "stops": stops,
        "overhead": costs,
    }
    text = report(results)
    print("\n" + text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(text)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
