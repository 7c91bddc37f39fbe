"""Figures featx writes as PNG files (matplotlib's Agg canvas; the global backend is never changed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import atomic_path

__all__ = ["save_confusion_png"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, dpi: int = 100) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def save_confusion_png(cm: np.ndarray, names: list[str], title: str, path: Path) -> None:
    """Row-normalised confusion matrix with counts."""
    n = len(names)
    size = min(4 + 0.45 * n, 24)
    fig = _figure(size + 1.5, size)
    ax = fig.add_subplot(1, 1, 1)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), names, rotation=90 if n > 6 else 0, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
    _save(fig, path)
