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


def save_leaderboard_png(rows: list[dict], path: Path, title: str = "") -> None:
    """Test accuracy (with its 95% interval) against cost (seconds per image to extract + fit, log scale), one labelled
    marker per row; the recommended row (``mark``) starred, the rows tied with it ringed."""
    fig = _figure(8, 5.8)
    ax = fig.add_subplot(1, 1, 1)
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    markers = {h: m for h, m in zip(dict.fromkeys(r["head"] for r in rows), "osD^v<>pPX*h")}
    for r in rows:
        colour = f"C{backbones.index(r['backbone']) % 10}"
        x, y = r["cost_s_per_image"], r["accuracy"]
        if r.get("accuracy_ci"):
            lo, hi = r["accuracy_ci"]
            ax.errorbar(x, y, yerr=[[max(0.0, y - lo)], [max(0.0, hi - y)]], color=colour, alpha=0.5, lw=1, capsize=2, zorder=2)
        ax.scatter(x, y, color=colour, marker=markers[r["head"]], s=45, zorder=3)
        label = f"{r['backbone']} {r['head']}" + (" (recommended)" if r.get("mark") == "recommended" else "")
        ax.annotate(label, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points",
                    fontweight="bold" if r.get("mark") == "recommended" else "normal")
    for mark, style in (("recommended", dict(marker="*", s=260, facecolors="none", edgecolors="black", linewidths=1.2)),
                        ("tied", dict(marker="o", s=150, facecolors="none", edgecolors="0.3", linewidths=0.8))):
        chosen = [r for r in rows if r.get("mark") == mark]
        if chosen:
            ax.scatter([r["cost_s_per_image"] for r in chosen], [r["accuracy"] for r in chosen], zorder=4, **style,
                       label="recommended (chosen on validation)" if mark == "recommended" else "tied with it on the test images")
    front = pareto_front([(r["cost_s_per_image"], r["accuracy"]) for r in rows])
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="0.6", lw=1, zorder=1, label="Pareto front (test accuracy)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per image to extract + fit (log)")
    ax.set_ylabel("test accuracy (95% interval)")
    if title:
        ax.set_title(title, fontsize=7, wrap=True)
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
