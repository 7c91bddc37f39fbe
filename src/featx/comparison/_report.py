"""The leaderboard: one row per (backbone, head or fine-tune), ranked by test accuracy, as Markdown, CSV, JSON and a plot."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from ..files import atomic_path, write_json_atomic, write_text_atomic
from ..plots import save_leaderboard_png

__all__ = ["Leaderboard", "head_row", "finetune_row", "COLUMNS"]

COLUMNS = ["backbone", "head", "accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy", "chosen", "dim", "backbone_params",
           "extract_images_per_s", "fit_seconds", "predict_ms_per_image", "cost_s_per_image", "n_train", "n_test"]


def _images_per_s(attrs: dict) -> float:
    if attrs.get("images_per_s"):
        return float(attrs["images_per_s"])
    seconds = float(attrs.get("extract_seconds_last_run") or 0)
    return float(attrs.get("n_images", 0)) / seconds if seconds > 0 else float("nan")


def _params(attrs: dict) -> int:
    if attrs.get("num_params"):
        return int(attrs["num_params"])
    import timm

    return sum(p.numel() for p in timm.create_model(attrs["model"], num_classes=0).parameters())


def _fmt(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def head_row(group: str, head: str, meta: dict, attrs: dict) -> dict:
    """A leaderboard row from a fitted head's sidecar and its feature group's attributes."""
    m = meta["metrics"]
    ips = _images_per_s(attrs)
    sweep = meta.get("sweep") or {}
    return {"backbone": group, "head": head, **{k: m.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy")},
            "chosen": _fmt(sweep.get("best") or {}), "dim": int(meta["feature_dim"]), "backbone_params": _params(attrs),
            "extract_images_per_s": ips, "fit_seconds": float(meta["fit_seconds"]),
            "predict_ms_per_image": 1000 * (1 / ips + float(meta["predict_seconds"]) / max(1, int(meta["n_test"]))),
            "cost_s_per_image": 1 / ips + float(meta["fit_seconds"]) / max(1, int(meta["n_train"])),
            "n_train": int(meta["n_train"]), "n_test": int(meta["n_test"])}


def finetune_row(group: str, metrics: dict, attrs: dict) -> dict:
    """A leaderboard row from a fine-tuning run's metrics.json (the forward cost is the backbone's, as measured by extraction)."""
    ips = _images_per_s(attrs)
    chosen = {k: metrics[k] for k in ("best_epoch", "epochs_done", "lr", "freeze", "img_size") if k in metrics}
    return {"backbone": group, "head": "finetune", **{k: metrics.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy")},
            "chosen": _fmt(chosen), "dim": int(attrs.get("num_features", 0)), "backbone_params": _params(attrs),
            "extract_images_per_s": ips, "fit_seconds": float(metrics["fit_seconds"]), "predict_ms_per_image": 1000 / ips,
            "cost_s_per_image": 1 / ips + float(metrics["fit_seconds"]) / max(1, int(metrics["n_train"])),
            "n_train": int(metrics["n_train"]), "n_test": int(metrics["n_test"])}


@dataclass
class Leaderboard:
    rows: list[dict]
    test: dict  # {'description', 'n', 'file'}: the images every row is scored on
    n_classes: int
    paths: list[Path] = field(default_factory=list)

    def __post_init__(self):
        self.rows = sorted(self.rows, key=lambda r: (-(r["accuracy"] or 0), r["cost_s_per_image"]))
        self.columns = [c for c in COLUMNS if c != "top5_accuracy" or self.n_classes > 5]

    def to_dict(self) -> dict:
        return {"test_images": self.test, "columns": self.columns, "rows": [{c: r.get(c) for c in self.columns} for r in self.rows]}

    def markdown(self) -> str:
        head = ["backbone", "head", "accuracy", "balanced acc.", "macro F1"] + (["top-5"] if self.n_classes > 5 else []) + [
            "chosen", "dim", "params (M)", "extract img/s", "fit s", "predict ms/img"]
        lines = [f"Test images: {self.test['description']} ({self.test['n']} images, listed in {self.test['file']}); "
                 "every row is scored on them.", "", "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
        for r in self.rows:
            cells = [r["backbone"], r["head"], f"{r['accuracy']:.4f}", f"{r['balanced_accuracy']:.4f}", f"{r['macro_f1']:.4f}"]
            cells += [f"{r['top5_accuracy']:.4f}"] if self.n_classes > 5 else []
            cells += [r["chosen"], str(r["dim"]), f"{r['backbone_params'] / 1e6:.2f}", f"{r['extract_images_per_s']:.1f}",
                      f"{r['fit_seconds']:.2f}", f"{r['predict_ms_per_image']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        return buf.getvalue()

    def write(self, out: Path) -> None:
        self.paths = [out / f"leaderboard.{ext}" for ext in ("md", "csv", "json", "png")]
        write_text_atomic(self.paths[0], "# Leaderboard\n\n" + self.markdown() + "\n")
        with atomic_path(self.paths[1]) as tmp:
            tmp.write_text(self.csv_text())
        write_json_atomic(self.paths[2], self.to_dict())
        save_leaderboard_png(self.rows, self.paths[3])
