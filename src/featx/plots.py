"""Figures featx writes as PNG files (matplotlib's Agg canvas; the global backend is never changed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import atomic_path

__all__ = ["save_confusion_png", "save_leaderboard_png", "pareto_front"]


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


def save_leaderboard_png(rows: list[dict], path: Path) -> None:
    """Test accuracy against cost (seconds per image to extract + fit, log scale), one labelled marker per row."""
    fig = _figure(8, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    markers = {h: m for h, m in zip(dict.fromkeys(r["head"] for r in rows), "osD^v<>pPX*h")}
    for r in rows:
        colour = f"C{backbones.index(r['backbone']) % 10}"
        ax.scatter(r["cost_s_per_image"], r["accuracy"], color=colour, marker=markers[r["head"]], s=45, zorder=3)
        ax.annotate(f"{r['backbone']} {r['head']}", (r["cost_s_per_image"], r["accuracy"]), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    front = pareto_front([(r["cost_s_per_image"], r["accuracy"]) for r in rows])
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="0.6", lw=1, zorder=1, label="Pareto front")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per image to extract + fit (log)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    _save(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The distinct (cost, accuracy) points that no other point matches or beats on both cost (lower) and accuracy
    (higher), by cost: of points at one cost only the most accurate can be on it."""
    front, best = [], float("-inf")
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((cost, acc))
            best = acc
    return front
