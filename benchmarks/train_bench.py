"""`pipeline train` against the plain tf_keras script a Keras user writes (benchmarks/bare_train.py), in one run.

    python benchmarks/train_bench.py [--rounds 5] [--epochs 3] [--per-class 1800]
    python benchmarks/train_bench.py --quick          # 2 rounds of 2 epochs on 500 images a class: a check

Both train the small CNN (width 1, batch 128, Adam at 1e-3) on the same numbers of Fashion-MNIST images (18,000 by
default: 16,200 train, 1,800 validation, 10,000 test), for the same epochs, as a user runs them: a new process each,
the pipeline on a warm data cache (its first run decodes the data once; that run is not timed). The rounds
interleave the two (plain, pipeline, then pipeline, plain, ...), so a machine that slows down slows both.

Each process's stdout is read line by line and every line stamped on arrival, which gives the phases without
changing either program:
    start-up        launch -> TensorFlow imported (plain: its version line; pipeline: the "run:" line, less its
                    data and set-up seconds from summary.json)
    data            the data loaded (plain: its "data:" line; pipeline: summary.json)
    set-up          model built and compiled, fit started: up to "Epoch 1/N"
    first epoch     "Epoch 1/N" -> the epoch's training and validation done (pipeline: its "epoch 1:" line,
                    printed before its bookkeeping; plain: Keras's epoch line)
    later epochs    the same for epochs 2..N, per epoch
    bookkeeping     pipeline only, per epoch: "epoch k:" -> Keras's epoch line (checkpoint, metrics, best model,
                    TensorBoard)
    evaluation      the last epoch line -> the final result line (plain: model.evaluate on the test images;
                    pipeline: validation and test predictions, confusion matrix, curves, summary.json)
    exit            the final line -> the process gone
    cpu             the process's user + system seconds (from wait4), all phases

Prints a table and writes it to benchmarks/results/train.md (and train.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BATCH_SIZE = 128
# Target of issue 13: the pipeline's wall time at most 1.05x the plain script's; bookkeeping under 2% of an epoch.
WALL_TARGET = 1.05
BOOKKEEPING_TARGET = 0.02
PHASES = (
    "start-up",
    "data",
    "set-up",
    "first epoch",
    "later epochs",
    "bookkeeping",
    "evaluation",
    "exit",
    "wall",
    "cpu",
)


def stamped_lines(command: list[str], env: dict) -> tuple[list[tuple[float, str]], float, float]:
    """Run `command`; (seconds since launch at which each stdout line arrived, the line), the wall seconds and the
    CPU seconds (user + system, all threads: the work done, which other load on the machine changes less)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        lines = [(time.perf_counter() - started, line.rstrip("\n")) for line in process.stdout]
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        if process.returncode != 0:
            errors.seek(0)
            sys.exit(f"{' '.join(command)} failed ({process.returncode}):\n{errors.read().decode()[-3000:]}")
    return lines, wall, usage.ru_utime + usage.ru_stime


def first_at(lines: list[tuple[float, str]], pattern: str) -> float:
    """When the first line matching `pattern` (a regular expression, from the line's start) arrived."""
    for at, line in lines:
        if re.match(pattern, line):
            return at
    raise SystemExit(f"no line matching {pattern!r} in:\n" + "\n".join(line for _, line in lines))


def all_at(lines: list[tuple[float, str]], pattern: str) -> list[float]:
    return [at for at, line in lines if re.match(pattern, line)]


# Keras's epoch line at verbose=2: "127/127 - 5s - loss: ... - 43ms/step".
KERAS_EPOCH_LINE = r"\d+/\d+ - .*/step$"


def plain_phases(lines: list[tuple[float, str]], wall: float, cpu: float, epochs: int) -> dict:
    imported, loaded = first_at(lines, "TensorFlow "), first_at(lines, "data: ")
    begins, ends = all_at(lines, r"Epoch \d+/"), all_at(lines, KERAS_EPOCH_LINE)
    result = first_at(lines, "test accuracy")
    assert len(begins) == len(ends) == epochs, (begins, ends)
    return {
        "start-up": imported,
        "data": loaded - imported,
        "set-up": begins[0] - loaded,
        "first epoch": ends[0] - begins[0],
        "later epochs": statistics.mean(end - begin for begin, end in zip(begins[1:], ends[1:])),
        "bookkeeping": 0.0,
        "evaluation": result - ends[-1],
        "exit": wall - result,
        "wall": wall,
        "cpu": cpu,
    }


def pipeline_phases(lines: list[tuple[float, str]], wall: float, cpu: float, epochs: int, summary: dict) -> dict:
    header = first_at(lines, "run: ")
    begins, trained = all_at(lines, r"Epoch \d+/"), all_at(lines, r"epoch \d+: ")
    ends, result = all_at(lines, KERAS_EPOCH_LINE), first_at(lines, "best epoch")
    assert len(begins) == len(trained) == len(ends) == epochs, (begins, trained, ends)
    seconds = summary["seconds"]
    return {
        "start-up": header - seconds["data"] - seconds["setup"],
        "data": seconds["data"],
        "set-up": seconds["setup"] + begins[0] - header,
        "first epoch": trained[0] - begins[0],
        "later epochs": statistics.mean(end - begin for begin, end in zip(begins[1:], trained[1:])),
        "bookkeeping": statistics.mean(end - done for done, end in zip(trained, ends)),
        "evaluation": result - ends[-1],
        "exit": wall - result,
        "wall": wall,
        "cpu": cpu,
    }


def plain_command(args) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "benchmarks" / "bare_train.py"),
        "--epochs",
        str(args.epochs),
        "--per-class",
        str(args.per_class),
        "--batch-size",
        str(BATCH_SIZE),
    ]


def pipeline_command(args, runs: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        "--name",
        "bench",
        "--exist-ok",
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(BATCH_SIZE),
        "--set",
        f"max_images_per_class={args.per_class}",
        "--set",
        f"runs_dir={runs}",
    ]


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(args, work: Path) -> dict:
    # As on a user's machine: Python caches bytecode (this project's machines set PYTHONDONTWRITEBYTECODE, which
    # would make the pipeline compile its own modules at every start). Unbuffered output stamps each line on time.
    env = {**os.environ, "PIPELINE_CACHE": str(work / "cache"), "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    runs = work / "runs"
    summary_path = runs / "bench" / "summary.json"
    print("warm-up: one untimed run of each (the pipeline's decodes the data into its cache)", flush=True)
    stamped_lines(pipeline_command(args, runs), env)
    stamped_lines(plain_command(args), env)

    rounds: dict[str, list[dict]] = {"plain": [], "pipeline": []}
    for round_ in range(args.rounds):
        order = ("plain", "pipeline") if round_ % 2 == 0 else ("pipeline", "plain")
        for name in order:
            if name == "plain":
                lines, wall, cpu = stamped_lines(plain_command(args), env)
                phases = plain_phases(lines, wall, cpu, args.epochs)
            else:
                lines, wall, cpu = stamped_lines(pipeline_command(args, runs), env)
                phases = pipeline_phases(lines, wall, cpu, args.epochs, json.loads(summary_path.read_text()))
            rounds[name].append(phases)
            print(
                f"round {round_ + 1}/{args.rounds} {name:8s} wall {wall:6.2f} s, cpu {cpu:6.2f} s, first epoch "
                f"{phases['first epoch']:5.2f} s, later {phases['later epochs']:5.2f} s, bookkeeping "
                f"{phases['bookkeeping']:4.2f} s, evaluation {phases['evaluation']:4.2f} s",
                flush=True,
            )
    ratios = [p["wall"] / q["wall"] for p, q in zip(rounds["pipeline"], rounds["plain"])]
    cpu_ratios = [p["cpu"] / q["cpu"] for p, q in zip(rounds["pipeline"], rounds["plain"])]
    bookkeeping_shares = [p["bookkeeping"] / p["later epochs"] for p in rounds["pipeline"]]
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "epochs": args.epochs,
        "per_class": args.per_class,
        "batch_size": BATCH_SIZE,
        "phases": {
            name: {phase: spread([r[phase] for r in rows]) for phase in PHASES} for name, rows in rounds.items()
        },
        "wall_ratio": spread(ratios),
        "cpu_ratio": spread(cpu_ratios),
        "bookkeeping_share": spread(bookkeeping_shares),
        "raw": rounds,
    }


def seconds(cell: dict) -> str:
    return f"{cell['median']:.2f} ({cell['min']:.2f}-{cell['max']:.2f})"


def report(results: dict) -> str:
    plain, pipe = results["phases"]["plain"], results["phases"]["pipeline"]
    ratio, cpu, share = results["wall_ratio"], results["cpu_ratio"], results["bookkeeping_share"]
    images = 10 * results["per_class"]
    lines = [
        f"Training overhead on {results['machine']}, {results['date']}: small_cnn, {images:,} Fashion-MNIST images "
        f"(90/10 train/validation, plus the 10,000 test images), {results['epochs']} epochs of batch "
        f"{results['batch_size']}; seconds, median (min-max) of {results['rounds']} interleaved rounds",
        "",
        "| phase | plain tf_keras script | pipeline train | difference |",
        "| --- | ---: | ---: | ---: |",
    ]
    for phase in PHASES:
        difference = pipe[phase]["median"] - plain[phase]["median"]
        lines.append(f"| {phase} | {seconds(plain[phase])} | {seconds(pipe[phase])} | {difference:+.2f} |")
    wall_met = "met" if ratio["median"] <= WALL_TARGET else "NOT met"
    share_met = "met" if share["median"] < BOOKKEEPING_TARGET else "NOT met"
    lines += [
        "",
        f"- wall time, pipeline / plain (paired rounds): {ratio['median']:.3f}x ({ratio['min']:.3f}-"
        f"{ratio['max']:.3f}); target <= {WALL_TARGET}x: {wall_met}",
        f"- CPU time (user + system), pipeline / plain: {cpu['median']:.3f}x ({cpu['min']:.3f}-{cpu['max']:.3f})",
        f"- bookkeeping per epoch / a later epoch: {100 * share['median']:.1f}% ({100 * share['min']:.1f}-"
        f"{100 * share['max']:.1f}%); target < {100 * BOOKKEEPING_TARGET:.0f}%: {share_met}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=1800, help="images of each class (10 classes)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 epochs on 500 images a class")
    parser.add_argument("--out", default="train", help="results name under benchmarks/results/")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.epochs, args.per_class = 2, 2, 500
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is reported apart from the later ones)")
    work = Path(tempfile.mkdtemp(prefix="train_bench_"))
    try:
        results = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(results)
    print("\n" + text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(text)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
