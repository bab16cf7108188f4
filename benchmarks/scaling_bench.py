"""Data-parallel scaling predicted from one process: the images/s and efficiency of 1 to 512 workers for
small_cnn, mobilenet_v2 and efficientnet_lite0 on three links, checked against the 1- and 2-worker runs this
machine can make.

    python benchmarks/scaling_bench.py [--steps 20] [--per-class 1000] [--epochs 3] [--rounds 2] [--no-two-hosts]

1. Measured here, per model: the step time of one process training alone (median of --steps model.fit steps
   on in-memory batches after a warm-up: compute alone, no input pipeline), and the bytes each worker sends into the
   allreduce per step (trainable values x 2 for fp16, x 4 for none); EfficientNet-Lite0 both trained whole and
   with its backbone frozen (transfer learning: only the head trains, so only the head is allreduced).
2. The model. Ring allreduce among N workers: T_comm(N) = 2 (N-1)/N x bytes / bandwidth + 2 (N-1) x latency.
   A step takes T_compute + T_comm(N) (compute and allreduce never overlap: conservative), at best
   max(T_compute, T_comm(N)) (fully overlapped). images/s(N) = N x batch / step; efficiency(N) = images/s(N) /
   (N x images/s(1)). Links: 10 GbE (1.25 GB/s, 50 us), 100 Gb InfiniBand (12.5 GB/s, 5 us) and this machine's
   loopback, measured with a 2-worker Horovod allreduce of one value (latency) and of a large tensor (bandwidth).
3. Checked against `pipeline train` of small_cnn here: alone, with --workers 2, and with 2 workers over ssh on two
   "hosts" (sshd on 127.0.0.2 and 127.0.0.3, tests/sshd.py), images/s read from metrics.csv. Workers on one
   machine share its cores, which one process already keeps busy: k workers on a host each compute k times slower.

Prints the tables and writes benchmarks/results/scaling.md, scaling.json and scaling.png (efficiency against
workers, a panel per link). --from-json predicts again from a scaling.json's measurements, measuring nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HOROVODRUN = str(Path(sys.executable).parent / "horovodrun")
WORKERS = [2**i for i in range(10)]  # 1, 2, 4, ..., 512
CLASSES = 10
BYTES_PER_VALUE = {"fp16": 2, "none": 4}  # as train/distributed.py counts them
LINKS = {  # bytes/s, seconds per message
    "10 GbE": (1.25e9, 50e-6),
    "100 Gb InfiniBand": (12.5e9, 5e-6),
}
LOOPBACK = "loopback (measured)"
PROBE_VALUES = 16 * 2**20  # float32 values of the bandwidth probe: 64 MiB
# name: (build_model's model, input size, channels, width, dropout, batch, frozen backbone)
WORKLOADS = {
    "small_cnn": ("small_cnn", 28, 1, 1.0, 0.3, 128, False),
    "mobilenet_v2 0.35": ("mobilenet_v2", 96, 3, 0.35, 0.2, 32, False),
    "efficientnet_lite0": ("efficientnet_lite0", 224, 3, 1.0, 0.2, 32, False),
    "efficientnet_lite0, head only": ("efficientnet_lite0", 224, 3, 1.0, 0.2, 32, True),
}


def step_time(name: str, steps: int, warmup: int) -> dict:
    """One process training `name` alone: the median seconds per step, and its trainable values."""
    import tensorflow as tf
    import tf_keras as keras

    from train import efficientnet_lite
    from train.data import find_fashion_mnist, read_fashion_mnist
    from train.models import build_model

    model_name, size, channels, width, dropout, batch, frozen = WORKLOADS[name]
    keras.utils.set_random_seed(0)
    model = build_model(model_name, size, channels, CLASSES, width, dropout)
    if frozen:  # what `pipeline train --config transfer` trains: the new head alone
        efficientnet_lite.freeze_backbone(model, fine_tune_blocks=0)
    model.compile(optimizer=keras.optimizers.Adam(0.001), loss=keras.losses.CategoricalCrossentropy())
    count = 4 * batch  # four different batches, repeated
    if model_name == "small_cnn":
        images, labels = read_fashion_mnist(find_fashion_mnist(None), "train")
        x, y = images[:count, ..., None], labels[:count]
    else:  # synthetic pixels: the compute does not depend on what the images show
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (count, size, size, channels), dtype=np.uint8)
        y = rng.integers(0, CLASSES, count)
    one_hot = keras.utils.to_categorical(y, CLASSES)
    batches = tf.data.Dataset.from_tensor_slices((x.astype(np.float32), one_hot)).batch(batch).cache().repeat()
    ends = []  # model.fit as `pipeline train` calls it; a step is the time between two batch ends
    timer = keras.callbacks.LambdaCallback(on_train_batch_end=lambda step, logs: ends.append(time.perf_counter()))
    model.fit(batches, steps_per_epoch=warmup + steps + 1, epochs=1, callbacks=[timer], verbose=0)
    values = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    step_seconds = statistics.median(np.diff(ends)[warmup:])
    return {"batch": batch, "step_seconds": float(step_seconds), "trainable_values": values}


def probe_link(out: Path, repeats: int) -> None:
    """Run by each of 2 Horovod workers: the median seconds of an allreduce of 1 value and of PROBE_VALUES."""
    from pipeline.tensorflow_env import prepare

    prepare()
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()

    def median_seconds(values: int) -> float:
        tensor = tf.ones([values])
        hvd.allreduce(tensor, op=hvd.Sum).numpy()  # warm-up: the first call negotiates the ring
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            hvd.allreduce(tensor, op=hvd.Sum).numpy()
            seconds.append(time.perf_counter() - started)
        return statistics.median(seconds)

    small, large = median_seconds(1), median_seconds(PROBE_VALUES)
    if hvd.rank() == 0:
        out.write_text(
            json.dumps({"one_value_seconds": small, "large_seconds": large, "large_bytes": 4 * PROBE_VALUES})
        )


def loopback_link(work: Path, repeats: int) -> dict:
    """This machine's loopback as the model sees a link: with N = 2, T_comm = bytes / bandwidth + 2 x latency."""
    out = work / "probe.json"
    command = [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(Path(__file__).resolve())]
    command += ["--link-probe", str(out), "--probe-repeats", str(repeats)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    probe = json.loads(out.read_text())
    latency = probe["one_value_seconds"] / 2
    bandwidth = probe["large_bytes"] / (probe["large_seconds"] - probe["one_value_seconds"])
    return {**probe, "bandwidth": bandwidth, "latency": latency}


def ring_seconds(bytes_: float, workers: int, bandwidth: float, latency: float) -> float:
    return 2 * (workers - 1) / workers * bytes_ / bandwidth + 2 * (workers - 1) * latency


def predict(workload: dict, compression: str, workers: int, link: tuple[float, float], per_host: int = 1) -> dict:
    """images/s, efficiency and the fully-overlapped efficiency of `workers` workers, `per_host` to a host (they
    share its cores: one process alone already keeps them busy)."""
    compute = workload["step_seconds"] * per_host
    comm = ring_seconds(workload["trainable_values"] * BYTES_PER_VALUE[compression], workers, *link)
    alone = workload["batch"] / workload["step_seconds"]
    images = workers * workload["batch"] / (compute + comm)
    overlapped = workers * workload["batch"] / max(compute, comm)
    return {
        "images_per_second": images,
        "efficiency": images / (workers * alone),
        "efficiency_overlapped": overlapped / (workers * alone),
    }


def pipeline_run(runs: Path, name: str, workers: int, args, extra: list[str], env: dict) -> dict:
    """`pipeline train` of small_cnn at batch 128 per worker: median images/s over epochs 2.., and its bytes."""
    command = [sys.executable, "-m", "pipeline", "train", "--name", name, "--epochs", str(args.epochs)]
    command += ["--batch-size", "128", "--compression", "fp16", "--set", f"runs_dir={runs}"]
    # A small validation split: the epoch's seconds include validation, which the step-time model leaves out.
    command += ["--set", f"max_images_per_class={args.per_class}", "--set", "val_fraction=0.02", *extra]
    if workers > 1:
        command += ["--workers", str(workers)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    with open(runs / name / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        "workers": workers,
        "images_per_second": statistics.median(float(row["images_per_second"]) for row in rows[1:]),
        "allreduce_bytes_per_step": int(rows[0]["allreduce_bytes_per_step"]),
    }


def ssh_hosts(stack: contextlib.ExitStack, work: Path):
    """tests/sshd.py's two sshd "hosts" (127.0.0.2 and 127.0.0.3) until `stack` closes; None where they cannot start."""
    import pytest

    from tests.sshd import two_hosts

    try:
        return stack.enter_context(two_hosts(work / "sshd"))
    except pytest.skip.Exception as skipped:
        print(f"two hosts skipped: {skipped}", flush=True)
        return None


def real_runs(work: Path, args) -> dict:
    """small_cnn trained by the pipeline here, alone, by 2 workers on this host and by 2 over ssh on two "hosts",
    in interleaved rounds: the median of each setup's images/s."""
    env = {**os.environ, "PIPELINE_CACHE": str(work / "cache")}
    setups = {"1 worker": (1, [], env), "2 workers, one host": (2, [], env)}
    with contextlib.ExitStack() as stack:
        hosts = None if args.no_two_hosts else ssh_hosts(stack, work)
        if hosts:
            extra = ["--hosts", hosts.hosts(), *hosts.ssh_options(), "--network-interface", "lo"]
            setups["2 workers, two hosts over ssh"] = (2, extra, {**hosts.env(), **env})
        results: dict[str, list[dict]] = {name: [] for name in setups}
        for round_ in range(args.rounds):
            for i, (name, (workers, extra, run_env)) in enumerate(setups.items()):
                results[name].append(pipeline_run(work, f"run{i}_{round_}", workers, args, extra, run_env))
                print(f"measured: round {round_ + 1}: {name}: {results[name][-1]}", flush=True)
    return {
        name: {
            "workers": runs[0]["workers"],
            "images_per_second": statistics.median(run["images_per_second"] for run in runs),
            "images_per_second_rounds": [run["images_per_second"] for run in runs],
            "allreduce_bytes_per_step": runs[0]["allreduce_bytes_per_step"],
        }
        for name, runs in results.items()
    }


def measure(args) -> dict:
    from pipeline.tensorflow_env import prepare

    prepare()
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()  # as `pipeline train` trains
    workloads = {}
    for name in WORKLOADS:
        workloads[name] = step_time(name, args.steps, args.warmup)
        print(f"measured: {name}: {workloads[name]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="scaling_bench_") as tmp:
        work = Path(tmp)
        loopback = loopback_link(work, args.probe_repeats)
        print(f"measured: loopback {loopback}", flush=True)
        runs = real_runs(work, args)
    return {"workloads": workloads, "loopback": loopback, "runs": runs, "rounds": args.rounds, "cores": os.cpu_count()}


def links(measured: dict) -> dict[str, tuple[float, float]]:
    return {**LINKS, LOOPBACK: (measured["loopback"]["bandwidth"], measured["loopback"]["latency"])}


def predictions(measured: dict) -> dict:
    """{workload: {link: {compression: [prediction for each of WORKERS]}}}"""
    return {
        name: {
            link: {c: [predict(workload, c, n, params) for n in WORKERS] for c in BYTES_PER_VALUE}
            for link, params in links(measured).items()
        }
        for name, workload in measured["workloads"].items()
    }


def checks(measured: dict) -> list[dict]:
    """Predicted against measured images/s of the pipeline's small_cnn runs here (fp16, loopback)."""
    workload = {**measured["workloads"]["small_cnn"], "batch": 128}
    loopback = links(measured)[LOOPBACK]
    rows = []
    for run, result in measured["runs"].items():
        workers = result["workers"]
        # Both "hosts" are this machine: its cores are shared the same way.
        predicted = predict(workload, "fp16", workers, loopback, per_host=workers)["images_per_second"]
        model_bytes = workload["trainable_values"] * BYTES_PER_VALUE["fp16"] if workers > 1 else 0
        rows.append({"run": run, "predicted": predicted, "model_bytes": model_bytes, **result})
    return rows


def scales_to(series: list[dict], level: float) -> str:
    """The most workers whose efficiency is still at least `level`."""
    return str(max(n for n, p in zip(WORKERS, series) if p["efficiency"] >= level))


def report(measured: dict, predicted: dict, check_rows: list[dict]) -> str:
    loop = measured["loopback"]
    ten_gbe = LINKS["10 GbE"]
    lines = [
        f"# Data-parallel scaling ({platform.node()}, {measured['cores']} cores, {time.strftime('%Y-%m-%d')})",
        "",
        "Measured here: one process alone, median step time of model.fit on in-memory batches after a warm-up "
        "(compute only); allreduce bytes per step per worker = trainable values x 2 (fp16) or x 4 (none). "
        "Compute / comm: T_compute over the fp16 allreduce of many workers on 10 GbE (2 x bytes / bandwidth).",
        "",
        "| model | batch | step ms | images/s alone | trainable values | allreduce fp16 | allreduce none "
        "| compute / comm, 10 GbE |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, w in measured["workloads"].items():
        fp16 = w["trainable_values"] * BYTES_PER_VALUE["fp16"]
        ratio = w["step_seconds"] / (2 * fp16 / ten_gbe[0])
        lines.append(
            f"| {name} | {w['batch']} | {1000 * w['step_seconds']:.1f} | {w['batch'] / w['step_seconds']:.0f} | "
            f"{w['trainable_values']:,} | {fp16 / 2**20:.2f} MiB | {2 * fp16 / 2**20:.2f} MiB | {ratio:.1f} |"
        )
    lines += [
        "",
        "Links: 10 GbE 1.25 GB/s and 50 us, 100 Gb InfiniBand 12.5 GB/s and 5 us; this machine's loopback, measured "
        f"by 2 Horovod workers (Gloo): an allreduce of one value took {1e6 * loop['one_value_seconds']:.0f} us "
        f"(latency {1e6 * loop['latency']:.0f} us), of {loop['large_bytes'] / 2**20:.0f} MiB "
        f"{1000 * loop['large_seconds']:.0f} ms: {loop['bandwidth'] / 1e9:.2f} GB/s. The loopback's latency is mostly "
        "Horovod's own cost per allreduce (its background cycle and negotiation), which the model then counts at every "
        "hop of the ring; its columns beyond 2 workers describe the link alone, not this 2-core machine.",
        "",
        "Predicted efficiency, one worker per host (or per GPU), no overlap of compute and allreduce; the last "
        "columns: the images/s of 512, the most workers still at 90% and 50% efficiency, and the efficiency of 512 "
        "fully overlapped:",
        "",
        "| model | link | grads | "
        + " | ".join(str(n) for n in WORKERS)
        + " | images/s, 512 | 90% to | 50% to | 512 overlapped |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in WORKERS) + " | ---: | ---: | ---: | ---: |",
    ]
    for name, per_link in predicted.items():
        for link, per_compression in per_link.items():
            for compression, series in per_compression.items():
                cells = " | ".join(f"{100 * p['efficiency']:.0f}%" for p in series)
                lines.append(
                    f"| {name} | {link} | {compression} | {cells} | {series[-1]['images_per_second']:,.0f} | "
                    f"{scales_to(series, 0.9)} | "
                    f"{scales_to(series, 0.5)} | {100 * series[-1]['efficiency_overlapped']:.0f}% |"
                )
    lines += [
        "",
        "At hundreds of workers the ring's 2 (N-1) latencies, more than the bytes, cost the small models most (fp16 "
        "halves only the bytes' term); Horovod's hierarchical allreduce and NCCL's trees pay about log N latencies "
        "instead. A worker k times faster (a GPU) sees the efficiency of a link k times slower: 100 Gb InfiniBand with "
        "workers 10 times as fast as these cores is the 10 GbE row.",
        "",
        "Checked here: `pipeline train` of small_cnn, Fashion-MNIST, batch 128 per worker, fp16, median images/s "
        f"of epochs 2.. from metrics.csv (validation included, 2% of the images), median of {measured['rounds']} "
        "interleaved rounds. Predicted on the loopback link with "
        f"the {measured['cores']} cores shared: one process already keeps them busy, so each of 2 workers on this "
        'machine computes a step in twice the time (the two ssh "hosts" are this machine too).',
        "",
        "| run | predicted images/s | measured images/s | measured / predicted | allreduce bytes/step: run, model |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in check_rows:
        lines.append(
            f"| {row['run']} | {row['predicted']:.0f} | {row['images_per_second']:.0f} | "
            f"{row['images_per_second'] / row['predicted']:.2f} | "
            f"{row['allreduce_bytes_per_step']:,}, {row['model_bytes']:,} |"
        )
    small = measured["workloads"]["small_cnn"]
    comm = ring_seconds(small["trainable_values"] * BYTES_PER_VALUE["fp16"], 2, *links(measured)[LOOPBACK])
    lines += [
        "",
        f"The allreduce is {100 * comm / (2 * small['step_seconds'] + comm):.0f}% of a predicted 2-worker step here. "
        "What the model leaves out shows below 1: the pipeline's input from the cache, validation and callbacks "
        "(1 worker), and on one machine each worker's own thread pools and Horovod's background thread contending "
        "for the same cores (2 workers).",
    ]
    return "\n".join(lines) + "\n"


def plot(measured: dict, predicted: dict, path: Path) -> None:
    """Efficiency against workers, a panel per link, a colour per model; fp16 solid, none dashed."""
    from matplotlib.figure import Figure

    link_names = list(links(measured))
    fig = Figure(figsize=(16, 5.2))
    axes = fig.subplots(1, len(link_names), sharey=True)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for ax, link in zip(axes, link_names):
        bandwidth, latency = links(measured)[link]
        for colour, name in zip(colours, predicted):
            for compression, style in (("fp16", "-"), ("none", "--")):
                series = predicted[name][link][compression]
                efficiency = [p["efficiency"] for p in series]
                ax.plot(WORKERS, efficiency, style, color=colour, marker=".", label=f"{name}, {compression}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(WORKERS, [str(n) for n in WORKERS])
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("workers")
        ax.set_title(f"{link}: {bandwidth / 1e9:.2f} GB/s, {1e6 * latency:.0f} us")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("efficiency (images/s per worker / alone)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Predicted scaling: ring allreduce, no overlap; fp16 gradients solid, float32 (none) dashed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing)")
    parser.add_argument("--probe-repeats", type=int, default=20, help="timed allreduces of each size")
    parser.add_argument("--per-class", type=int, default=1000, help="Fashion-MNIST images per class, pipeline runs")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each pipeline run (images/s from the 2nd)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the pipeline runs")
    parser.add_argument("--no-two-hosts", action="store_true", help="skip the run over ssh on 127.0.0.2/3")
    parser.add_argument("--from-json", type=Path, help="predict from this scaling.json's measurements instead")
    parser.add_argument("--link-probe", type=Path, help=argparse.SUPPRESS)  # a worker of loopback_link
    args = parser.parse_args()
    if args.link_probe:
        probe_link(args.link_probe, args.probe_repeats)
        return
    measured = json.loads(args.from_json.read_text())["measured"] if args.from_json else measure(args)
    predicted = predictions(measured)
    check_rows = checks(measured)
    text = report(measured, predicted, check_rows)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling.md").write_text(text)
    record = {"measured": measured, "workers": WORKERS, "predicted": predicted, "checks": check_rows}
    (RESULTS / "scaling.json").write_text(json.dumps(record, indent=2))
    plot(measured, predicted, RESULTS / "scaling.png")


if __name__ == "__main__":
    main()
