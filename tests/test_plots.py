"""The run directory's plots (train/plots.py): real PNG files, drawn from real metrics and matrices."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from train.plots import SERIES_COLOURS, _blues, nice_ticks, plot_confusion, plot_curves


def colour_count(path, rgb) -> int:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    return int(np.all(pixels == rgb, axis=-1).sum())


def test_nice_ticks_are_round_evenly_spaced_and_inside_the_range():
    assert np.allclose(nice_ticks(0, 1), [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(0.5, 15.5, integers=True) == [5, 10, 15]  # 2 apart would be 8 marks
    assert nice_ticks(0.95, 1.05, integers=True) == [1]
    for low, high in ((0.1432, 0.5612), (0.7712, 0.9451), (-3.2, 41.0), (1e-5, 3e-5)):
        ticks = nice_ticks(low, high)
        steps = np.diff(ticks)
        slack = (high - low) * 1e-9  # i * step in floating point
        assert 3 <= len(ticks) <= 7 and low - slack <= ticks[0] and ticks[-1] <= high + slack
        assert np.allclose(steps, steps[0])
        mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
        assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5))


def test_curves_show_both_series_and_survive_a_diverged_epoch(tmp_path):
    history = [
        {
            "epoch": epoch,
            "loss": 1 / epoch,
            "accuracy": 1 - 1 / (epoch + 1),
            "val_loss": 1.2 / epoch,
            "val_accuracy": 1 - 1.3 / (epoch + 1),
        }
        for epoch in range(1, 6)
    ]
    history[2]["val_loss"] = float("nan")
    path = tmp_path / "curves.png"
    path.write_bytes(b"an older plot")
    plot_curves(history, path)
    assert Image.open(path).size == (1000, 400)
    for colour in SERIES_COLOURS:
        assert colour_count(path, Image.new("RGB", (1, 1), colour).getpixel((0, 0))) > 100
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # written in place of the old one, no temp left


def test_confusion_matrix_cells_are_coloured_by_share(tmp_path):
    matrix = np.array([[90, 10, 0], [0, 100, 0], [25, 25, 50]])
    path = tmp_path / "confusion_matrix.png"
    plot_confusion(matrix, ["cat", "dog", "a bird with a very long class name"], path, "validation: accuracy 0.80")
    width, height = Image.open(path).size
    assert width > 3 * 64 and height > 3 * 64
    # Each cell is a 64-pixel square of its share's colour (less the printed share): the darkest for 1.0, white-ish
    # for 0, and as many cells of each colour as shares.
    cell_area = 64 * 64
    assert 1 * cell_area * 0.8 < colour_count(path, tuple(_blues(np.array(1.0)))) <= cell_area
    assert 3 * cell_area * 0.8 < colour_count(path, tuple(_blues(np.array(0.0)))) <= 3 * cell_area
    assert 2 * cell_area * 0.8 < colour_count(path, tuple(_blues(np.array(0.25)))) <= 2 * cell_area
    assert colour_count(path, tuple(_blues(np.array(0.9)))) > cell_area * 0.8
