"""`pipeline label`'s work: image files and folders in, label_image-style lines (or JSON lines) out, in order.

The options are defined once, in LABEL_OPTIONS: pipeline/commands.py makes click's options from it, and
`parse_label_args` reads the common command lines with it, without click (see pipeline/cli.py), leaving help,
usage errors and anything unusual to click. This module imports no pathlib, and json only for --json.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import NamedTuple

from pipeline.output import printable
from serve.bundle import MAX_NUM_THREADS
from serve.errors import PipelineError

# More images than this, with stderr a terminal: a progress line on stderr.
PROGRESS_AFTER = 50
# Images the model runs at once; also how many results are written to stdout in one go.
BATCH_SIZE = 64


def default_jobs() -> int:
    """Decoding threads: one per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Option(NamedTuple):
    """One option of `pipeline label`: the one definition from which pipeline/commands.py makes click's option and
    `parse_label_args` its plain reader. Numbers must be finite and within the bounds given."""

    flags: tuple[str, ...]
    keyword: str
    type: type  # str, int or float; bool for a flag, which takes no value
    help: str
    default: object = None
    minimum: float | None = None
    minimum_open: bool = False  # the minimum itself is refused
    maximum: float | None = None
    multiple: bool = False


MODEL_FILE = Option(
    ("-m", "--model_file"), "model_file", str, "A .tflite bundle. Default: the newest bundle under runs/."
)
LABEL_OPTIONS = (
    Option(("-i", "--image"), "more_images", str, "An image to label (label_image's flag).", multiple=True),
    MODEL_FILE,
    Option(
        ("-l", "--label_file"),
        "label_file",
        str,
        "Labels, one per line. Default: the bundle's own, else labels.txt beside the model.",
    ),
    Option(("-k", "--top_k"), "top_k", int, "How many labels to print per image.", default=5, minimum=1),
    Option(("--input_mean",), "input_mean", float, "Float models: subtract this from pixels (bundles: 0)."),
    Option(
        ("--input_std",),
        "input_std",
        float,
        "Float models: divide pixels by this, > 0 (bundles: 1).",
        minimum=0,
        minimum_open=True,
    ),
    Option(
        ("--num_threads",),
        "num_threads",
        int,
        "Interpreter threads (at most 4 per core).",
        minimum=1,
        maximum=MAX_NUM_THREADS,
    ),
    Option(
        ("-j", "--jobs"),
        "jobs",
        int,
        "Threads decoding images; 2 or more also overlap decoding with the model. Default: one per core.",
        minimum=1,
    ),
    Option(
        ("--ignore-checksum",),
        "ignore_checksum",
        bool,
        "Load a bundle even if its checksum does not match (a bundle another tool changed on purpose).",
        default=False,
    ),
    Option(("--json",), "as_json", bool, "Print JSON lines, one per image, instead.", default=False),
)
_BY_FLAG = {flag: option for option in LABEL_OPTIONS for flag in option.flags}


def _value(option: Option, text: str) -> object | None:
    """`text` as `option`'s value, or None where click refuses it (and says why)."""
    try:
        value = option.type(text)
    except ValueError:
        return None
    if option.type is float:
        if not math.isfinite(value):
            return None
        value += 0.0  # -0 reads as 0, as click's option does
    if option.minimum is not None and (value < option.minimum or (option.minimum_open and value == option.minimum)):
        return None
    if option.maximum is not None and value > option.maximum:
        return None
    return value


def parse_label_args(args: list[str]) -> dict | None:
    """`label_images`'s keyword arguments from `pipeline label`'s arguments, or None where click must answer:
    help, no image, an unknown option, a value out of range or any spelling this reader does not know."""
    options = {option.keyword: [] if option.multiple else option.default for option in LABEL_OPTIONS}
    images: list[str] = []
    rest = iter(args)
    for arg in rest:
        if arg == "--":
            images.extend(rest)
            break
        if arg == "-" or not arg.startswith("-"):
            images.append(arg)
            continue
        name, has_value, text = arg.partition("=") if arg.startswith("--") else (arg[:2], len(arg) > 2, arg[2:])
        option = _BY_FLAG.get(name)
        if option is None or (option.type is bool and has_value):
            return None
        if option.type is bool:
            options[option.keyword] = True
            continue
        if not has_value:
            text = next(rest, None)
            if text is None:
                return None
        value = _value(option, text)
        if value is None:
            return None
        if option.multiple:
            options[option.keyword].append(value)
        else:
            options[option.keyword] = value
    images += options.pop("more_images")
    return {"images": images, **options} if images else None


# Where RunDir.bundle() puts bundles, as a glob under runs_dir. The one run path spelled outside train/rundir.py
# (tests/test_layout.py checks the two agree): importing train.rundir (YAML, dataclasses, pathlib) would cost a
# cold `pipeline label` more than its whole margin over a bare LiteRT script.
BUNDLES_IN_RUNS = "*/export/*.tflite"


def newest_bundle(runs_dir: str = "runs") -> str:
    """The most recently written bundle under runs/*/export/ (glob skips the hidden temp files; links to
    nothing, folders and other special files are skipped too)."""
    import glob
    import stat

    found = []
    for path in glob.glob(os.path.join(runs_dir, BUNDLES_IN_RUNS)):
        try:
            info = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode):
            found.append((info.st_mtime, path))
    if not found:
        raise PipelineError(f"{runs_dir}: no bundle found; run pipeline quantize first, or pass -m model.tflite")
    return max(found)[1]


def image_files(folder: str) -> list[str]:
    """The image files under `folder`, at any depth, sorted by path; hidden files and folders are skipped.
    Raises PipelineError when it cannot be read or holds no image."""
    from serve.preprocess import IMAGE_EXTENSIONS

    found = []
    failures: list[OSError] = []
    for directory, subfolders, names in os.walk(folder, onerror=failures.append):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [
            os.path.join(directory, name)
            for name in names
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        ]
    if failures:
        raise PipelineError(f"{failures[0].filename}: cannot read the folder ({failures[0].strerror})")
    if not found:
        extensions = ", ".join(sorted(ext[1:] for ext in IMAGE_EXTENSIONS))
        raise PipelineError(f"{folder}: no image files in this folder ({extensions})")
    return sorted(found)


class Progress:
    """A `done/total images, rate/s` line on stderr, redrawn at most ten times a second; moved out of the way of
    other output to the same terminal."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.width = total, 0, 0
        self.shown = total > PROGRESS_AFTER and sys.stderr is not None and sys.stderr.isatty()
        self.shares_terminal = self.shown and sys.stdout.isatty()
        self.started = self.drawn_at = time.perf_counter()

    def advance(self) -> None:
        self.done += 1
        now = time.perf_counter()
        if self.shown and (now - self.drawn_at >= 0.1 or self.done == self.total):
            self.drawn_at = now
            text = f"{self.done}/{self.total} images, {self.done / max(now - self.started, 1e-9):.0f}/s"
            sys.stderr.write(f"\r{text}{' ' * max(self.width - len(text), 0)}")
            sys.stderr.flush()
            self.width = len(text)

    def clear(self) -> None:
        if self.width:
            sys.stderr.write(f"\r{' ' * self.width}\r")
            sys.stderr.flush()
            self.width = 0


def label_images(
    images: list[str],
    *,
    model_file: str | None,
    label_file: str | None,
    top_k: int,
    input_mean: float | None,
    input_std: float | None,
    num_threads: int | None,
    jobs: int | None,
    ignore_checksum: bool,
    as_json: bool,
) -> int:
    """Label image files and folders of them (expanded in place, sorted), printing results in input order.

    An image or folder that cannot be used is one `Error:` line on stderr (with --json, a line with an "error")
    and the others are still labelled; returns the exit code: 1 when anything failed, else 0.
    """
    from serve import Classifier
    from serve.files import shown

    inputs: list[tuple[str, PipelineError | None]] = []  # (image or folder, why it cannot be used)
    for name in images:
        if os.path.isdir(name):
            try:
                inputs += [(path, None) for path in image_files(name)]
            except PipelineError as err:
                inputs.append((name, err))
        else:
            inputs.append((name, None))
    paths = [name for name, problem in inputs if problem is None]
    classifier = Classifier(
        model_file or newest_bundle(),
        label_file,
        num_threads,
        input_mean,
        input_std,
        verify_checksum=not ignore_checksum,
    )
    labels = [printable(label) for label in classifier.labels]
    with_names = len(inputs) > 1 or any(os.path.isdir(name) for name in images)
    if as_json:
        import json

        model = shown(classifier.model_path)
    results = classifier.classify_many(paths, top_k, jobs=jobs or default_jobs(), batch_size=BATCH_SIZE)
    progress = Progress(len(paths))
    lines: list[str] = []
    failed = 0
    for name, problem in inputs:
        result = problem or next(results)
        if isinstance(result, PipelineError):
            failed += 1
            if as_json:
                record = {"image": shown(name), "model": model, "error": shown(str(result))}
                lines.append(json.dumps(record) + "\n")
            else:
                _write(lines, progress)
                progress.clear()
                sys.stderr.write(f"Error: {printable(str(result))}\n")
        elif as_json:
            record = {"image": shown(name), "model": model, "predictions": [p._asdict() for p in result]}
            lines.append(json.dumps(record) + "\n")
        else:
            if with_names:
                lines.append(f"{printable(name)}:\n")
            lines += [f"{labels[p.index]} ({p.index}): {p.score:.6f}\n" for p in result]
        if problem is None:
            progress.advance()
        if len(lines) >= 4 * BATCH_SIZE:
            _write(lines, progress)
    _write(lines, progress)
    progress.clear()
    return 1 if failed else 0


def _write(lines: list[str], progress: Progress) -> None:
    """Write and empty `lines` on stdout, in one write, with the progress line out of the way."""
    if lines:
        if progress.shares_terminal:
            progress.clear()
        sys.stdout.write("".join(lines))
        sys.stdout.flush()
        lines.clear()
