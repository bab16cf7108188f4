"""From a trained Keras model to bundles: convert, evaluate against float, gate, write metadata, report.

quantize/ knows no run directory's layout: the caller (pipeline/jobs.py, from train.rundir.RunDir) says where the
model is and where each file goes (`Trained`)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras

from quantize import QUANTIZED_MODES, SENSITIVE_STEPS
from quantize.client_input import CLIENT_CHANNELS, as_rgb, for_clients
from quantize.convert import Images, quantization_aware, to_tflite
from quantize.metadata import embed_metadata
from quantize.tflite_internals import check_version
from serve.bundle_metadata import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    BundleMetadata,
    InputSpec,
    Normalization,
    Quantization,
)
from serve.classifier import Classifier
from serve.errors import PipelineError
from serve.files import write_atomic
from serve.metrics import classification_report, ranked, top_k_accuracy

GREY_NOTE = "; trained on grey images: the model converts RGB to grey as Pillow does (L = R*0.299 + G*0.587 + B*0.114)"
LATENCY_RUNS = 100  # single-image timings per bundle, spread over LATENCY_ROUNDS alternating rounds
LATENCY_ROUNDS = 10


class QuantizeError(PipelineError):
    """A run directory that cannot be quantised."""


@dataclass(kw_only=True)
class QuantizeData:
    """What quantisation needs from the run's data, assembled by the caller (pipeline/jobs.py)."""

    class_names: list[str]
    calibration: np.ndarray  # uint8 images that set the int8 activation ranges
    eval_x: Images  # held-out images, read a batch at a time: accuracy gate, fidelity to float32, latency
    eval_y: np.ndarray | None  # their labels; None (the pretrained export): fidelity to float32 only, no gate
    eval_split: str  # what eval_x is, named in the report: "test", "val" or "sample photos"
    holdout_x: Images | None = None  # unlabelled images not used for calibration: fidelity to float32 only
    train_x: Images | None = None  # the training split, for QAT fine-tuning only (streamed)
    train_y: np.ndarray | None = None


@dataclass(kw_only=True)
class Trained:
    """A trained model, what its bundles say about it, and where they go."""

    name: str  # the run's name, in each bundle's metadata
    run_dir: str  # where it came from, in the report
    model_file: Path  # a Keras model (.keras)
    config: dict  # the run's resolved config: input size, channels, model; kept whole in the metadata
    summary: dict  # the run's summary (train.rundir.Summary as a dict): normalization, fingerprint, accuracies
    bundle_files: dict[str, Path]  # where each mode's bundle goes, float32 included
    labels_file: Path  # labels.txt beside the bundles, for label_image-style tools
    report_file: Path


def export_bundles(
    trained: Trained,
    data: QuantizeData,
    *,
    modes: Sequence[str],
    budget: float,
    qat_epochs: int,
    num_threads: int,
    sensitive_steps: float = SENSITIVE_STEPS,
) -> dict:
    """Write a float32 bundle and one bundle per mode, labels.txt and the report, where `trained` says.

    Each bundle is run by serve's Classifier on `data.eval_x` and compared with float32. A quantised bundle
    whose top-1 accuracy drops more than `budget` points below float32 is not written (an older bundle of
    that mode is set aside); the report says so and `report["rejected"]` lists it. `sensitive_steps`: see
    quantize.SENSITIVE_STEPS.
    """
    check_version(tf.__version__)  # before anything is written: embedding the metadata needs a supported release
    if "qat" in modes and (data.train_x is None or data.train_y is None):
        raise QuantizeError(
            f"{trained.run_dir}: mode qat fine-tunes on the training split, and none was given (train_x, train_y)"
        )
    config = trained.config
    model = keras.models.load_model(trained.model_file, compile=False)
    # Bundles take RGB whatever the model trained on (quantize/client_input.py): evaluated on RGB too.
    rgb = {"eval_x": as_rgb(data.eval_x), "calibration": as_rgb(data.calibration)}
    if data.holdout_x is not None:
        rgb["holdout_x"] = as_rgb(data.holdout_x)
    data = dataclasses.replace(data, **rgb)
    base = _base_metadata(trained.name, config, trained.summary, data)
    write_atomic(trained.labels_file, "\n".join(data.class_names) + "\n")

    results: dict[str, dict] = {}
    made: dict[str, tuple[bytes, BundleMetadata, Classifier]] = {}  # mode: (flatbuffer, metadata, its classifier)
    reference = None  # float32's scores, converted first: every bundle is compared with them
    for mode in ["float32"] + [m for m in dict.fromkeys(modes) if m != "float32"]:
        print(f"{mode}: converting", flush=True)
        started = time.time()
        flat = convert(model, mode, data, config, qat_epochs, sensitive_steps)
        convert_seconds = round(time.time() - started, 1)
        metadata = base._replace(quantization=mode)
        classifier = Classifier(embed_metadata(flat, metadata), num_threads=num_threads)
        metrics, scores = evaluate(classifier, data, reference)
        reference = scores if reference is None else reference
        metrics["size_bytes"] = len(flat)
        metrics["convert_seconds"] = convert_seconds
        results[mode] = metrics
        made[mode] = (flat, metadata, classifier)
    # Timed once all exist, in alternating rounds: a noisy machine then slows every bundle alike.
    for mode, timing in compare_latency({mode: made[mode][2] for mode in made}, data.eval_x).items():
        results[mode].update(timing)
    for mode, (flat, metadata, classifier) in made.items():
        gate(results[mode], mode, results["float32"], data, budget)
        if results[mode]["accepted"]:
            path = trained.bundle_files[mode]
            write_bundle(path, mode, flat, metadata, classifier, results)
            results[mode]["bundle"] = str(path)
        else:
            _set_aside_previous(trained.bundle_files[mode])

    report = make_report(trained.run_dir, data, budget, num_threads, sensitive_steps, results)
    write_atomic(trained.report_file, json.dumps(report, indent=2))
    print(format_report(report))
    return report


def _base_metadata(name: str, config: dict, summary: dict, data: QuantizeData) -> BundleMetadata:
    """What every bundle of the run says about itself, before its mode and what its conversion made are known."""
    size, trained_channels = int(config["input_size"]), int(config["channels"])
    return BundleMetadata(
        format=BUNDLE_FORMAT,
        format_version=BUNDLE_FORMAT_VERSION,
        name=name,
        labels=data.class_names,
        input=InputSpec(
            height=size,
            width=size,
            channels=CLIENT_CHANNELS,
            layout="NHWC",
            color="rgb",
            pixel_range=[0, 255],
            batch=1,
            note="batch 1 in the model's signature; serve resizes the input to run batches"
            + (GREY_NOTE if trained_channels == 1 else ""),
        ),
        normalization=Normalization(
            mean=summary["normalization"]["mean"],
            std=summary["normalization"]["std"],
            inside_model=True,
            note="feed raw 0..255 pixels; the model computes (x - mean) / std",
        ),
        preprocessing="serve.preprocess.to_pixels: first frame, EXIF upright, transparency on white, "
        "RGB, whole image resized bilinear to the input size, uint8",
        provenance={
            "run": name,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": public_config(config),
            "data_fingerprint": summary["data_fingerprint"],
            "training": {k: summary[k] for k in ("best_epoch", "epochs", "val_accuracy", "test_accuracy")},
            "versions": {
                **summary["versions"],
                "tensorflow_model_optimization": package_version("tensorflow-model-optimization"),
                "converter": tf.__version__,
            },
        },
    )


def public_config(config: dict) -> dict:
    """The training config as a bundle may show it to anyone: no absolute paths of the training machine.
    The data is named by its folder's name (its fingerprint identifies it)."""
    shown = {key: value for key, value in config.items() if key not in ("data_path", "runs_dir", "cache_dir")}
    if isinstance(shown.get("data"), str) and shown["data"] != "fashion-mnist":
        shown["data"] = Path(shown["data"]).name
    return shown


def convert(
    model, mode: str, data: QuantizeData, config: dict, qat_epochs: int, sensitive_steps: float = SENSITIVE_STEPS
) -> bytes:
    """The TFLite flatbuffer of `model` in `mode` behind the clients' batch-1 RGB input (`data.calibration` is
    RGB); for "qat", of a copy fine-tuned quantisation-aware first (on the training split as it is)."""
    if mode == "qat":
        model = quantization_aware(
            model,
            data.train_x,
            data.train_y,
            qat_epochs,
            int(config["batch_size"]),
            float(config["learning_rate"]) / 10,  # fine-tuning, so a tenth of the training rate
            int(config["seed"]),
        )
    return to_tflite(for_clients(model), mode, data.calibration, sensitive_steps)


def evaluate(classifier: Classifier, data: QuantizeData, reference: dict | None) -> tuple[dict, dict]:
    """Accuracy and per-class precision, recall and F1 (with labels), and fidelity to float32's scores `reference`
    (top-1 agreement, top-5 overlap, probability error; None: this is float32) of one bundle on `data.eval_x`, and
    fidelity on `data.holdout_x` ("held_out") when given. Returns (metrics, scores): scores by image set, "eval"
    and "held_out"."""
    sets = {"eval": data.eval_x} if data.holdout_x is None else {"eval": data.eval_x, "held_out": data.holdout_x}
    scores = {
        name: np.concatenate([classifier.predict(images[i : i + 256]) for i in range(0, len(images), 256)])
        for name, images in sets.items()
    }
    reference = scores if reference is None else reference
    metrics = {"top1": None, "top5": None, **fidelity(scores["eval"], reference["eval"])}
    if data.eval_y is not None:
        report = classification_report(data.eval_y, scores["eval"].argmax(1), data.class_names)
        metrics |= {"top1": report["accuracy"]} | {key: report[key] for key in ("per_class", "macro", "weighted")}
        if scores["eval"].shape[1] > 5:
            metrics["top5"] = top_k_accuracy(data.eval_y, scores["eval"], 5)
    if "held_out" in scores:
        metrics["held_out"] = fidelity(scores["held_out"], reference["held_out"])
    return metrics, scores


def fidelity(scores: np.ndarray, reference: np.ndarray) -> dict:
    """How closely `scores` follow `reference` (float32's), image by image: the share of images whose top-1 agrees,
    the mean share of top-5 classes in common (ties in `scores` broken by class index, as serve does), and the
    largest and mean absolute difference in probability."""
    top5, reference_top5 = ranked(scores, 5), ranked(reference, 5)
    return {
        "agreement": float(np.mean(top5[:, 0] == reference_top5[:, 0])),
        "top5_overlap": float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(top5, reference_top5)])),
        "max_probability_error": float(np.abs(scores - reference).max()),
        "mean_probability_error": float(np.abs(scores - reference).mean()),
    }


def compare_latency(
    classifiers: dict[str, Classifier], images: Images, runs: int = LATENCY_RUNS, rounds: int = LATENCY_ROUNDS
) -> dict[str, dict]:
    """Single-image latency of each classifier over the same images, measured in `rounds` alternating rounds
    (each round times every classifier in turn, the order reversed every other round) so that machine noise
    falls on all alike. Per name: the median of its `runs` timings ("latency_ms") and the lowest and highest
    of its rounds' medians ("latency_spread_ms")."""
    per_round = max(1, runs // rounds)
    pixels = images[:per_round]
    pixels = np.stack([pixels[i % len(pixels)] for i in range(per_round)])
    timings: dict[str, list[list[float]]] = {name: [] for name in classifiers}
    for round_number in range(rounds):
        order = list(classifiers) if round_number % 2 == 0 else list(reversed(classifiers))
        for name in order:
            classifier = classifiers[name]
            classifier.predict(pixels[:1])  # warm again: the others ran in between
            times = []
            for image in pixels:
                started = time.perf_counter()
                classifier.predict(image[None])
                times.append(1000 * (time.perf_counter() - started))
            timings[name].append(times)
    return {
        name: {
            "latency_ms": round(float(np.median(np.concatenate(rounds_))), 4),
            "latency_spread_ms": [round(float(f(np.median(rounds_, axis=1))), 4) for f in (np.min, np.max)],
        }
        for name, rounds_ in timings.items()
    }


def gate(metrics: dict, mode: str, float32: dict, data: QuantizeData, budget: float) -> None:
    """Record in `metrics` the top-1 drop from float32 and whether the bundle is accepted: a quantised bundle
    may lose at most `budget` points; without labels nothing is gated."""
    gated = mode in QUANTIZED_MODES and data.eval_y is not None
    drop = 100 * (float32["top1"] - metrics["top1"]) if gated else 0.0
    metrics["top1_drop_points"] = round(drop, 3)
    metrics["accepted"] = not gated or drop <= budget


def write_bundle(
    path: Path, mode: str, flat: bytes, metadata: BundleMetadata, classifier: Classifier, results: dict
) -> None:
    """Write the accepted bundle: the evaluated model with its input/output spec and its metrics (and
    float32's) added to the metadata, signed again."""
    metadata = metadata._replace(
        input_dtype=classifier.input_dtype.name,
        input_quantization=Quantization(*classifier.input_quantization),
        output_quantization=Quantization(*classifier.output_quantization),
        metrics={"float32": _public(results["float32"]), mode: _public(results[mode])},
    )
    write_atomic(path, embed_metadata(flat, metadata))


def _public(metrics: dict) -> dict:
    keys = ("top1", "top5", "agreement", "top5_overlap", "max_probability_error", "latency_ms", "size_bytes")
    return {k: metrics[k] for k in (*keys, "held_out") if k in metrics}


def _set_aside_previous(bundle: Path) -> None:
    """A bundle of the mode just refused was made from an earlier model: left in place, `pipeline label`
    (newest bundle) could still pick it. Renamed, not deleted, and without the .tflite suffix."""
    if bundle.exists():
        stale = bundle.with_name(bundle.name + ".stale")
        bundle.replace(stale)
        print(f"moved the previous {bundle.name} aside to {stale} (it was made from an earlier model)", flush=True)


def make_report(
    run_dir: str, data: QuantizeData, budget: float, num_threads: int, sensitive_steps: float, results: dict
) -> dict:
    """The report (the run's quantize_report.json): every bundle's metrics, and which modes were rejected."""
    return {
        "run": run_dir,
        "eval_split": data.eval_split,
        "eval_images": len(data.eval_x),
        "held_out_images": 0 if data.holdout_x is None else len(data.holdout_x),
        "calibration_images": len(data.calibration),
        "budget_points": budget,
        "sensitive_steps": sensitive_steps,
        "num_threads": num_threads,
        "latency_rounds": LATENCY_ROUNDS,
        "bundles": results,
        "rejected": [mode for mode, m in results.items() if not m["accepted"]],
    }


def format_report(report: dict) -> str:
    """The printed table: one row per bundle; fidelity columns compare with float32."""
    lines = [
        f"evaluated on {report['eval_images']} {report['eval_split']} images; latency: median of {LATENCY_RUNS} "
        f"single-image runs in {report['latency_rounds']} rounds alternating the bundles (lowest-highest round "
        f"median), {report['num_threads']} thread(s)",
        f"{'bundle':<9} {'size KiB':>9} {'top-1':>7} {'top-5':>7} {'agree':>7} {'top5 ov':>7} {'max dp':>7} "
        f"{'ms/img':>8} {'(spread)':>17}  status",
    ]
    for mode, m in report["bundles"].items():
        top1, top5 = (f"{m[k]:.4f}" if m[k] is not None else "-" for k in ("top1", "top5"))
        if m["accepted"]:
            status = m["bundle"]
        else:
            status = f"REJECTED: top-1 drop {m['top1_drop_points']:.2f} > budget {report['budget_points']} points"
        spread = "({:.4f}-{:.4f})".format(*m["latency_spread_ms"])
        lines.append(
            f"{mode:<9} {m['size_bytes'] / 1024:>9.1f} {top1:>7} {top5:>7} {m['agreement']:>7.4f} "
            f"{m['top5_overlap']:>7.4f} {m['max_probability_error']:>7.4f} {m['latency_ms']:>8.4f} {spread:>17}  "
            f"{status}"
        )
    if report["held_out_images"]:
        lines.append(f"fidelity on {report['held_out_images']} held-out images (not used for calibration):")
        for mode, m in report["bundles"].items():
            held = m["held_out"]
            lines.append(
                f"{mode:<9} {'':>9} {'':>7} {'':>7} {held['agreement']:>7.4f} {held['top5_overlap']:>7.4f} "
                f"{held['max_probability_error']:>7.4f}"
            )
    return "\n".join(lines)
