"""Plots people would rather look at than read: training curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from serve.files import atomic_path


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, training against validation."""
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [row[metric] for row in history], "o-", label="train")
        ax.plot(epochs, [row[f"val_{metric}"] for row in history], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(matrix: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """Rows are true classes, columns predictions; cells show the share of each true class."""
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = max(5.0, 0.6 * len(class_names) + 2)
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(class_names) <= 30:
        for i in range(len(class_names)):
            for j in range(len(class_names)):
                colour = "white" if shares[i, j] > 0.5 else "black"
                ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    # A Figure made without pyplot draws to files only: no GUI backend to choose, no figure to close.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
