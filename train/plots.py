"""Plots people would rather look at than read: training curves and the confusion matrix.

Drawn with Pillow, which reads the images anyway: matplotlib, its import alone, was most of what `pipeline train`
cost over a plain Keras script (benchmarks/train_bench.py compares pipeline train with such a script). A plot is
drawn at SCALE times its size and scaled down, which smooths its lines and letters the way an anti-aliasing
renderer would."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

from serve.files import atomic_path

SCALE = 2
INK, FAINT, GRID = "#222222", "#555555", "#e4e4e4"
SERIES_COLOURS = ("#1f77b4", "#ff7f0e")  # train, validation
# ColorBrewer's "Blues", from a share of 0 to 1.
BLUES_HEX = ("#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")
BLUES = np.array([ImageColor.getrgb(colour) for colour in BLUES_HEX], dtype=np.float64)


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, training against validation, side by side."""
    epochs = [row["epoch"] for row in history]
    canvas = Canvas(1000, 400)
    for left, metric, legend_at in ((0, "loss", "top"), (500, "accuracy", "bottom")):
        series = [
            ("train", [row[metric] for row in history], SERIES_COLOURS[0]),
            ("validation", [row[f"val_{metric}"] for row in history], SERIES_COLOURS[1]),
        ]
        _line_panel(canvas, (left + 70, 35, left + 485, 345), epochs, series, metric, legend_at)
    canvas.save(path)


def plot_confusion(matrix: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """Rows are true classes, columns predictions; cells show the share of each true class."""
    count = len(class_names)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    cell = min(64, max(4, 1000 // count))
    names = [name if len(name) <= 24 else name[:23] + "…" for name in class_names] if cell >= 10 else []
    label_size = min(13, cell - 2)
    widest = math.ceil(max((Canvas.text_width(name, label_size) for name in names), default=0))
    left, top = 50 + widest, 40
    right, bottom = left + count * cell, top + count * cell
    title_width = Canvas.text_width(title, 15)
    title_middle = max((left + right) / 2, title_width / 2 + 10)  # over the matrix, unless longer than room there
    below = round(widest * math.sin(math.radians(45)))  # how far the slanted names under the matrix reach down
    canvas = Canvas(math.ceil(max(right + 25, title_middle + title_width / 2 + 10)), bottom + below + 55)
    canvas.text(title_middle, top - 12, title, 15, anchor="ms")
    cells = np.repeat(np.repeat(_blues(shares), cell * SCALE, axis=0), cell * SCALE, axis=1)
    canvas.image.paste(Image.fromarray(cells), (left * SCALE, top * SCALE))
    if count <= 30:
        for (row, column), share in np.ndenumerate(shares):
            x, y = left + column * cell + cell / 2, top + row * cell + cell / 2
            colour = "white" if share > 0.5 else INK
            canvas.text(x, y, f"{share:.2f}", max(6, cell // 6), anchor="mm", fill=colour)
    canvas.rectangle((left, top, right, bottom), outline=INK)
    for i, name in enumerate(names):
        middle = i * cell + cell / 2
        canvas.line([(left - 4, top + middle), (left, top + middle)])
        canvas.text(left - 7, top + middle, name, label_size, anchor="rm")
        canvas.line([(left + middle, bottom), (left + middle, bottom + 4)])
        canvas.rotated_text(left + middle + 4, bottom + 7, name, label_size)
    canvas.text((left + right) / 2, canvas.size[1] - 12, "predicted", 13, anchor="ms")
    canvas.rotated_text(14, (top + bottom) / 2, "true", 13, angle=90)
    canvas.save(path)


class Canvas:
    """A white RGB image drawn at SCALE times its size; coordinates, widths and font sizes are given at the size it
    is saved at."""

    def __init__(self, width: int, height: int) -> None:
        self.size = (width, height)
        self.image = Image.new("RGB", (width * SCALE, height * SCALE), "white")
        self.draw = ImageDraw.Draw(self.image)

    def line(self, points: list[tuple[float, float]], fill: str = INK, width: float = 1) -> None:
        self.draw.line(_scaled(points), fill=fill, width=round(width * SCALE), joint="curve")

    def rectangle(self, box: tuple[float, float, float, float], fill=None, outline: str | None = None) -> None:
        self.draw.rectangle(_scaled([box[:2], box[2:]]), fill=fill, outline=outline, width=SCALE)

    def dot(self, x: float, y: float, radius: float, fill: str) -> None:
        r = radius * SCALE
        self.draw.ellipse((x * SCALE - r, y * SCALE - r, x * SCALE + r, y * SCALE + r), fill=fill)

    def text(self, x: float, y: float, text: str, size: int, anchor: str = "la", fill: str = INK) -> None:
        """`anchor` as Pillow's: two letters, horizontal (l, m, r) then vertical (a: top, m, s: baseline, d)."""
        self.draw.text((x * SCALE, y * SCALE), text, font=_font(size * SCALE), anchor=anchor, fill=fill)

    def rotated_text(self, x: float, y: float, text: str, size: int, angle: int = 45) -> None:
        """Text turned `angle` degrees anticlockwise: at 45 it ends at (x, y), as tick labels under an axis; at 90
        it is centred on (x, y), as a vertical axis's label."""
        font = _font(size * SCALE)
        _, _, width, height = font.getbbox(text, anchor="lt")
        mask = Image.new("L", (width, height))
        ImageDraw.Draw(mask).text((0, 0), text, font=font, anchor="lt", fill=255)
        mask = mask.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
        if angle == 90:
            corner = (x * SCALE - mask.width / 2, y * SCALE - mask.height / 2)
        else:
            corner = (x * SCALE - mask.width, y * SCALE)
        self.image.paste(INK, (round(corner[0]), round(corner[1])), mask)

    @staticmethod
    def text_width(text: str, size: int) -> float:
        return _font(size * SCALE).getlength(text) / SCALE

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            self.image.reduce(SCALE).save(tmp, format="PNG")  # each pixel the mean of its SCALE x SCALE


def _line_panel(canvas: Canvas, box: tuple, xs: list[int], series: list[tuple], title: str, legend_at: str) -> None:
    """One chart in `box` (left, top, right, bottom): each of `series` (name, values, colour) as dots joined by
    lines over `xs`, with grid, ticks, title and legend."""
    left, top, right, bottom = box
    # A diverged run's NaN or infinite values are left out: each series' line breaks there.
    values = [value for _, ys, _ in series for value in ys if math.isfinite(value)] or [0.0]
    low, high = _padded(min(values), max(values))
    first, last = _padded(xs[0], xs[-1])

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - first) / (last - first) * (right - left),
            bottom - (y - low) / (high - low) * (bottom - top),
        )

    y_ticks = nice_ticks(low, high)
    for tick in y_ticks:
        y = at(first, tick)[1]
        canvas.line([(left, y), (right, y)], fill=GRID)
        canvas.line([(left - 4, y), (left, y)])
        canvas.text(left - 7, y, _tick_label(tick, y_ticks), 11, anchor="rm")
    for tick in nice_ticks(first, last, integers=True):
        x = at(tick, low)[0]
        canvas.line([(x, top), (x, bottom)], fill=GRID)
        canvas.line([(x, bottom), (x, bottom + 4)])
        canvas.text(x, bottom + 7, f"{tick:g}", 11, anchor="ma")
    canvas.rectangle((left, top, right, bottom), outline=INK)
    for _, ys, colour in series:
        points = [at(x, y) if math.isfinite(y) else None for x, y in zip(xs, ys)]
        for start, end in zip(points, points[1:]):
            if start and end:
                canvas.line([start, end], fill=colour, width=1.5)
        for point in filter(None, points):
            canvas.dot(*point, 3.5, colour)
    canvas.text((left + right) / 2, top - 10, title, 15, anchor="ms")
    canvas.text((left + right) / 2, bottom + 35, "epoch", 12, anchor="ms", fill=FAINT)
    _legend(canvas, right - 10, top + 10 if legend_at == "top" else bottom - 10 - 20 * len(series), series)


def _legend(canvas: Canvas, right: float, top: float, series: list[tuple]) -> None:
    width = 40 + max(Canvas.text_width(name, 12) for name, _, _ in series)
    canvas.rectangle((right - width, top, right, top + 20 * len(series) + 6), fill="white", outline="#cccccc")
    for i, (name, _, colour) in enumerate(series):
        y = top + 13 + 20 * i
        canvas.line([(right - width + 8, y), (right - width + 28, y)], fill=colour, width=1.5)
        canvas.dot(right - width + 18, y, 3.5, colour)
        canvas.text(right - width + 34, y, name, 12, anchor="lm")


def nice_ticks(low: float, high: float, most: int = 7, integers: bool = False) -> list[float]:
    """Round values between `low` and `high` (at most `most`), a step of 1, 2, 2.5 or 5 times a power of ten
    apart (whole numbers, without 2.5, for `integers`): where a reader expects an axis's marks."""
    raw = (high - low) / most
    power = 10 ** math.floor(math.log10(raw))
    steps = (1, 2, 2.5, 5, 10)
    if integers:
        steps, power = (1, 2, 5, 10), max(power, 1)
    step = next(m * power for m in steps if m * power >= raw * (1 - 1e-9))
    start = math.ceil(low / step - 1e-9)
    return [i * step for i in range(start, math.floor(high / step + 1e-9) + 1)]


def _tick_label(value: float, ticks: list[float]) -> str:
    """`value` with as many decimals as its axis's step needs (0.25 apart: two; 0.1 apart: one)."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = 0
    while decimals < 10 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-6:
        decimals += 1
    return f"{value:.{decimals}f}"


def _padded(low: float, high: float) -> tuple[float, float]:
    """The range with 5% room at each end (5% of a single value either side of it), so no dot sits on the frame."""
    room = (high - low) * 0.05 or abs(high) * 0.05 or 0.5
    return low - room, high + room


def _blues(shares: np.ndarray) -> np.ndarray:
    """Each share's colour on the BLUES scale (linear between its steps), as uint8 RGB: shape (*shares.shape, 3)."""
    position = np.clip(shares, 0.0, 1.0) * (len(BLUES) - 1)
    below = np.minimum(position.astype(int), len(BLUES) - 2)
    fraction = (position - below)[..., None]
    return np.round(BLUES[below] + (BLUES[below + 1] - BLUES[below]) * fraction).astype(np.uint8)


def _scaled(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x * SCALE, y * SCALE) for x, y in points]


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's own font (Aileron) at any size where Pillow has FreeType, as its wheels do; else a small bitmap one.
    return ImageFont.load_default(size)
