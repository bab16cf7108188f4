"""`pipeline label`'s work: image files and folders in, label_image-style lines (or JSON lines) out, in order.

`pipeline label ...` reaches this module without click (see pipeline/cli.py): `parse_label_args` reads the
common command lines itself and leaves help, usage errors and anything unusual to click, which gives the same
answers it always did. It imports no pathlib, and json only for --json.
"""

from __future__ import annotations

import math
import os
import sys
import time

from serve.bundle import MAX_NUM_THREADS
from serve.errors import PipelineError

# More images than this, with stderr a terminal: a progress line on stderr.
PROGRESS_AFTER = 50
# Images the model runs at once; also how many results are written to stdout in one go.
BATCH_SIZE = 64


def default_jobs() -> int:
    """Decoding threads: one per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _int_at_least_one(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 1 else None


def _num_threads(text: str) -> int | None:
    value = _int_at_least_one(text)
    return value if value is not None and value <= MAX_NUM_THREADS else None


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _positive_finite(text: str) -> float | None:
    value = _finite(text)
    return value if value is not None and value > 0 else None


# The options of `label` (pipeline/commands.py declares the same ones to click): keyword and conversion. A
# conversion returns None for a value click refuses, so that click can say why.
_VALUE_OPTIONS = {
    "-i": ("more_images", str),
    "--image": ("more_images", str),
    "-m": ("model_file", str),
    "--model_file": ("model_file", str),
    "-l": ("label_file", str),
    "--label_file": ("label_file", str),
    "-k": ("top_k", _int_at_least_one),
    "--top_k": ("top_k", _int_at_least_one),
    "--input_mean": ("input_mean", _finite),
    "--input_std": ("input_std", _positive_finite),
    "--num_threads": ("num_threads", _num_threads),
    "-j": ("jobs", _int_at_least_one),
    "--jobs": ("jobs", _int_at_least_one),
}
_FLAGS = {"--ignore-checksum": "ignore_checksum", "--json": "as_json"}


def parse_label_args(args: list[str]) -> dict | None:
    """`label_images`'s keyword arguments from `pipeline label`'s arguments, or None where click must answer:
    help, no image, an unknown option, a value out of range or any spelling this reader does not know."""
    options: dict = {"model_file": None, "label_file": None, "top_k": 5, "input_mean": None, "input_std": None}
    options |= {"num_threads": None, "jobs": None, "ignore_checksum": False, "as_json": False}
    images: list[str] = []
    more_images: list[str] = []
    rest = iter(args)
    for arg in rest:
        if arg == "--":
            images.extend(rest)
            break
        if arg == "-" or not arg.startswith("-"):
            images.append(arg)
            continue
        if arg in _FLAGS:
            options[_FLAGS[arg]] = True
            continue
        name, has_value, value = arg.partition("=") if arg.startswith("--") else (arg[:2], len(arg) > 2, arg[2:])
        if name not in _VALUE_OPTIONS:
            return None
        if not has_value:
            value = next(rest, None)
            if value is None:
                return None
        keyword, convert = _VALUE_OPTIONS[name]
        converted = convert(value)
        if converted is None:
            return None
        if keyword == "more_images":
            more_images.append(converted)
        else:
            options[keyword] = converted
    if not images and not more_images:
        return None
    return {"images": images + more_images, **options}


def newest_bundle(runs_dir: str = "runs") -> str:
    """The most recently written bundle under runs/*/export/ (glob skips the hidden temp files; links to
    nothing, folders and other special files are skipped too)."""
    import glob
    import stat

    found = []
    for path in glob.glob(os.path.join(runs_dir, "*", "export", "*.tflite")):
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
    model_file: str | None = None,
    label_file: str | None = None,
    top_k: int = 5,
    input_mean: float | None = None,
    input_std: float | None = None,
    num_threads: int | None = None,
    jobs: int | None = None,
    ignore_checksum: bool = False,
    as_json: bool = False,
) -> int:
    """Label image files and folders of them (expanded in place, sorted), printing results in input order.

    An image or folder that cannot be used is one `Error:` line on stderr (with --json, a line with an "error")
    and the others are still labelled; returns the exit code: 1 when anything failed, else 0.
    """
    from pipeline.output import printable
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
