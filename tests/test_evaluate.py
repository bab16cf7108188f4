"""`pipeline evaluate` on real class folders with real bundles, and serve/metrics.py, against scikit-learn."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as sk

from serve import Classifier
from serve.metrics import classification_report, confusion_matrix, top_k_accuracy
from tests.conftest import PIPELINE, ROOT, run_pipeline
from tests.test_serve import assert_one_line_error

# The folder names pipeline evaluate must match to the bundle's labels: exact ("Trouser"), or as `pipeline samples`
# spells its file names (t_shirt_top for "T-shirt/top").
FOLDERS = ["t_shirt_top", "Trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ANKLE BOOT"]


def assert_report_equals_scikit_learn(report: dict, labels, predicted, names: list[str]) -> None:
    """`report` (serve/metrics.py's) holds scikit-learn's figures for these predictions, under its own names."""
    expected = sk.classification_report(labels, predicted, output_dict=True, zero_division=0.0)
    renamed = {"f1-score": "f1"}
    rows = {
        {"macro avg": "macro", "weighted avg": "weighted"}.get(key, key): {renamed.get(k, k): v for k, v in row.items()}
        for key, row in expected.items()
        if key != "accuracy"
    }
    assert report["accuracy"] == pytest.approx(expected["accuracy"])
    assert report["macro"] == pytest.approx(rows.pop("macro")) and report["weighted"] == pytest.approx(
        rows.pop("weighted")
    )
    assert list(report["per_class"]) == [names[int(c)] for c in rows]
    for c, row in rows.items():
        assert report["per_class"][names[int(c)]] == pytest.approx(row)


def test_metrics_equal_scikit_learn_with_absent_and_never_predicted_classes():
    rng = np.random.default_rng(0)
    names = [f"class {i}" for i in range(8)]
    labels = rng.choice([0, 1, 2, 3, 5, 6], 500)  # 4 and 7 never occur; 5 is never predicted
    predicted = np.where(rng.random(500) < 0.6, labels, rng.choice([0, 1, 2, 3, 4, 6], 500))
    predicted[predicted == 5] = 4
    report = classification_report(labels, predicted, names)
    assert_report_equals_scikit_learn(report, labels, predicted, names)
    assert "class 7" not in report["per_class"] and report["per_class"]["class 5"]["precision"] == 0
    assert (confusion_matrix(labels, predicted, 8) == sk.confusion_matrix(labels, predicted, labels=range(8))).all()
    scores = rng.random((500, 8))
    for k in (1, 3, 5):
        assert top_k_accuracy(labels, scores, k) == pytest.approx(
            sk.top_k_accuracy_score(labels, scores, k=k, labels=range(8))
        )


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory) -> tuple[Path, list[Path], list[int]]:
    """200 Fashion-MNIST test PNGs in one sub-folder per class, with a folder named after no label, an image in no
    class folder and an image that cannot be decoded; and the usable images with their true class indices."""
    root = tmp_path_factory.mktemp("evaluate")
    run_pipeline("samples", "--count", "200", "--out", str(root / "flat"))
    folder = root / "images"
    paths, labels = [], []
    for png in sorted((root / "flat").glob("*.png")):
        slug = png.stem.split("_", 1)[1]
        index = [name.lower().replace(" ", "_") for name in FOLDERS].index(slug)
        target = folder / FOLDERS[index] / png.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, target)
        paths.append(target)
        labels.append(index)
    (folder / "cats").mkdir()
    shutil.copy(paths[0], folder / "cats" / "tabby.png")
    shutil.copy(paths[1], folder / "loose.png")
    (folder / "shirt" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    order = sorted(range(len(paths)), key=lambda i: str(paths[i]))  # the order pipeline evaluate reads them in
    return folder, [paths[i] for i in order], [labels[i] for i in order]


@pytest.fixture(scope="module")
def evaluated(bundles, class_folder, tmp_path_factory) -> tuple[dict, subprocess.CompletedProcess, Path]:
    """`pipeline evaluate --json` of the int8 and float32 bundles: (the JSON printed, the process, --out)."""
    folder, _, _ = class_folder
    out = tmp_path_factory.mktemp("evaluation")
    result = run_pipeline(
        "evaluate", str(folder), "-m", str(bundles["int8"]), "-m", str(bundles["float32"]), "--out", str(out), "--json"
    )
    return json.loads(result.stdout), result, out


def test_figures_equal_scikit_learn_on_the_bundles_own_predictions(bundles, class_folder, evaluated):
    folder, paths, labels = class_folder
    evaluation, result, out = evaluated
    assert result.stderr == "" and len(result.stdout.splitlines()) == 1
    assert evaluation["images"] == len(paths) == 200 and evaluation["classes"] == Classifier(bundles["int8"]).labels
    assert list(evaluation["bundles"]) == ["fmnist_int8", "fmnist_float32"]
    top1 = {}
    for mode in ("int8", "float32"):
        figures = evaluation["bundles"][f"fmnist_{mode}"]
        classifier = Classifier(bundles[mode])
        scores = classifier.predict(np.stack([classifier.preprocess(p) for p in paths]))
        predicted = scores.argmax(1)
        top1[mode] = predicted
        assert figures["model"] == str(bundles[mode])
        assert figures["top1"] == pytest.approx(sk.accuracy_score(labels, predicted))
        assert figures["top5"] == pytest.approx(sk.top_k_accuracy_score(labels, scores, k=5, labels=range(10)))
        assert_report_equals_scikit_learn(
            {**figures, "accuracy": figures["top1"]}, labels, predicted, classifier.labels
        )
        matrix = figures["confusion_matrix"]
        assert matrix["classes"] == classifier.labels
        assert matrix["matrix"] == sk.confusion_matrix(labels, predicted).tolist()
        # The most confused pairs: the largest off-diagonal counts, largest first.
        off = np.array(matrix["matrix"]) - np.diag(np.diag(matrix["matrix"]))
        assert [pair["count"] for pair in figures["confused_pairs"]] == sorted(off[off > 0], reverse=True)[:10]
        # The worst-scored images: the lowest scores of the true class.
        true_scores = scores[np.arange(len(paths)), labels]
        assert [item["score"] for item in figures["worst_scored"]] == pytest.approx(np.sort(true_scores)[:10])
        assert figures["worst_scored"][0]["image"] == str(paths[int(np.argmin(true_scores))])
        with Image.open(figures["confusion_png"]) as png:
            assert png.format == "PNG" and min(png.size) > 300
        assert Path(figures["confusion_png"]).parent == out
    [agreement] = evaluation["agreement"]
    assert agreement["bundles"] == ["fmnist_int8", "fmnist_float32"]
    assert agreement["top1_agreement"] == pytest.approx(np.mean(top1["int8"] == top1["float32"]))
    assert agreement["differ"] == int(np.sum(top1["int8"] != top1["float32"]))
    assert json.loads((out / "evaluation.json").read_text()) == evaluation


def test_what_cannot_be_used_is_reported_not_fatal(class_folder, evaluated):
    folder, _, _ = class_folder
    evaluation, _, _ = evaluated
    skipped = evaluation["skipped"]
    assert skipped["unknown_folders"] == [str(folder / "cats")]
    assert skipped["loose_images"] == [str(folder / "loose.png")]
    [unusable] = skipped["unusable"]
    assert unusable["path"] == str(folder / "shirt" / "broken.png")
    assert unusable["error"].startswith(f"{folder / 'shirt' / 'broken.png'}: ")


def test_text_output(bundles, class_folder, evaluated, tmp_path):
    folder, paths, _ = class_folder
    # One decoding thread here, processes in `evaluated`: the same figures.
    args = ["-m", str(bundles["int8"]), "--out", str(tmp_path), "--worst", "3", "-j", "1"]
    result = run_pipeline("evaluate", str(folder), *args)
    lines = result.stdout.splitlines()
    assert result.stderr == "" and lines[0] == f"200 images of 10 classes in {folder}"
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    figures = evaluation["bundles"]["fmnist_int8"]
    decoded_in_processes = evaluated[0]["bundles"]["fmnist_int8"]
    assert figures["per_class"] == decoded_in_processes["per_class"] and figures["top5"] == decoded_in_processes["top5"]
    rows = {line.split("  ")[0]: line.split("  ")[1:] for line in lines if not line.startswith(" ")}
    assert [cell.strip() for cell in rows["top-1"] if cell] == [f"{figures['top1']:.4f}"]
    for title, row in (("Shirt", figures["per_class"]["Shirt"]), ("macro avg", figures["macro"])):
        cells = [str(row["support"]), *(f"{row[key]:.4f}" for key in ("precision", "recall", "f1"))]
        assert [cell.strip() for cell in rows[title] if cell] == cells
    worst = figures["worst_scored"][0]
    shown = f"  {worst['image']}  {worst['label']} {worst['score']:.4f}, predicted {worst['predicted']} "
    assert any(line.startswith(shown) for line in lines)
    assert f"skipped 1 folder(s) not named after a label: {folder / 'cats'}" in lines
    assert f"skipped 1 image(s) outside the class folders: {folder / 'loose.png'}" in lines
    assert any(line.startswith(f"  {folder / 'shirt' / 'broken.png'}: ") for line in lines)
    assert lines[-1] == f"wrote {tmp_path / 'confusion_fmnist_int8.png'}, {tmp_path / 'evaluation.json'}"


def test_side_by_side_columns_name_each_bundle(bundles, class_folder, tmp_path):
    folder, _, _ = class_folder
    args = ["-m", str(bundles["float32"]), "-m", str(bundles["int8"]), "--out", str(tmp_path), "--worst", "0"]
    lines = run_pipeline("evaluate", str(folder), *args).stdout.splitlines()
    assert lines[2].split() == ["fmnist_float32", "fmnist_int8"]
    assert any(line.startswith("top-1 agreement, fmnist_float32 and fmnist_int8: ") for line in lines)
    assert not any("worst-scored" in line or "most confused" in line for line in lines)


def test_no_usable_image_is_one_line_error(bundles, class_folder, tmp_path):
    folder, paths, _ = class_folder
    unknown = tmp_path / "unknown"
    (unknown / "cats").mkdir(parents=True)
    shutil.copy(paths[0], unknown / "cats" / "a.png")
    result = run_pipeline("evaluate", str(unknown), "-m", str(bundles["int8"]), "--out", str(tmp_path), check=False)
    assert_one_line_error(result, str(unknown), "no sub-folder is named after one of the bundle's 10 labels", "cats")
    broken = tmp_path / "broken"
    (broken / "bag").mkdir(parents=True)
    (broken / "bag" / "x.png").write_text("not a picture\n")
    result = run_pipeline("evaluate", str(broken), "-m", str(bundles["int8"]), "--out", str(tmp_path), check=False)
    assert_one_line_error(result, str(broken), "none of its 1 images could be used", "x.png")
    missing = tmp_path / "missing"
    result = run_pipeline("evaluate", str(missing), "-m", str(bundles["int8"]), "--out", str(tmp_path), check=False)
    assert_one_line_error(result, str(missing), "no such folder")
    assert not (tmp_path / "evaluation.json").exists()


def test_evaluate_needs_the_serving_install_alone(bundles, class_folder, tmp_path):
    """No TensorFlow, nor anything else beyond the serving dependencies (pyproject's `dependencies`)."""
    folder, _, _ = class_folder
    script = f"""
import json, sys
from pipeline.cli import main
sys.argv = ["pipeline", "evaluate", {str(folder)!r}, "-m", {str(bundles["int8"])!r}, "--out", {str(tmp_path)!r}]
try:
    main()
except SystemExit:
    pass
loaded = {{m.split(".")[0] for m in sys.modules}} - set(sys.stdlib_module_names)
print(json.dumps(sorted(m for m in loaded if not m.startswith("_"))))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1])) - {"pipeline", "serve", "train", "quantize"}
    assert loaded <= {"PIL", "ai_edge_litert", "click", "numpy", "yaml"}, loaded
    assert (tmp_path / "evaluation.json").is_file()


def children(pid: int) -> list[int]:
    """The pids of the processes `pid` started that are still alive (Linux's /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from Linux's /proc")
def test_ctrl_c_ends_the_run_and_its_decoding_processes(bundles, class_folder, tmp_path):
    """Ctrl-C at a terminal: SIGINT to the whole process group, the forked decoders included. The run ends with
    "Aborted." and exit code 130, no traceback from any process, no process left, no evaluation.json."""
    _, paths, labels = class_folder
    folder = tmp_path / "many"
    for copy in range(100):  # 20,000 hard links to the 200 images: seconds of decoding
        for i, (path, label) in enumerate(zip(paths, labels)):
            target = folder / FOLDERS[label] / f"{copy:03d}_{i:03d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.hardlink_to(path)
    out = tmp_path / "out"
    command = [*PIPELINE, "evaluate", str(folder), "-m", str(bundles["int8"]), "--out", str(out), "-j", "2"]
    run = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 60
    while len(children(run.pid)) < 2 and run.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    decoders = children(run.pid)
    assert len(decoders) >= 2, "the decoding processes never started"
    os.killpg(run.pid, signal.SIGINT)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 130 and stderr.strip().splitlines() == ["Aborted."], stderr
    assert stdout == "" and not (out / "evaluation.json").exists()
    for pid in decoders:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
