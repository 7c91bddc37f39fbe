"""The steps of a run after its setup: the frozen start (epoch 0), an epoch and its candidates, the budget, the final choice.

Checkpoints: ``last.pt`` (everything to resume), ``finetuned.pt`` (the best fine-tuned candidate so far on validation,
with its record), ``best.pt`` (the model the run keeps: the frozen probe refitted on every training image until the
final choice, then that choice).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..configs import FinetuneConfig, parse_alphas
from ..embedder import ImageEmbedder
from ..provenance import provenance
from ..sources import ImageSource
from ..statistics import metric_intervals
from ._budget import epoch_estimate, epochs_that_fit
from ._data import RunImages
from ._decision import Decision, better, decide, describe_candidate
from ._freezing import classifier_keys
from ._interpolation import interpolated, snapshot
from ._loop import Trainer, scored
from ._probe import fit_probe
from ._rng import rng_state
from ._run_dir import load_checkpoint, save_checkpoint

__all__ = ["Run", "FINETUNED", "new_state", "start", "train_and_checkpoint", "out_of_time", "fit_schedule", "finish", "start_name"]

_logger = logging.getLogger(__name__)
FINETUNED = "finetuned.pt"
_SCORES = ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy", "loss", "n")


@dataclass
class Run:
    """Everything an epoch loop needs, built once per call."""

    config: FinetuneConfig
    out: Path
    src: ImageSource
    images: RunImages
    embedder: ImageEmbedder
    trainer: Trainer
    loaders: dict  # train (augmented), probe (training images, eval transform), val, test
    generator: torch.Generator
    state: dict  # what last.pt carries (new_state)
    start_state: dict | None = None  # the frozen start's weights (CPU), the other end of every interpolation

    @property
    def n_classes(self) -> int:
        return len(self.src.class_names)


def new_state(config: FinetuneConfig) -> dict:
    return {"epoch": 0, "planned_epochs": config.epochs, "history": [], "best": None, "start": None, "start_head": None,
            "baseline": None, "baseline_test": None, "images_per_s": None, "stopped_by": None, "schedule_fitted": 0,
            "since_best": 0, "fit_seconds": 0.0, "wall_seconds": 0.0, "skipped": {}}


def start_name(config: FinetuneConfig) -> str:
    return "--init-head start" if config.init_head else "frozen probe" if config.probe else "random start"


def _logits(features: np.ndarray, head: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.from_numpy(features).float() @ head[0].T + head[1]


def _classifier(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = classifier_keys(model)
    state = model.state_dict()
    return state[weight].detach().cpu().clone(), state[bias].detach().cpu().clone()


def _candidate(val: dict, pred: dict, **where) -> dict:
    return {**where, "val_accuracy": val["accuracy"], "val_loss": val["loss"], "correct": (pred["pred"] == pred["y"]).tolist()}


def start(run: Run, clock) -> None:
    """Epoch 0: the frozen start scored on validation (what every fine-tuned candidate must beat), the probe refitted on
    every training image and scored on the test images (the frozen baseline, reported, never used to choose), and
    ``best.pt`` holding that refitted probe: the model the run keeps unless validation says otherwise."""
    config, trainer, state, K = run.config, run.trainer, run.state, run.n_classes
    t0 = time.perf_counter()
    refit, info = None, {}
    if config.init_head or config.probe:
        X_val, y_val, i_val = trainer.embed(run.loaders["val"], state["skipped"])
        if config.init_head:
            head = refit = _classifier(trainer.model)
            info = {"head": config.init_head}
        else:
            X, y, i_train = trainer.embed(run.loaders["probe"], state["skipped"])
            state["images_per_s"] = (len(y) + len(y_val)) / max(1e-9, time.perf_counter() - t0)  # embedding only
            probe = fit_probe(X, y, X_val, y_val, K, seed=config.seed, device=str(trainer.device),
                              source_order=np.argsort(np.concatenate([i_train, i_val]), kind="stable"))
            head, refit, info = probe.start, probe.refit, probe.info
            set_classifier(trainer.model, *head, config.model)
        state["images_per_s"] = state["images_per_s"] or len(y_val) / max(1e-9, time.perf_counter() - t0)
        val, val_pred = scored(_logits(X_val, head), y_val, i_val, K)
    else:
        val, val_pred = trainer.evaluate(run.loaders["val"], K, state["skipped"])
        state["images_per_s"] = len(val_pred["y"]) / max(1e-9, time.perf_counter() - t0)
    state["start"] = _candidate(val, val_pred, epoch=0, alpha=0.0)
    state["start_head"] = _classifier(trainer.model)
    run.start_state = snapshot(trainer.model)
    if refit is not None:
        _score_baseline(run, refit, info, val)
    state["history"].append({"epoch": 0, **{f"val_{k}": v for k, v in val.items()}, "seconds": time.perf_counter() - t0})
    kept = dict(run.start_state)
    if refit is not None:
        kept.update(zip(classifier_keys(trainer.model), refit))
    _save_model(run, kept, "best.pt", epoch=0, alpha=0.0, kept="start")
    save_last(run, clock)


def _score_baseline(run: Run, refit: tuple, info: dict, val: dict) -> None:
    """The refitted probe (or --init-head) on the test images, from their frozen embeddings: the frozen baseline."""
    state, t0 = run.state, time.perf_counter()
    X, y, index = run.trainer.embed(run.loaders["test"], state["skipped"])
    test, pred = scored(_logits(X, refit), y, index, run.n_classes)
    state["baseline"] = {"start": "init-head" if run.config.init_head else "probe", **info, "val_accuracy": val["accuracy"],
                         **{k: test[k] for k in _SCORES if k in test}, **metric_intervals(pred["y"], pred["pred"]),
                         "seconds": info.get("seconds", 0.0) + time.perf_counter() - t0}
    state["baseline_test"] = {"index": pred["index"].tolist(), "pred": pred["pred"].tolist(), "y": pred["y"].tolist()}
    _logger.info("%s: validation accuracy %.4f; refitted on every training image, test accuracy %.4f (the frozen baseline)",
                 start_name(run.config), val["accuracy"], test["accuracy"])


def set_classifier(model: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor, name: str) -> None:
    from ..errors import FeatxError

    classifier = model.get_classifier()
    if not isinstance(classifier, torch.nn.Linear) or tuple(classifier.weight.shape) != tuple(weight.shape):
        raise FeatxError(f"'{name}' has no plain linear classifier of shape {tuple(weight.shape)} to start from a linear head; "
                         "pass --no-probe")
    with torch.no_grad():
        classifier.weight.copy_(weight.to(classifier.weight.device))
        classifier.bias.copy_(bias.to(classifier.bias.device))


def train_and_checkpoint(run: Run, epoch: int, clock) -> None:
    """Train epoch ``epoch``; score it and its interpolations toward the start on validation (candidates); keep the best
    candidate in finetuned.pt; save last.pt."""
    state, trainer = run.state, run.trainer
    t_epoch = time.perf_counter()
    train_stats = trainer.train_epoch(run.loaders["train"], epoch, state["skipped"], state["planned_epochs"])
    state["fit_seconds"] += time.perf_counter() - t_epoch
    candidates, last_val = [], None
    for alpha in (*parse_alphas(run.config.interpolate), 1.0):
        mixed = interpolated(trainer.model, run.start_state, alpha) if alpha < 1 else contextlib.nullcontext()
        with mixed:
            val, pred = trainer.evaluate(run.loaders["val"], run.n_classes, state["skipped"])
            c = _candidate(val, pred, epoch=epoch, alpha=alpha)
            if run.config.test_curve:  # information only: nothing reads it to choose
                c["test_accuracy_info_only"] = trainer.evaluate(run.loaders["test"], run.n_classes, state["skipped"])[0]["accuracy"]
            if better(c, state["best"]):
                state["best"], state["since_best"] = c, -1
                _save_model(run, snapshot(trainer.model), FINETUNED, epoch=epoch, alpha=alpha, candidate=c)
        candidates.append(c)
        last_val = val
    state["since_best"] += 1
    entry = {"epoch": epoch, **train_stats, **{f"val_{k}": v for k, v in last_val.items()},
             "lr": max(g["lr"] for g in trainer.optimizer.param_groups),
             "candidates": [_vs_start({k: v for k, v in c.items() if k != "correct"}, c, state["start"]) for c in candidates],
             "seconds": time.perf_counter() - t_epoch}
    if run.config.test_curve:
        entry["test_accuracy_info_only"] = candidates[-1]["test_accuracy_info_only"]
    state["history"].append(entry)
    state["epoch"] = epoch
    if run.config.patience and state["since_best"] >= run.config.patience and epoch < state["planned_epochs"]:
        state["stopped_by"] = "early-stopping"
        _logger.info("stopping after epoch %d: no better candidate on validation for %d epochs (--patience)", epoch, state["since_best"])
    save_last(run, clock)
    best = state["best"]
    _logger.info("epoch %d/%d: train loss %.4f acc %.4f (%.1f img/s) | validation accuracy %.4f; best so far: %s (validation %.4f)",
                 epoch, state["planned_epochs"], train_stats["train_loss"], train_stats["train_accuracy"], train_stats["images_per_s"],
                 last_val["accuracy"], describe_candidate(best), best["val_accuracy"])


def _vs_start(entry: dict, c: dict, start_: dict) -> dict:
    """``entry`` with its discordant validation counts against the start (for the record: the rule reads the best only)."""
    a, b = np.asarray(start_["correct"], bool), np.asarray(c["correct"], bool)
    return {**entry, "only_start": int(np.sum(a & ~b)), "only_candidate": int(np.sum(~a & b))}


def out_of_time(run: Run, elapsed: float) -> bool:
    """True when the run stopped (early stopping, the budget), or the next epoch would end past --max-minutes."""
    state, config = run.state, run.config
    if state["stopped_by"]:
        return True
    if config.max_minutes is None:
        return False
    epoch_s, final_s = _epoch_seconds(run), _final_seconds(run)
    if elapsed + epoch_s + final_s <= 60 * config.max_minutes:
        return False
    state["stopped_by"] = "max-minutes"
    _logger.info("stopping after epoch %d of %d: %.1f of --max-minutes %g used, and an epoch takes about %.1f min", state["epoch"],
                 state["planned_epochs"], elapsed / 60, config.max_minutes, epoch_s / 60)
    return True


def _epoch_seconds(run: Run) -> float:
    """The last epoch's seconds, or before any an estimate from the rate at which the start embedded images."""
    trained = [h["seconds"] for h in run.state["history"][1:]]
    if trained:
        return trained[-1]
    rate = run.state["images_per_s"] or 1.0
    passes = (1 + len(parse_alphas(run.config.interpolate))) * (1 + int(run.config.test_curve))
    return epoch_estimate(len(run.images.train), passes * len(run.images.val), rate)


def _final_seconds(run: Run) -> float:
    """The final scoring of the test images (once), estimated from the embedding rate."""
    return len(run.images.test) / (run.state["images_per_s"] or 1.0)


def fit_schedule(run: Run, elapsed: float) -> None:
    """With --max-minutes, before the first epoch (estimated) and after it (measured): end the cosine schedule at the last
    epoch that fits."""
    state, config = run.state, run.config
    measured = len(state["history"]) > 1
    if config.max_minutes is None or state["schedule_fitted"] >= 1 + int(measured):
        return
    state["schedule_fitted"] = 1 + int(measured)
    fits = epochs_that_fit(60 * config.max_minutes, elapsed, _epoch_seconds(run), _final_seconds(run), state["epoch"])
    planned = max(state["epoch"] + 1, min(config.epochs, fits))
    if planned != state["planned_epochs"]:
        state["planned_epochs"] = planned
        run.trainer.scheduler.lr_lambdas[0].total = planned * len(run.loaders["train"])
        _logger.info("--max-minutes %g: about %.1f min per epoch (%s), so %d epochs; the learning-rate schedule ends there",
                     config.max_minutes, _epoch_seconds(run) / 60, "measured" if measured else "estimated", planned)


def finish(run: Run) -> tuple[Decision, dict, dict]:
    """(decision, test metrics, test predictions) of the model the run keeps; best.pt is made that model. The test images
    are scored here only when the kept model is a fine-tuned one: the frozen baseline was scored at the start."""
    state, config, trainer = run.state, run.config, run.trainer
    has_start = state["baseline"] is not None
    n_candidates = sum(len(h.get("candidates", ())) for h in state["history"][1:])
    decision = decide(state["start"] if has_start else None, state["best"], significance=config.significance,
                      n_candidates=n_candidates, start_name=start_name(config))
    _logger.info("%s", decision.reason)
    if decision.kept == "finetuned":
        ckpt = load_checkpoint(run.out / FINETUNED)
        trainer.model.load_state_dict(ckpt["model"])
        test, pred = trainer.evaluate(run.loaders["test"], run.n_classes, state["skipped"])
        save_checkpoint({**ckpt, "kept": "finetuned"}, run.out / "best.pt")
        return decision, {**test, **metric_intervals(pred["y"], pred["pred"])}, pred
    if has_start:
        b = state["baseline_test"]
        pred = {k: np.asarray(b[k]) for k in ("index", "y", "pred")}
        return decision, {k: v for k, v in state["baseline"].items() if k in _SCORES or k.endswith("_ci") or k == "interval_description"}, pred
    trainer.model.load_state_dict(load_checkpoint(run.out / "best.pt")["model"])  # a random start that never trained
    test, pred = trainer.evaluate(run.loaders["test"], run.n_classes, state["skipped"])
    return decision, {**test, **metric_intervals(pred["y"], pred["pred"])}, pred


def _save_model(run: Run, model_state: dict, name: str, **record) -> None:
    save_checkpoint({"model": model_state, "model_name": run.config.model, "class_names": list(run.src.class_names), **record,
                     **provenance()}, run.out / name)


def save_last(run: Run, clock) -> None:
    state, trainer = run.state, run.trainer
    state["wall_seconds"] = clock()
    model_state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    save_checkpoint({"model": model_state, "model_name": run.config.model, "class_names": list(run.src.class_names),
                     "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
                     "scaler": trainer.scaler.state_dict(), "rng": rng_state(run.generator), **state}, run.out / "last.pt")
