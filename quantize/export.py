"""From a run directory to bundles: convert, evaluate against float, gate, write metadata, report."""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras
import yaml

from quantize import QUANTIZED_MODES
from quantize.convert import quantization_aware, to_tflite
from quantize.metadata import embed_metadata
from serve import Classifier, PipelineError
from serve.atomic import write_atomic

BUNDLE_FORMAT_VERSION = 1
LATENCY_RUNS = 100


class QuantizeError(PipelineError):
    """A run directory that cannot be quantised."""


@dataclass
class QuantizeData:
    """What quantisation needs from the run's data (loaded by the caller through train's data module)."""

    class_names: list[str]
    calibration: np.ndarray  # uint8 images from the training split
    eval_x: np.ndarray  # held-out images for the accuracy gate
    eval_y: np.ndarray | None  # None for a model without labelled data: fidelity to float32 only
    eval_split: str  # "test" or "val"
    train_x: np.ndarray | None  # for QAT fine-tuning
    train_y: np.ndarray | None


def bundle_path(run: Path, mode: str) -> Path:
    return run / "export" / f"{run.name}_{mode}.tflite"


def export_bundles(
    run: Path, data: QuantizeData, modes: list[str], budget: float, qat_epochs: int, num_threads: int
) -> dict:
    """Write a float32 bundle and one bundle per mode into run/export/, and the report into run/.

    A quantised bundle whose top-1 accuracy drops more than `budget` points below float32 is not
    written; the report says so and `report["rejected"]` lists it.
    """
    config, summary = _read_run(run)
    model = keras.models.load_model(run / "best.keras", compile=False)
    base = _base_metadata(run, config, summary, data)
    write_atomic(run / "export" / "labels.txt", "\n".join(data.class_names) + "\n")

    results: dict[str, dict] = {}
    reference = None
    for mode in ["float32"] + [m for m in dict.fromkeys(modes) if m != "float32"]:
        started = time.time()
        print(f"{mode}: converting", flush=True)
        source = model
        if mode == "qat":
            # Fine-tuning, so a tenth of the training rate.
            source = quantization_aware(
                model,
                data.train_x,
                data.train_y,
                qat_epochs,
                int(config["batch_size"]),
                float(config["learning_rate"]) / 10,
                int(config["seed"]),
            )
        flat = to_tflite(source, mode, data.calibration)
        metadata = {**base, "quantization": mode}
        metrics, scores, io_spec = _evaluate(run, embed_metadata(flat, metadata), data, num_threads, reference)
        if mode == "float32":
            reference = scores
        metrics["size_bytes"] = len(flat)
        metrics["convert_seconds"] = round(time.time() - started, 1)
        results[mode] = metrics
        gated = mode in QUANTIZED_MODES and data.eval_y is not None
        drop = 100 * (results["float32"]["top1"] - metrics["top1"]) if gated else 0.0
        metrics["top1_drop_points"] = round(drop, 3)
        metrics["accepted"] = not gated or drop <= budget
        if metrics["accepted"]:
            metadata.update(io_spec)
            metadata["metrics"] = {"float32": _public(results["float32"]), mode: _public(metrics)}
            write_atomic(bundle_path(run, mode), embed_metadata(flat, metadata))
            metrics["bundle"] = str(bundle_path(run, mode))
        else:
            _set_aside_previous(bundle_path(run, mode))

    report = {
        "run": str(run),
        "eval_split": data.eval_split,
        "eval_images": len(data.eval_x),
        "calibration_images": len(data.calibration),
        "budget_points": budget,
        "num_threads": num_threads,
        "bundles": results,
        "rejected": [mode for mode, m in results.items() if not m["accepted"]],
    }
    write_atomic(run / "quantize_report.json", json.dumps(report, indent=2))
    print(format_report(report))
    return report


def _set_aside_previous(bundle: Path) -> None:
    """A bundle of the mode just refused was made from an earlier model: left in place, `pipeline label`
    (newest bundle) could still pick it. Renamed, not deleted, and without the .tflite suffix."""
    if bundle.exists():
        stale = bundle.with_name(bundle.name + ".stale")
        bundle.replace(stale)
        print(f"moved the previous {bundle.name} aside to {stale} (it was made from an earlier model)", flush=True)


def public_config(config: dict) -> dict:
    """The training config as a bundle may show it to anyone: no absolute paths of the training machine.
    The data is named by its folder's name (its fingerprint identifies it)."""
    shown = {key: value for key, value in config.items() if key not in ("data_path", "runs_dir")}
    if isinstance(shown.get("data"), str) and shown["data"] != "fashion-mnist":
        shown["data"] = Path(shown["data"]).name
    return shown


def _read_run(run: Path) -> tuple[dict, dict]:
    for name in ("config.yaml", "summary.json", "best.keras"):
        if not (run / name).exists():
            raise QuantizeError(f"{run}: no {name}; train it first (pipeline train) or let it finish")
    return yaml.safe_load((run / "config.yaml").read_text()), json.loads((run / "summary.json").read_text())


def _base_metadata(run: Path, config: dict, summary: dict, data: QuantizeData) -> dict:
    size, channels = int(config["input_size"]), int(config["channels"])
    return {
        "format": "edge-pipeline bundle",
        "format_version": BUNDLE_FORMAT_VERSION,
        "name": run.name,
        "labels": data.class_names,
        "input": {
            "height": size,
            "width": size,
            "channels": channels,
            "layout": "NHWC",
            "color": "grayscale" if channels == 1 else "rgb",
            "pixel_range": [0, 255],
        },
        "normalization": {
            **summary["normalization"],
            "inside_model": True,
            "note": "feed raw 0..255 pixels; the model computes (x - mean) / std",
        },
        "preprocessing": "serve.preprocess.to_pixels: first frame, EXIF upright, transparency on white, "
        "grey or RGB, whole image resized bilinear to the input size, uint8",
        "provenance": {
            "run": run.name,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": public_config(config),
            "data_fingerprint": summary["data_fingerprint"],
            "training": {k: summary[k] for k in ("best_epoch", "epochs", "val_accuracy", "test_accuracy")},
            "versions": {
                **summary["versions"],
                "tensorflow_model_optimization": tfmot.__version__,
                "converter": tf.__version__,
            },
        },
    }


def _evaluate(
    run: Path, bundle: bytes, data: QuantizeData, num_threads: int, reference: np.ndarray | None
) -> tuple[dict, np.ndarray, dict]:
    """Accuracy (with labels), fidelity to float32's scores `reference` (top-1 agreement, top-5 overlap,
    probability error) and latency of one bundle, run by serve's Classifier.
    Returns (metrics, scores, input/output spec)."""
    tmp = run / "export" / ".evaluating.tflite"
    write_atomic(tmp, bundle)
    try:
        classifier = Classifier(tmp, num_threads=num_threads)
        latencies = []
        for i in range(LATENCY_RUNS + 5):
            image = data.eval_x[i % len(data.eval_x)][None]
            started = time.perf_counter()
            classifier.predict(image)
            latencies.append(time.perf_counter() - started)
        scores = np.concatenate([classifier.predict(data.eval_x[i : i + 256]) for i in range(0, len(data.eval_x), 256)])
        io_spec = {
            "input_dtype": classifier.input_dtype.name,
            "input_quantization": dict(zip(("scale", "zero_point"), classifier.input_quantization)),
            "output_quantization": dict(zip(("scale", "zero_point"), classifier.output_quantization)),
        }
    finally:
        tmp.unlink(missing_ok=True)
    reference = scores if reference is None else reference
    top5, reference_top5 = np.argsort(-scores, axis=1)[:, :5], np.argsort(-reference, axis=1)[:, :5]
    labelled, five = data.eval_y is not None, scores.shape[1] > 5
    metrics = {
        "top1": float(np.mean(scores.argmax(1) == data.eval_y)) if labelled else None,
        "top5": float(np.mean(np.any(top5 == data.eval_y[:, None], axis=1))) if labelled and five else None,
        "agreement": float(np.mean(scores.argmax(1) == reference.argmax(1))),
        "top5_overlap": float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(top5, reference_top5)])),
        "max_probability_error": float(np.abs(scores - reference).max()),
        "mean_probability_error": float(np.abs(scores - reference).mean()),
        "latency_ms": round(1000 * float(np.median(latencies[5:])), 4),
    }
    return metrics, scores, io_spec


def _public(metrics: dict) -> dict:
    keys = ("top1", "top5", "agreement", "top5_overlap", "max_probability_error", "latency_ms", "size_bytes")
    return {k: metrics[k] for k in keys}


def format_report(report: dict) -> str:
    """The printed table: one row per bundle; fidelity columns compare with float32."""
    lines = [
        f"evaluated on {report['eval_images']} {report['eval_split']} images; latency: median of "
        f"{LATENCY_RUNS} single-image runs, {report['num_threads']} thread(s)",
        f"{'bundle':<9} {'size KiB':>9} {'top-1':>7} {'top-5':>7} {'agree':>7} {'top5 ov':>7} {'max dp':>7} "
        f"{'ms/img':>8}  status",
    ]
    for mode, m in report["bundles"].items():
        top1, top5 = (f"{m[k]:.4f}" if m[k] is not None else "-" for k in ("top1", "top5"))
        if m["accepted"]:
            status = m["bundle"]
        else:
            status = f"REJECTED: top-1 drop {m['top1_drop_points']:.2f} > budget {report['budget_points']} points"
        lines.append(
            f"{mode:<9} {m['size_bytes'] / 1024:>9.1f} {top1:>7} {top5:>7} {m['agreement']:>7.4f} "
            f"{m['top5_overlap']:>7.4f} {m['max_probability_error']:>7.4f} {m['latency_ms']:>8.4f}  {status}"
        )
    return "\n".join(lines)
