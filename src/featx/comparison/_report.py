"""The leaderboard: one row per (backbone, head or fine-tune) with 95% intervals, the recommended row (chosen on validation)
and the rows tied with it on the test images, as Markdown, CSV, JSON and a plot."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from ..files import atomic_path, write_json_atomic, write_text_atomic
from ..plots import save_leaderboard_png
from ..statistics import interval_description, wilson_interval, with_interval
from ._recommend import TEST_RULE, VALIDATION_RULE

__all__ = ["Leaderboard", "head_row", "finetune_row", "COLUMNS", "SCORES"]

SCORES = ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy")
# JSON fields of a row, in order; every score is followed by its 95% interval ('<score>_ci': [low, high])
COLUMNS = ["backbone", "head", "mark", "val_accuracy", "val_accuracy_ci", "n_val", "accuracy", "accuracy_ci", "balanced_accuracy",
           "balanced_accuracy_ci", "macro_f1", "macro_f1_ci", "top5_accuracy", "top5_accuracy_ci", "mcnemar_p", "chosen", "dim",
           "backbone_params", "extract_images_per_s", "fit_seconds", "predict_ms_per_image", "cost_s_per_image", "n_train", "n_test",
           "origin", "note"]


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


def _validation(accuracy, n_val, interval=None) -> dict:
    """The validation fields of a row: accuracy, its Wilson interval and the number of validation images (None without)."""
    if accuracy is None or not n_val:
        return {"val_accuracy": None, "val_accuracy_ci": None, "n_val": 0}
    n_val = int(n_val)
    return {"val_accuracy": float(accuracy), "n_val": n_val,
            "val_accuracy_ci": list(interval or wilson_interval(round(accuracy * n_val), n_val))}


def _scores(m: dict, n_test: int) -> dict:
    """The test scores of a metrics dict with their intervals: the recorded ones, else Wilson's for the proportions."""
    out = {}
    for k in SCORES:
        out[k] = m.get(k)
        ci = m.get(f"{k}_ci")
        if ci is None and k in ("accuracy", "top5_accuracy") and m.get(k) is not None and n_test:
            ci = list(wilson_interval(round(m[k] * n_test), n_test))
        out[f"{k}_ci"] = ci
    return out


def head_row(group: str, head: str, meta: dict, attrs: dict) -> dict:
    """A leaderboard row from a fitted head's sidecar and its feature group's attributes."""
    ips = _images_per_s(attrs)
    sweep = meta.get("sweep") or {}
    n_test = max(1, int(meta["n_test"]))
    return {"backbone": group, "head": head,
            **_validation(sweep.get("best_val_accuracy"), sweep.get("n_val"), sweep.get("best_val_accuracy_ci")),
            **_scores(meta["metrics"], int(meta["n_test"])),
            "chosen": _fmt(sweep.get("best") or {}), "dim": int(meta["feature_dim"]), "backbone_params": _params(attrs),
            "extract_images_per_s": ips, "fit_seconds": float(meta["fit_seconds"]),
            "predict_ms_per_image": 1000 * (1 / ips + float(meta["predict_seconds"]) / n_test),
            "cost_s_per_image": 1 / ips + float(meta["fit_seconds"]) / max(1, int(meta["n_train"])),
            "n_train": int(meta["n_train"]), "n_test": int(meta["n_test"]), "origin": "this run", "note": ""}


def finetune_row(group: str, metrics: dict, attrs: dict) -> dict:
    """A leaderboard row from a fine-tuning run's metrics.json (the forward cost is the backbone's, as measured by extraction)."""
    ips = _images_per_s(attrs)
    chosen = {k: metrics[k] for k in ("best_epoch", "epochs_done", "lr", "freeze", "img_size") if k in metrics}
    return {"backbone": group, "head": "finetune",
            **_validation(metrics.get("best_val_accuracy"), metrics.get("n_val"), metrics.get("best_val_accuracy_ci")),
            **_scores(metrics, int(metrics["n_test"])),
            "chosen": _fmt(chosen), "dim": int(attrs.get("num_features", 0)), "backbone_params": _params(attrs),
            "extract_images_per_s": ips, "fit_seconds": float(metrics["fit_seconds"]), "predict_ms_per_image": 1000 / ips,
            "cost_s_per_image": 1 / ips + float(metrics["fit_seconds"]) / max(1, int(metrics["n_train"])),
            "n_train": int(metrics["n_train"]), "n_test": int(metrics["n_test"]), "origin": "this run", "note": ""}


def _cell(r: dict, k: str) -> str:
    """A score as the markdown shows it: ``0.948 (0.900–0.973)``."""
    if r.get(k) is None:
        return ""
    return with_interval(r[k], r[f"{k}_ci"]) if r.get(f"{k}_ci") else f"{r[k]:.3f}"


def _flat(r: dict) -> dict:
    """A row for the CSV: every ``*_ci`` interval as two columns, ``*_ci_low`` and ``*_ci_high``."""
    out = {}
    for k, v in r.items():
        if k.endswith("_ci"):
            out[f"{k}_low"], out[f"{k}_high"] = v if v else ("", "")
        else:
            out[k] = v
    return out


@dataclass
class Leaderboard:
    """The rows (sorted by test accuracy, which chooses nothing), the recommended one and the test images they share."""

    rows: list[dict]
    test: dict  # {'description', 'n', 'file'}: the images every row is scored on
    n_classes: int
    summary: str = ""  # the recommendation in one line
    earlier: list[str] = field(default_factory=list)  # 'backbone + head' of the rows read back from earlier runs in the folder
    paths: list[Path] = field(default_factory=list)

    def __post_init__(self):
        self.rows = sorted(self.rows, key=lambda r: (-(r["accuracy"] or 0), r["cost_s_per_image"]))
        self.columns = [c for c in COLUMNS if not c.startswith("top5_accuracy") or self.n_classes > 5]

    @property
    def recommended(self) -> dict | None:
        return next((r for r in self.rows if r.get("mark") == "recommended"), None)

    def to_dict(self) -> dict:
        rec = self.recommended
        return {"test_images": self.test, "summary": self.summary,
                "recommended": {k: rec[k] for k in ("backbone", "head", "val_accuracy", "val_accuracy_ci", "n_val")} if rec else None,
                "rules": {"recommended": VALIDATION_RULE, "tied": TEST_RULE, "intervals": interval_description(self.test["n"])},
                "earlier_rows": self.earlier, "columns": self.columns,
                "rows": [{c: r.get(c) for c in self.columns} for r in self.rows]}

    def _notes(self) -> list[str]:
        lines = [f"Test images: {self.test['description']} ({self.test['n']} images, listed in {self.test['file']}); "
                 "every row is scored on them. Rows are sorted by test accuracy, which chooses nothing.", "",
                 f"**{self.summary}**", "", f"- {VALIDATION_RULE[0].upper()}{VALIDATION_RULE[1:]}.",
                 f"- {TEST_RULE[0].upper()}{TEST_RULE[1:]}; the p-value is in the column 'p vs recommended'.",
                 f"- Intervals: {interval_description(self.test['n'])}; validation: Wilson."]
        if self.earlier:
            lines.append(f"- {len(self.earlier)} row{'s' if len(self.earlier) > 1 else ''} come from earlier runs in this folder "
                         f"(not requested this time, still cached; marked 'earlier run'): {', '.join(self.earlier)}.")
        return lines

    def markdown(self) -> str:
        top5 = self.n_classes > 5
        head = ["backbone", "head", "mark", "validation", "accuracy", "balanced acc.", "macro F1"] + (["top-5"] if top5 else []) + [
            "p vs recommended", "chosen", "dim", "params (M)", "extract img/s", "fit s", "predict ms/img"]
        lines = self._notes() + ["", "| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
        for r in self.rows:
            mark = "**recommended**" if r["mark"] == "recommended" else r["mark"]
            notes = "; ".join(x for x in (r["note"], "earlier run" if r["origin"] != "this run" else "") if x)
            cells = [r["backbone"], r["head"], mark + (f" ({notes})" if notes else ""), _cell(r, "val_accuracy"), _cell(r, "accuracy"),
                     _cell(r, "balanced_accuracy"), _cell(r, "macro_f1")] + ([_cell(r, "top5_accuracy")] if top5 else [])
            cells += ["" if r["mcnemar_p"] is None else f"{r['mcnemar_p']:.3g}", r["chosen"], str(r["dim"]),
                      f"{r['backbone_params'] / 1e6:.2f}", f"{r['extract_images_per_s']:.1f}", f"{r['fit_seconds']:.2f}",
                      f"{r['predict_ms_per_image']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def csv_text(self) -> str:
        rows = [_flat({c: r.get(c) for c in self.columns}) for r in self.rows]
        fields = list(_flat({c: (0, 0) if c.endswith("_ci") else 0 for c in self.columns}))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()

    def write(self, out: Path) -> None:
        self.paths = [out / f"leaderboard.{ext}" for ext in ("md", "csv", "json", "png")]
        write_text_atomic(self.paths[0], "# Leaderboard\n\n" + self.markdown() + "\n")
        with atomic_path(self.paths[1]) as tmp:
            tmp.write_text(self.csv_text())
        write_json_atomic(self.paths[2], self.to_dict())
        save_leaderboard_png(self.rows, self.paths[3], self.summary)
