"""What a fine-tuning run reports: ``metrics.json`` (the ``featx fit-head --json`` schema plus the run), its summary,
and ``test_predictions.csv`` (every test image's label, the kept model's prediction and the frozen baseline's)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ..configs import FinetuneConfig
from ..files import write_text_atomic
from ..provenance import provenance
from ..sources import ImageSource
from ..statistics import paired_bootstrap_difference, with_interval
from ._decision import Decision, describe_candidate

__all__ = ["SCORES", "PREDICTIONS_FILE", "final_metrics", "run_summary", "write_test_predictions"]

SCORES = ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy")
PREDICTIONS_FILE = "test_predictions.csv"
_RECIPE = ("freeze", "init_head", "probe", "lr", "head_lr_scale", "weight_decay", "layer_decay", "warmup", "label_smoothing",
           "augment", "bn", "batch_size", "seed", "val_fraction", "val_min_per_class", "val_max", "interpolate", "patience",
           "significance", "max_minutes")


def _paired_gain(predictions: dict, baseline_test: dict) -> tuple[float, list[float]] | tuple[None, None]:
    """(gain in points, its 95% paired-bootstrap interval) of the kept model over the frozen baseline on the test images
    both scored (the same images, pairs resampled together)."""
    if not baseline_test:
        return None, None
    base = dict(zip(baseline_test["index"], np.asarray(baseline_test["pred"]) == np.asarray(baseline_test["y"])))
    ours = dict(zip(predictions["index"].tolist(), (predictions["pred"] == predictions["y"]).tolist()))
    both = sorted(set(base) & set(ours))
    a, b = np.array([base[i] for i in both]), np.array([ours[i] for i in both])
    lo, hi = paired_bootstrap_difference(a, b)
    return float(100 * (b.mean() - a.mean())), [100 * lo, 100 * hi]


def final_metrics(config: FinetuneConfig, state: dict, decision: Decision, test: dict, predictions: dict, facts: dict,
                  wall_seconds: float) -> dict:
    """The kept model's test scores with their intervals, the frozen baseline and the gain over it (with its paired
    interval), the decision and its reason, and what the run was."""
    baseline = state["baseline"]
    kept_start = decision.kept == "start"
    chosen = decision.start if kept_start else decision.candidate
    gain, gain_ci = _paired_gain(predictions, state["baseline_test"])
    probe_seconds = baseline["seconds"] if baseline else 0.0
    return {
        "head": f"finetune:{config.freeze}" + ("+init-head" if config.init_head else ""),
        "model": config.model,
        **{k: test[k] for k in SCORES if k in test},
        **{f"{k}_ci": test[f"{k}_ci"] for k in SCORES if f"{k}_ci" in test},
        "interval_description": test.get("interval_description"),
        "test_loss": test["loss"],
        "n_train": facts["n_train"],
        "n_val": facts["n_val"],
        "n_test": int(test["n"]),
        "baseline": baseline,  # the frozen start (probe refitted on every training image, or --init-head) on the same test images
        "gain_points": gain,
        "gain_ci": gain_ci,  # 95% paired bootstrap over the test images, in points
        "decision": decision.to_dict(),
        "kept": decision.kept,
        "best_epoch": 0 if kept_start or chosen is None else chosen["epoch"],  # 0: the frozen start itself
        "chosen_alpha": None if kept_start or chosen is None else chosen["alpha"],  # WiSE-FT: 1 is the epoch's own weights
        "best_val_accuracy": None if chosen is None else chosen["val_accuracy"],
        "chosen_on": "validation",
        "epochs": config.epochs,
        "planned_epochs": state["planned_epochs"],
        "epochs_done": state["epoch"],
        # the budget stopped it or shortened its schedule, or validation stopped improving (--patience)
        "stopped_by": state["stopped_by"] or ("max-minutes" if state["planned_epochs"] < config.epochs else None),
        "fit_seconds": float(state["fit_seconds"]),
        "probe_seconds": float(probe_seconds),
        "finetune_seconds": float(wall_seconds - probe_seconds),
        "wall_seconds": float(wall_seconds),
        **{k: facts[k] for k in ("eval_split", "eval_split_description", "val_split_description", "weights", "weights_sha256",
                                 "trainable_params", "total_params", "img_size", "device", "precision")},
        "n_skipped": len(state["skipped"]),
        **{k: getattr(config, k) for k in _RECIPE},
        "featx_version": provenance()["featx_version"],
    }


def write_test_predictions(out: Path, src: ImageSource, predictions: dict, baseline_test: dict | None) -> Path:
    """``test_predictions.csv``: ``id,label,prediction,frozen_prediction`` per scored test image (class names; the frozen
    baseline's column is empty without one), for paired comparisons with other models on the same images."""
    names = src.class_names
    frozen = dict(zip(baseline_test["index"], baseline_test["pred"])) if baseline_test else {}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "label", "prediction", "frozen_prediction"])
    for i, y, p in zip(predictions["index"].tolist(), predictions["y"].tolist(), predictions["pred"].tolist()):
        w.writerow([src.ids[i], names[y], names[p], names[frozen[i]] if i in frozen else ""])
    path = out / PREDICTIONS_FILE
    write_text_atomic(path, buf.getvalue())
    return path


def _score(m: dict, key: str) -> str:
    return with_interval(m[key], m[f"{key}_ci"]) if m.get(f"{key}_ci") else f"{m[key]:.3f}"


def run_summary(m: dict, out: Path, export_dir: Path | None, finished: bool, resumed_from: int) -> str:
    """Six lines: what ran, the frozen start against the kept model, the scores, the decision and why, costs, the files."""
    if m["stopped_by"] == "early-stopping":
        state = f"stopped early after epoch {m['epochs_done']} (--patience {m['patience']})"
    elif m["stopped_by"]:
        state = f"stopped by --max-minutes {m['max_minutes']:g} after epoch {m['epochs_done']}"
    else:
        state = "finished" if finished else f"stopped after epoch {m['epochs_done']} of {m['planned_epochs']} (rerun with --resume)"
    resumed = f", resumed after epoch {resumed_from}" if resumed_from else ""
    base = m["baseline"]
    kept = "the frozen start" if m["kept"] == "start" else describe_candidate(m["decision"]["candidate"])
    if base:
        start = "linear probe" if base["start"] == "probe" else "--init-head"
        versus = (f"  frozen {start} {_score(base, 'accuracy')} -> kept ({kept}) {_score(m, 'accuracy')}: "
                  f"{m['gain_points']:+.2f} points (95% paired interval {m['gain_ci'][0]:+.2f} to {m['gain_ci'][1]:+.2f}) "
                  f"on the same {m['n_test']} test images; {start} {base['seconds']:.0f} s, fine-tuning {m['finetune_seconds']:.0f} s")
    else:
        versus = "  started from a random classifier (--no-probe): no frozen baseline to compare with"
    lines = [
        f"Fine-tuned {m['model']} ({m['head']}) {state}{resumed}: {m['n_train']} training images, {m['n_val']} validation images "
        f"({m['val_split_description']}), scored once on {m['n_test']} ({m['eval_split_description']}); "
        f"{m['n_skipped']} unreadable images skipped.",
        versus,
        f"  accuracy {_score(m, 'accuracy')}  balanced accuracy {_score(m, 'balanced_accuracy')}  macro F1 {_score(m, 'macro_f1')}"
        + (f"  top-5 {m['top5_accuracy']:.3f}" if "top5_accuracy" in m else "") + " (95% intervals)",
        f"  decision on validation: {m['decision']['reason']}",
        f"  training {m['fit_seconds']:.1f} s, wall {m['wall_seconds']:.1f} s on {m['device']} ({m['precision']}); "
        f"{m['trainable_params']:,} of {m['total_params']:,} parameters trained",
        f"  run in {out} (test predictions: {m.get('test_predictions', PREDICTIONS_FILE)})" + (f"; timm export in {export_dir}" if export_dir else ""),
    ]
    return "\n".join(lines)
