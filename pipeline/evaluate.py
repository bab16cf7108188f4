"""`pipeline evaluate`'s work: how good are these bundles on a folder of labelled images (one sub-folder per class)?

Runs with the serving install alone (numpy, Pillow, ai-edge-litert). Images are decoded as pipeline label decodes
them (serve's to_pixels; the next batches decoded while the bundles run this one, here by processes), once per
input size however many bundles take it; the metrics are serve/metrics.py's, and the confusion matrices are drawn
as training draws its own (train/plots.py, Pillow).
"""

from __future__ import annotations

import os
import re
import sys
from typing import NamedTuple

from pipeline.label import BATCH_SIZE, LABEL_OPTIONS, Option, Progress, default_jobs, image_files, newest_bundle
from pipeline.output import printable
from serve.errors import PipelineError

TOP_K = 5
# How many skipped files and folders the text output names; --json and evaluation.json name them all.
NAMED_SKIPPED = 5

EVALUATE_OPTIONS = (
    Option(
        ("-m", "--model_file"),
        "model_files",
        str,
        "A .tflite bundle; repeat to compare several on the same images. Default: the newest bundle under runs/.",
        multiple=True,
    ),
    Option(
        ("--out",),
        "out",
        str,
        "Folder for evaluation.json and the confusion matrices (PNG). Default: runs/evaluate/<FOLDER's name>.",
    ),
    Option(
        ("--worst",),
        "worst",
        int,
        "How many of the most confused pairs and of the worst-scored images to list.",
        default=10,
        minimum=0,
    ),
    *(option for option in LABEL_OPTIONS if option.keyword in ("num_threads", "ignore_checksum")),
    Option(
        ("-j", "--jobs"),
        "jobs",
        int,
        "Processes decoding images (threads where the system cannot fork); 2 or more also overlap decoding with the "
        "bundles. Default: one per core.",
        minimum=1,
    ),
    Option(("--json",), "as_json", bool, "Print one JSON object (what evaluation.json holds) instead.", default=False),
)


class Samples(NamedTuple):
    """The images of a class folder tree: paths, their true class indices, and what was left out."""

    paths: list[str]
    labels: list[int]
    unknown_folders: list[str]  # class folders whose names are none of the labels
    loose_images: list[str]  # images directly in the folder, in no class folder
    unusable: list[dict]  # {"path", "error"}: folders that cannot be read or hold no image; images that fail


def label_key(name: str) -> str:
    """A class name as folder names spell it: case, spaces and punctuation aside ("T-shirt/top" is t_shirt_top)."""
    return "_".join(re.findall(r"[^\W_]+", name.casefold()))


def class_samples(folder: str, labels: list[str]) -> Samples:
    """The images under each sub-folder of `folder` (at any depth) whose name is one of `labels`, exactly or
    as label_key spells it (where that names one label only)."""
    keys: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        keys.setdefault(label_key(label), []).append(index)
    by_name = {label: index for index, label in enumerate(labels)}
    by_name |= {key: found[0] for key, found in keys.items() if len(found) == 1 and key not in by_name}
    try:
        entries = sorted((entry.name, entry.is_dir()) for entry in os.scandir(folder) if not entry.name.startswith("."))
    except FileNotFoundError:
        raise PipelineError(f"{folder}: no such folder") from None
    except NotADirectoryError:
        raise PipelineError(f"{folder}: not a folder (want one sub-folder of images per class)") from None
    except OSError as err:
        raise PipelineError(f"{folder}: cannot read the folder ({err.strerror})") from None
    from serve.preprocess import IMAGE_EXTENSIONS

    samples = Samples([], [], [], [], [])
    for name, is_dir in entries:
        path = os.path.join(folder, name)
        if not is_dir:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                samples.loose_images.append(path)
            continue
        index = by_name.get(name, by_name.get(label_key(name)))
        if index is None:
            samples.unknown_folders.append(path)
            continue
        try:
            found = image_files(path)
        except PipelineError as err:
            samples.unusable.append({"path": path, "error": str(err)})
            continue
        samples.paths.extend(found)
        samples.labels.extend([index] * len(found))
    return samples


class Ranked(NamedTuple):
    """One bundle's results on the usable images: the top classes of each, best first, their scores, and the
    score of the true class."""

    top: object  # np.ndarray (N, k) of class indices
    top_scores: object  # np.ndarray (N, k)
    true_scores: object  # np.ndarray (N,)


def run_bundles(classifiers: list, paths: list[str], labels: list[int], jobs: int) -> tuple[list[Ranked], dict]:
    """Each classifier's Ranked on the images of `paths` that every one of them could use, and the ImageError of
    each that could not be used, by its index in `paths`. Images are decoded once per input shape, in batches,
    by `jobs` processes (decoded_chunks) while the bundles run the batch before."""
    import math

    import numpy as np

    from serve.classifier import BATCH_BYTES
    from serve.metrics import ranked

    count, k = len(paths), min(TOP_K, classifiers[0].num_classes)
    truth = np.asarray(labels, dtype=np.int64)
    top = [np.zeros((count, k), np.int64) for _ in classifiers]
    top_scores = [np.zeros((count, k), np.float32) for _ in classifiers]
    true_scores = [np.zeros(count, np.float32) for _ in classifiers]
    errors: dict[int, PipelineError] = {}
    shapes: dict[tuple[int, int, int], list[int]] = {}
    for i, classifier in enumerate(classifiers):
        shapes.setdefault((classifier.height, classifier.width, classifier.channels), []).append(i)
    progress = Progress(count * len(shapes))
    for shape, group in shapes.items():
        batch_size = max(1, min(BATCH_SIZE, BATCH_BYTES // math.prod(shape)))
        chunk_size = max(1, min(batch_size, math.ceil(count / jobs)))
        start = 0
        for size, pixels, failed in decoded_chunks(paths, shape, jobs, chunk_size):
            at = [start + j for j in range(size) if j not in failed]
            errors.update((start + j, error) for j, error in failed.items())
            if at:
                for i in group:
                    scores = classifiers[i].predict(pixels)
                    best = ranked(scores, k)
                    top[i][at] = best
                    top_scores[i][at] = np.take_along_axis(scores, best, 1)
                    true_scores[i][at] = scores[np.arange(len(at)), truth[at]]
            for _ in range(size):
                progress.advance()
            start += size
    progress.clear()
    usable = np.setdiff1d(np.arange(count), list(errors))
    results = [Ranked(t[usable], s[usable], r[usable]) for t, s, r in zip(top, top_scores, true_scores)]
    return results, errors


def decoded_chunks(paths: list[str], shape: tuple[int, int, int], jobs: int, chunk_size: int):
    """serve's `to_pixels` of every path, `chunk_size` at a time, in order, each chunk as `stacked` gives it.

    With `jobs` > 1, that many forked processes decode, where pipeline label decodes in threads: a small image (a
    28x28 PNG) spends most of its decoding in Python around Pillow's decoder, under the GIL, which threads take
    turns for (benchmarks/evaluate_bench.py measures it). Forked, they start at once, with serve imported; at most
    two chunks per process are decoded ahead of the bundles. Threads decode where the platform cannot fork, and
    one chunk's worth of images needs no process of its own."""
    import multiprocessing

    from serve.preprocess import in_order, pixels_in_chunks

    if jobs <= 1 or len(paths) <= chunk_size or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(stacked, pixels_in_chunks(paths, *shape, jobs=jobs, chunk_size=chunk_size))
        return
    import signal
    from concurrent.futures import ProcessPoolExecutor

    tasks = ((paths[start : start + chunk_size], shape) for start in range(0, len(paths), chunk_size))
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_ignore_interrupts)
    try:
        # The pool forks its processes at its first task. Forked with SIGINT blocked, a Ctrl-C (sent to the whole
        # process group) cannot interrupt one before _ignore_interrupts has run; here it waits the few ms.
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            pool.submit(int).result()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
        yield from in_order(pool, _decode_chunk, tasks, ahead=2 * jobs)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ignore_interrupts() -> None:
    """In a decoding process: Ctrl-C is for the parent, which ends the pool, not a traceback from each process.
    Ignoring SIGINT drops one that came while it was blocked (see decoded_chunks); then it is unblocked."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _decode_chunk(task: tuple[list[str], tuple[int, int, int]]) -> tuple:
    """One chunk of decoded_chunks (its paths, and the input's shape), in a decoding process: stacked there, it
    comes back as one array, which costs the parent far less to receive than an array per image."""
    from serve.preprocess import pixels_in_chunks

    paths, shape = task
    return stacked(next(pixels_in_chunks(paths, *shape, chunk_size=len(paths))))


def stacked(chunk: list) -> tuple:
    """A chunk of pixels_in_chunks as (its length, the usable images' pixels in one array (None if there are
    none), {position in the chunk: the ImageError} of the others)."""
    import numpy as np

    failed = {j: item for j, item in enumerate(chunk) if isinstance(item, PipelineError)}
    usable = [item for item in chunk if not isinstance(item, PipelineError)]
    return len(chunk), np.stack(usable) if usable else None, failed


def bundle_report(ranked: Ranked, truth, paths: list[str], names: list[str], worst: int) -> dict:
    """One bundle's figures: top-1 and top-5, serve/metrics.py's report, the confusion matrix over the classes in
    the report, the `worst` most confused pairs and the `worst` images scored lowest for their true class."""
    import numpy as np

    from serve.files import shown
    from serve.metrics import classification_report, confusion_matrix

    predicted = ranked.top[:, 0]
    report = classification_report(truth, predicted, names)
    classes = [names.index(name) for name in report["per_class"]]
    matrix = confusion_matrix(truth, predicted, len(names))[np.ix_(classes, classes)]
    off_diagonal = matrix - np.diag(np.diag(matrix))
    order = np.argsort(-off_diagonal, axis=None, kind="stable")[:worst]
    pairs = []
    for row, column in zip(*np.unravel_index(order, matrix.shape)):
        if off_diagonal[row, column]:
            pairs.append(
                {
                    "true": names[classes[row]],
                    "predicted": names[classes[column]],
                    "count": int(matrix[row, column]),
                    "share": float(matrix[row, column] / matrix[row].sum()),
                }
            )
    lowest = np.argsort(ranked.true_scores, kind="stable")[:worst]
    return {
        "top1": report["accuracy"],
        # As the quantize report: with 5 classes or fewer, every image is right in its top 5.
        "top5": float(np.mean(np.any(ranked.top == truth[:, None], axis=1))) if len(names) > TOP_K else None,
        "per_class": report["per_class"],
        "macro": report["macro"],
        "weighted": report["weighted"],
        "confusion_matrix": {"classes": [names[c] for c in classes], "matrix": matrix.tolist()},
        "confused_pairs": pairs,
        "worst_scored": [
            {
                "image": shown(paths[i]),
                "label": names[truth[i]],
                "score": float(ranked.true_scores[i]),
                "predicted": names[ranked.top[i, 0]],
                "predicted_score": float(ranked.top_scores[i, 0]),
            }
            for i in lowest.tolist()
        ],
    }


def bundle_names(model_files: list[str]) -> list[str]:
    """What the output calls each bundle: its file name without .tflite, or its path where two names clash."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in model_files]
    return stems if len(set(stems)) == len(stems) else list(model_files)


def evaluate_folder(
    folder: str,
    *,
    model_files: list[str],
    out: str | None,
    worst: int,
    num_threads: int | None,
    jobs: int | None,
    ignore_checksum: bool,
    as_json: bool,
) -> int:
    """Evaluate each bundle of `model_files` (default: the newest under runs/) on the class folders of `folder`;
    print the figures (text or one JSON object), write evaluation.json and a confusion matrix PNG per bundle
    to `out`. Returns the exit code, 0: what could not be used is reported, not a failure."""
    import json
    from pathlib import Path

    import numpy as np

    from serve import Classifier
    from serve.files import shown, write_atomic
    from train.plots import plot_confusion

    model_files = list(model_files) or [newest_bundle()]
    if len(set(model_files)) != len(model_files):
        raise PipelineError(f"{model_files[0]}: the same bundle given twice")
    classifiers = [
        Classifier(path, num_threads=num_threads, verify_checksum=not ignore_checksum) for path in model_files
    ]
    names = list(classifiers[0].labels)
    for classifier in classifiers[1:]:
        if list(classifier.labels) != names:
            raise PipelineError(
                f"{classifier.model_path}: its labels differ from {classifiers[0].model_path}'s; "
                "bundles compared side by side must share their labels"
            )
    samples = class_samples(folder, names)
    ranked, errors = run_bundles(classifiers, samples.paths, samples.labels, jobs or default_jobs())
    unusable = samples.unusable + [{"path": samples.paths[i], "error": str(err)} for i, err in sorted(errors.items())]
    usable = [i for i in range(len(samples.paths)) if i not in errors]
    if not usable:
        raise PipelineError(f"{folder}: {_nothing_usable(samples, errors, names)}")
    paths = [samples.paths[i] for i in usable]
    truth = np.asarray(samples.labels, dtype=np.int64)[usable]
    out = out or os.path.join("runs", "evaluate", os.path.basename(os.path.abspath(folder)))
    json_file = os.path.join(out, "evaluation.json")

    shown_names = bundle_names(model_files)
    bundles = {}
    for name, classifier, result in zip(shown_names, classifiers, ranked):
        report = bundle_report(result, truth, paths, names, worst)
        png = os.path.join(out, f"confusion_{_file_name(name)}.png")
        confusion = report["confusion_matrix"]
        plot_confusion(np.array(confusion["matrix"]), confusion["classes"], Path(png), f"{name}, {len(paths)} images")
        bundles[name] = {"model": shown(classifier.model_path), **report, "confusion_png": shown(png)}
    agreement = [
        {
            "bundles": [shown_names[a], shown_names[b]],
            "top1_agreement": float(np.mean(ranked[a].top[:, 0] == ranked[b].top[:, 0])),
            "differ": int(np.sum(ranked[a].top[:, 0] != ranked[b].top[:, 0])),
        }
        for a in range(len(ranked))
        for b in range(a + 1, len(ranked))
    ]
    evaluation = {
        "folder": shown(folder),
        "images": len(paths),
        "classes": [names[i] for i in np.unique(truth).tolist()],
        "skipped": {
            "unknown_folders": [shown(path) for path in samples.unknown_folders],
            "loose_images": [shown(path) for path in samples.loose_images],
            "unusable": [{"path": shown(item["path"]), "error": shown(item["error"])} for item in unusable],
        },
        "bundles": bundles,
        "agreement": agreement,
        "json": shown(json_file),
    }
    write_atomic(json_file, json.dumps(evaluation, indent=2) + "\n")
    sys.stdout.write(json.dumps(evaluation) + "\n" if as_json else format_evaluation(evaluation, names, worst))
    return 0


def _nothing_usable(samples: Samples, errors: dict, names: list[str]) -> str:
    """Why no image could be used, in a few words (`errors`: each image's ImageError, by its index)."""
    if samples.paths:
        return f"none of its {len(samples.paths)} images could be used (first: {errors[min(errors)]})"
    if samples.unknown_folders:
        return (
            f"no sub-folder is named after one of the bundle's {len(names)} labels "
            f"(found {', '.join(os.path.basename(p) for p in samples.unknown_folders[:NAMED_SKIPPED])}; "
            f"labels: {', '.join(names[:NAMED_SKIPPED])}{', ...' if len(names) > NAMED_SKIPPED else ''})"
        )
    return "no images in class sub-folders (want one sub-folder of images per class, named after its label)"


def _file_name(name: str) -> str:
    """A bundle's shown name as a file name: a path's separators and dots as underscores."""
    return re.sub(r"[^\w-]+", "_", name).strip("_") or "bundle"


def format_evaluation(evaluation: dict, labels: list[str], worst: int) -> str:
    """The printed report (`labels`: the bundles' labels): the bundles side by side, then each bundle's confusions
    and worst images."""
    bundles = evaluation["bundles"]
    names = list(bundles)
    shown_names = [printable(name) for name in names]
    first = bundles[names[0]]
    lines = [
        f"{evaluation['images']} images of {len(evaluation['classes'])} classes in {printable(evaluation['folder'])}",
        "",
    ]
    width = max(12, *map(len, shown_names))
    name_width = max(12, *(len(printable(c)) for n in names for c in bundles[n]["per_class"]))
    lines.append(f"{'':<{name_width}}  " + "  ".join(f"{name:>{width}}" for name in shown_names))
    for key, title in (("top1", "top-1"), ("top5", "top-5")):
        values = [bundles[name][key] for name in names]
        if values[0] is not None:
            lines.append(f"{title:<{name_width}}  " + "  ".join(f"{v:>{width}.4f}" for v in values))
    for key in ("macro", "weighted"):
        lines.append(
            f"{key + ' F1':<{name_width}}  " + "  ".join(f"{bundles[n][key]['f1']:>{width}.4f}" for n in names)
        )
    for pair in evaluation["agreement"]:
        a, b = pair["bundles"]
        lines.append(f"top-1 agreement, {a} and {b}: {pair['top1_agreement']:.4f} ({pair['differ']} images differ)")
    lines.append("")

    group = "  precision  recall      f1"
    if len(names) > 1:
        span = len(group) - 2
        lines.append(f"{'':<{name_width}}  {'':>7}" + "".join(f"  {name[:span]:^{span}}" for name in shown_names))
    lines.append(f"{'class':<{name_width}}  {'support':>7}" + group * len(names))
    # Every class some bundle reports: one found only in another bundle's predictions has no row in this one's.
    reported = {c: bundles[n]["per_class"][c]["support"] for n in names for c in bundles[n]["per_class"]}
    rows = [
        (printable(c), reported[c], [bundles[n]["per_class"].get(c) for n in names]) for c in labels if c in reported
    ]
    rows += [(f"{key} avg", first[key]["support"], [bundles[n][key] for n in names]) for key in ("macro", "weighted")]
    for title, support, figures in rows:
        cells = ""
        for row in figures:
            if row is None:  # a class only another bundle predicted
                cells += f"  {'-':>9}  {'-':>6}  {'-':>6}"
            else:
                cells += f"  {row['precision']:>9.4f}  {row['recall']:>6.4f}  {row['f1']:>6.4f}"
        lines.append(f"{title:<{name_width}}  {support:>7}{cells}")

    for name, shown_name in zip(names, shown_names):
        bundle = bundles[name]
        heading = f"{shown_name}: " if len(names) > 1 else ""
        if worst and bundle["confused_pairs"]:
            lines += ["", f"{heading}most confused, true -> predicted (share of the true class):"]
            for pair in bundle["confused_pairs"]:
                what = f"{printable(pair['true'])} -> {printable(pair['predicted'])}"
                lines.append(f"  {what:<{2 * name_width}}  {pair['count']:>6}  {100 * pair['share']:5.1f}%")
        if worst:
            lines += ["", f"{heading}worst-scored images, score of the true class:"]
            for item in bundle["worst_scored"]:
                lines.append(
                    f"  {printable(item['image'])}  {printable(item['label'])} {item['score']:.4f}, "
                    f"predicted {printable(item['predicted'])} {item['predicted_score']:.4f}"
                )
    lines += ["", *_skipped_lines(evaluation["skipped"])]
    files = [bundles[name]["confusion_png"] for name in names] + [evaluation["json"]]
    lines.append(f"wrote {', '.join(printable(path) for path in files)}")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _skipped_lines(skipped: dict) -> list[str]:
    """What was left out, counted, with the first few named."""

    def named(paths: list[str]) -> str:
        more = f", and {len(paths) - NAMED_SKIPPED} more" if len(paths) > NAMED_SKIPPED else ""
        return ", ".join(printable(p) for p in paths[:NAMED_SKIPPED]) + more

    lines = []
    if skipped["unknown_folders"]:
        count = len(skipped["unknown_folders"])
        lines.append(f"skipped {count} folder(s) not named after a label: {named(skipped['unknown_folders'])}")
    if skipped["loose_images"]:
        count = len(skipped["loose_images"])
        lines.append(f"skipped {count} image(s) outside the class folders: {named(skipped['loose_images'])}")
    if skipped["unusable"]:
        lines.append(f"skipped {len(skipped['unusable'])} that could not be used:")
        lines += [f"  {printable(item['error'])}" for item in skipped["unusable"][:NAMED_SKIPPED]]
        if len(skipped["unusable"]) > NAMED_SKIPPED:
            lines.append(f"  and {len(skipped['unusable']) - NAMED_SKIPPED} more (evaluation.json names them all)")
    return lines
