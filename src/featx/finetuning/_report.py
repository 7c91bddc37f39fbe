"""What a fine-tuning run reports: ``metrics.json`` (the ``featx fit-head --json`` schema plus the run) and its summary."""

from __future__ import annotations

from pathlib import Path

from ..configs import FinetuneConfig
from ..provenance import provenance

__all__ = ["SCORES", "final_metrics", "run_summary"]

SCORES = ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy")
_RECIPE = ("freeze", "init_head", "probe", "lr", "head_lr_scale", "weight_decay", "layer_decay", "warmup", "label_smoothing",
           "augment", "bn", "batch_size", "seed", "val_fraction", "max_minutes")


def final_metrics(config: FinetuneConfig, state: dict, test: dict, facts: dict, wall_seconds: float) -> dict:
    """The chosen model's test scores, the frozen baseline and the gain over it, the choice and what the run was."""
    baseline = state["baseline"]
    chosen = state["history"][state["best"]["epoch"]]
    gain = 100 * (test["accuracy"] - baseline["accuracy"]) if baseline else None
    probe_seconds = baseline["seconds"] if baseline else 0.0
    return {
        "head": f"finetune:{config.freeze}" + ("+init-head" if config.init_head else ""),
        "model": config.model,
        **{k: test[k] for k in SCORES if k in test},
        "test_loss": test["loss"],
        "n_train": facts["n_train"],
        "n_val": facts["n_val"],
        "n_test": int(test["n"]),
        "baseline": baseline,  # the frozen start (linear probe or --init-head) on the same test images; None from a random head
        "gain_points": gain,
        "best_epoch": state["best"]["epoch"],  # chosen on validation; 0 is the frozen start itself
        "best_val_accuracy": state["best"]["val_accuracy"],
        "chosen_on": "validation",
        "chosen_epoch_train_loss": chosen.get("train_loss"),
        "epochs": config.epochs,
        "planned_epochs": state["planned_epochs"],
        "epochs_done": state["epoch"],
        # the budget stopped it, or shortened its schedule after the first epoch
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


def run_summary(m: dict, out: Path, export_dir: Path | None, finished: bool, resumed_from: int) -> str:
    """Five lines: what ran, the frozen start against the fine-tuned model, the scores, the choice and costs, the files."""
    if m["stopped_by"]:
        state = f"stopped by --max-minutes {m['max_minutes']:g} after epoch {m['epochs_done']}"
    else:
        state = "finished" if finished else f"stopped after epoch {m['epochs_done']} of {m['planned_epochs']} (rerun with --resume)"
    resumed = f", resumed after epoch {resumed_from}" if resumed_from else ""
    base = m["baseline"]
    if base:
        start = "linear probe" if base["start"] == "probe" else "--init-head"
        versus = (f"  frozen {start} {base['accuracy']:.4f} -> fine-tuned {m['accuracy']:.4f} ({m['gain_points']:+.2f} points) "
                  f"on the same {m['n_test']} test images; {start} {base['seconds']:.0f} s, fine-tuning {m['finetune_seconds']:.0f} s")
    else:
        versus = "  started from a random classifier (--no-probe): no frozen baseline to compare with"
    chosen = ("the frozen start itself (no epoch beat it on validation)" if m["best_epoch"] == 0 else f"epoch {m['best_epoch']}")
    lines = [
        f"Fine-tuned {m['model']} ({m['head']}) {state}{resumed}: {m['n_train']} training images, {m['n_val']} validation images "
        f"({m['val_split_description']}), scored once on {m['n_test']} ({m['eval_split_description']}); "
        f"{m['n_skipped']} unreadable images skipped.",
        versus,
        f"  accuracy {m['accuracy']:.4f}  balanced accuracy {m['balanced_accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}"
        + (f"  top-5 {m['top5_accuracy']:.4f}" if "top5_accuracy" in m else ""),
        f"  chosen on validation: {chosen} (validation accuracy {m['best_val_accuracy']:.4f}); training {m['fit_seconds']:.1f} s, "
        f"wall {m['wall_seconds']:.1f} s on {m['device']} ({m['precision']}); {m['trainable_params']:,} of {m['total_params']:,} "
        "parameters trained",
        f"  run in {out}" + (f"; timm export in {export_dir}" if export_dir else ""),
    ]
    return "\n".join(lines)
