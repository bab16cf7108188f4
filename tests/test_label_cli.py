"""`pipeline label` on many images: folders, parallel decoding, batches, order, JSON lines, progress, start-up."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from pipeline.label import parse_label_args
from serve import Classifier, ImageError
from serve.bundle import read_bundle_metadata, read_model_file
from tests.conftest import PIPELINE, ROOT
from tests.test_serve import LINE, resigned, run_label


def blocks(stdout: str) -> list[tuple[str, list[str]]]:
    """(image, its label lines) from label_image-style output with `image:` headers, in output order."""
    found: list[tuple[str, list[str]]] = []
    for line in stdout.splitlines():
        if LINE.match(line):
            found[-1][1].append(line)
        else:
            assert line.endswith(":"), line
            found.append((line[:-1], []))
    return found


def images_in(stdout: str) -> list[str]:
    return [image for image, _ in blocks(stdout)]


@pytest.fixture
def photo_tree(tmp_path, fmnist_images) -> tuple[Path, list[Path]]:
    """A folder of the ten images at several depths, with files and folders that must be left out; and the
    image files in the order `pipeline label` must take them."""
    root = tmp_path / "tree"
    wanted = [
        root / "z.png",
        root / "a" / "y.png",
        root / "b" / "x.png",
        root / "b" / "deeper" / "w.PNG",
        root / "a" / "v.png",
    ]
    for path, image in zip(wanted, fmnist_images):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, path)
    (root / "notes.txt").write_text("not an image\n")
    (root / ".hidden").mkdir()
    shutil.copy(fmnist_images[5], root / ".hidden" / "q.png")
    shutil.copy(fmnist_images[6], root / ".dot.png")
    return root, sorted(wanted, key=str)


def test_a_folder_is_every_image_in_it_at_any_depth_sorted(bundles, photo_tree):
    root, wanted = photo_tree
    result = run_label(root, "-m", bundles["int8"], "-k", "2")
    assert result.returncode == 0 and result.stderr == ""
    found = dict(blocks(result.stdout))
    assert images_in(result.stdout) == [str(path) for path in wanted]
    classifier = Classifier(bundles["int8"])
    for path in wanted:
        expected = [f"{p.label} ({p.index}): {p.score:.6f}" for p in classifier.classify(path, 2)]
        assert found[str(path)] == expected


def test_one_folder_with_one_image_still_names_it(bundles, tmp_path, fmnist_images):
    (tmp_path / "one").mkdir()
    shutil.copy(fmnist_images[0], tmp_path / "one" / "only.png")
    result = run_label(tmp_path / "one", "-m", bundles["int8"], "-k", "1")
    assert images_in(result.stdout) == [str(tmp_path / "one" / "only.png")]


def many_images(folder: Path, fmnist_images: list[Path], count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:03d}.png" for i in range(count)]
    for i, path in enumerate(paths):
        shutil.copy(fmnist_images[i % len(fmnist_images)], path)
    return paths


def test_bad_files_among_many_are_one_line_each_and_the_rest_keep_their_order(bundles, tmp_path, fmnist_images):
    paths = many_images(tmp_path / "many", fmnist_images, 150)
    paths[70].write_bytes(paths[70].read_bytes()[:100])  # cut short, in the middle of the third batch
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    args = [paths[0], tmp_path / "many", tmp_path / "missing.png", empty, "-m", bundles["int8"], "-k", "3"]
    runs = {jobs: run_label(*args, "--jobs", jobs) for jobs in (1, 3)}
    for result in runs.values():
        assert result.returncode == 1
        errors = result.stderr.splitlines()
        assert len(errors) == 3, errors
        assert errors[0].startswith(f"Error: {paths[70]}: corrupt or truncated image")
        assert errors[1] == f"Error: {tmp_path / 'missing.png'}: no such file"
        assert errors[2].startswith(f"Error: {empty}: no image files in this folder (")
        good = [str(path) for i, path in enumerate(paths) if i != 70]
        assert images_in(result.stdout) == [str(paths[0]), *good]
    assert runs[1].stdout == runs[3].stdout  # parallel decoding changes nothing but the time


def test_json_lines_one_per_image_in_input_order(bundles, tmp_path, fmnist_images):
    paths = many_images(tmp_path / "many", fmnist_images, 70)
    paths[3].write_text("not a picture")
    result = run_label(tmp_path / "many", tmp_path / "gone.png", "-m", bundles["float32"], "-k", "2", "--json")
    assert result.returncode == 1 and result.stderr == ""
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in records] == [*map(str, paths), str(tmp_path / "gone.png")]
    assert all(r["model"] == str(bundles["float32"]) for r in records)
    assert records[3]["error"].startswith(f"{paths[3]}: not an image") and "predictions" not in records[3]
    assert records[-1]["error"].endswith("no such file")
    classifier = Classifier(bundles["float32"])
    for record, path in zip(records[:3], paths):
        expected = [p._asdict() for p in classifier.classify(path, 2)]
        assert record["predictions"] == expected


def test_progress_line_only_when_stderr_is_a_terminal(bundles, tmp_path, fmnist_images):
    many_images(tmp_path / "many", fmnist_images, 60)
    command = [*PIPELINE, "label", str(tmp_path / "many"), "-m", str(bundles["int8"]), "-k", "1"]
    controller, terminal = os.openpty()
    try:
        result = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=terminal, text=True, timeout=60)
    finally:
        os.close(terminal)
    shown = b""
    try:
        while chunk := os.read(controller, 1 << 16):
            shown += chunk
    except OSError:  # EIO: the terminal's other end is closed and everything has been read
        pass
    os.close(controller)
    assert result.returncode == 0 and len(blocks(result.stdout)) == 60
    assert b"60/60 images, " in shown
    assert shown.endswith(b"\r"), shown[-40:]  # cleared at the end
    piped = run_label(tmp_path / "many", "-m", bundles["int8"], "-k", "1")
    assert piped.stderr == "" and piped.stdout == result.stdout


def test_classify_batch_and_classify_many_decode_in_threads_and_keep_order(bundles, fmnist_images, tmp_path):
    classifier = Classifier(bundles["int8"])
    one_by_one = [classifier.classify(path) for path in fmnist_images]
    assert classifier.classify_batch(fmnist_images, jobs=3) == one_by_one
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n")
    sources = [*fmnist_images[:4], broken, fmnist_images[4].read_bytes(), *fmnist_images[5:]]
    results = list(classifier.classify_many(sources, jobs=3, batch_size=2))
    assert isinstance(results[4], ImageError) and str(results[4]).startswith(str(broken))
    assert results[:4] + results[5:] == one_by_one
    with pytest.raises(ImageError, match="broken.png"):
        classifier.classify_batch(sources, jobs=2)
    pixels = np.stack([classifier.preprocess(path) for path in fmnist_images])
    scores = classifier.predict(pixels)
    assert [p[0].score for p in one_by_one] == pytest.approx(scores.max(axis=1).tolist())


ACCEPTED = [
    ["a.png"],
    ["a.png", "-i", "b.png", "c.png", "-k3", "--top_k=2", "-m", "m.tflite", "--model_file=n.tflite"],
    ["--json", "--ignore-checksum", "-j", "2", "--num_threads", "1", "a.png", "-l", "l.txt"],
    ["--input_mean", "-3", "--input_std", "2.5", "--", "-x.png", "--json"],
    ["-", "--jobs=1", "--input_mean=1e3"],
    ["a.png", "--input_mean=-0", "--input_std", "1_000", "--image=-b.png"],
]
LEFT_TO_CLICK = [
    [],
    ["--help"],
    ["a.png", "-h"],
    ["a.png", "-k", "0"],
    ["a.png", "-k"],
    ["a.png", "-k=3"],
    ["a.png", "-ka"],
    ["a.png", "--input_std", "nan"],
    ["a.png", "--input_std", "0"],
    ["a.png", "--input_mean", "inf"],
    ["a.png", "--json=yes"],
    ["a.png", "--ignore-checksum=1"],
    ["a.png", "--num_threads", "1000"],
    ["a.png", "--bogus"],
    ["a.png", "--top-k", "3"],
]


@pytest.mark.parametrize("args", ACCEPTED)
def test_the_plain_argument_reader_agrees_with_click(args):
    """Both are made from pipeline/label.py's LABEL_OPTIONS; they read the same values the same way."""
    from pipeline.commands import label

    params = label.make_context("label", list(args)).params
    expected = {key: value for key, value in params.items() if key not in ("images", "more_images")}
    expected["images"] = [*params["images"], *params["more_images"]]
    assert parse_label_args(args) == expected


@pytest.mark.parametrize("args", LEFT_TO_CLICK)
def test_what_the_plain_argument_reader_does_not_know_goes_to_click(args):
    assert parse_label_args(args) is None


def test_label_usage_errors_and_help_are_clicks(bundles):
    result = subprocess.run([*PIPELINE, "label", "--bogus", "x.png"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "No such option '--bogus'" in result.stderr
    result = subprocess.run([*PIPELINE, "label"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "give at least one image" in result.stderr
    help_text = subprocess.run([*PIPELINE, "label", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    assert "-j, --jobs INTEGER RANGE" in help_text and "folders" in help_text


def test_labelling_one_image_loads_neither_click_nor_pathlib_nor_a_thread_pool(bundles, fmnist_images):
    script = f"""
import sys
import zlib
from pipeline.cli import main
sys.argv = ["pipeline", "label", {str(fmnist_images[0])!r}, "-m", {str(bundles["int8"])!r}]
try:
    main()
except SystemExit as exit:
    assert not exit.code, exit.code
print("LOADED", sorted({{m.split(".")[0] for m in sys.modules}} & {{"click", "pathlib", "concurrent", "tempfile"}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert "LOADED []" in result.stdout, result.stdout + result.stderr
    assert LINE.match(result.stdout.splitlines()[0])


def test_png_chunks_are_checked_without_a_second_parse(tmp_path, fmnist_images):
    from PIL import Image

    from serve.preprocess import to_pixels

    data = fmnist_images[0].read_bytes()
    assert data.endswith(b"IEND\xaeB`\x82")
    expected = np.asarray(Image.open(fmnist_images[0]).convert("RGB"))
    assert (to_pixels(data, 28, 28, 3) == expected).all()  # decoding itself is Pillow's, unchanged
    no_end = data[:-12]  # every chunk whole, but no IEND
    with pytest.raises(ImageError, match="truncated PNG file"):
        to_pixels(no_end, 28, 28, 3)
    late = bytearray(data)
    late[-20] ^= 0x01  # inside the image data, whose CRC only serve checks (Pillow checks those before it)
    with pytest.raises(ImageError, match=r"corrupt or truncated image \(broken PNG file \(bad checksum in b'IDAT'"):
        to_pixels(bytes(late), 28, 28, 3)


def test_png_between_one_and_two_times_the_pixel_limit_is_refused():
    from PIL import Image

    from serve.preprocess import to_pixels
    from tests.conftest import png_chunk

    side = int((1.5 * Image.MAX_IMAGE_PIXELS) ** 0.5)  # Pillow only warns here; serve refuses
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    png = b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")
    with pytest.raises(ImageError, match=r"^<bytes>: image too large to decode safely"):
        to_pixels(png, 28, 28, 1)


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="needs procfs")
def test_a_file_longer_than_its_stated_size_is_read_to_the_end_and_cut_at_the_limit():
    from serve.errors import PipelineError
    from serve.files import read_regular_file

    assert os.stat("/proc/self/status").st_size == 0  # procfs states no size: one read cannot be trusted
    data = read_regular_file("/proc/self/status", 1 << 20, "a status file", PipelineError)
    assert data.startswith(b"Name:") and data.endswith(b"\n") and len(data) > 100
    with pytest.raises(PipelineError, match="too large for a status file"):
        read_regular_file("/proc/self/status", 50, "a status file", PipelineError)


def run_label_in(environment: dict[str, str], *args: str | bytes) -> subprocess.CompletedProcess:
    """`pipeline label ARGS` with the locale and output encoding of `environment` only; output as bytes."""
    settings = ("PYTHONIOENCODING", "PYTHONUTF8", "LANG", "LC_ALL", "LC_CTYPE")
    env = {key: value for key, value in os.environ.items() if key not in settings} | environment
    return subprocess.run([*PIPELINE, "label", *args], cwd=ROOT, env=env, capture_output=True, timeout=60)


ENCODINGS = {"utf-8": {"PYTHONIOENCODING": "utf-8"}, "ascii": {"PYTHONIOENCODING": "ascii"}, "C": {"LANG": "C"}}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_names_that_are_not_utf8_are_labelled_and_printed_escaped(bundles, fmnist_images, tmp_path, encoding):
    """A file or folder name is any bytes: every image is labelled and named, a byte that is not UTF-8 as \\xff,
    whatever the output's encoding; --json stays JSON in UTF-8 (no lone surrogates)."""
    root = os.fsencode(tmp_path)
    os.mkdir(root + b"/photos\xfe")
    files = [root + b"/photos\xfe/a.png", root + b"/photos\xfe/x\xff.png", root + b"/caf\xe9.png"]
    for source, path in zip(fmnist_images, files):
        shutil.copy(source, path)
    shown = [f"{tmp_path}/photos\\xfe/a.png", f"{tmp_path}/photos\\xfe/x\\xff.png", f"{tmp_path}/caf\\xe9.png"]
    gone = f"{tmp_path}/gone\\xff.png"
    args = [root + b"/photos\xfe", files[2], root + b"/gone\xff.png", "-m", str(bundles["int8"]), "-k", "2"]
    classifier = Classifier(bundles["int8"])
    ranked = [classifier.classify(os.fsdecode(path), 2) for path in files]

    result = run_label_in(ENCODINGS[encoding], *args)
    assert result.returncode == 1
    expected = [
        f"{name}:\n" + "".join(f"{p.label} ({p.index}): {p.score:.6f}\n" for p in top)
        for name, top in zip(shown, ranked)
    ]
    assert result.stdout.decode("ascii") == "".join(expected)
    assert result.stderr.decode("ascii") == f"Error: {gone}: no such file\n"

    result = run_label_in(ENCODINGS[encoding], *args, "--json")
    records = [json.loads(line) for line in result.stdout.decode("ascii").splitlines()]
    assert [record["image"] for record in records] == [*shown, gone]
    assert [record["predictions"] for record in records[:3]] == [[p._asdict() for p in top] for top in ranked]
    assert records[3]["error"] == f"{gone}: no such file" and result.stderr == b""


def test_labels_the_output_encoding_cannot_hold_are_printed_escaped(bundles, fmnist_images, tmp_path):
    metadata = read_bundle_metadata(bundles["int8"], read_model_file(bundles["int8"])).to_json()
    edited = resigned(bundles["int8"], tmp_path, {**metadata, "labels": ["Café", "靴", *metadata["labels"][2:]]})
    result = run_label_in({"PYTHONIOENCODING": "ascii"}, str(fmnist_images[0]), "-m", str(edited), "-k", "10")
    assert result.returncode == 0 and result.stderr == b""
    labels = [LINE.match(line)["label"] for line in result.stdout.decode("ascii").splitlines()]
    assert sorted(labels) == sorted(["Caf\\xe9", "\\u9774", *metadata["labels"][2:]])
