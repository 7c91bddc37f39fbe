"""``featx finetune``: setup, train, evaluate, checkpoint, report, as a short list of named steps."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from timm.data import create_transform

from ..device import training_workers
from ..embedder import ImageEmbedder
from ..errors import FeatxError
from ..files import write_json_atomic
from ..provenance import provenance
from ..sources import ImageSource, resolve_source
from ..configs import FinetuneConfig
from ._data import choose_images, make_loader
from ._freezing import apply_freeze
from ._head_init import linear_head_from_dir
from ._loop import Trainer
from ._optim import build_optimizer
from ._rng import rng_state, seed_everything, set_rng_state
from ._run_dir import export_model, load_checkpoint, prepare_run_dir, run_identity, save_checkpoint

__all__ = ["FinetuneResult", "finetune"]

_logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced."""

    out: Path
    metrics: dict  # final metrics, `featx fit-head --json` schema plus fine-tuning fields
    history: list[dict] = field(default_factory=list)  # one entry per epoch
    epochs_done: int = 0
    finished: bool = True
    resumed_from: int = 0  # epochs already done when this call started
    export_dir: Path | None = None

    def to_dict(self) -> dict:
        return dict(self.metrics)

    def summary(self) -> str:
        m = self.metrics
        state = "finished" if self.finished else f"stopped after epoch {self.epochs_done} of {m['epochs']} (rerun with --resume)"
        resumed = f", resumed after epoch {self.resumed_from}" if self.resumed_from else ""
        lines = [
            f"Fine-tuned {m['model']} ({m['head']}) {state}{resumed}: {m['n_train']} training images, "
            f"evaluated on {m['n_test']} ({m['eval_split']}); {m['n_skipped']} unreadable images skipped.",
            f"  accuracy {m['accuracy']:.4f}  balanced accuracy {m['balanced_accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}"
            + (f"  top-5 {m['top5_accuracy']:.4f}" if "top5_accuracy" in m else ""),
            f"  best accuracy {m['best_accuracy']:.4f} at epoch {m['best_epoch']}; "
            f"training {m['fit_seconds']:.1f} s, wall {m['wall_seconds']:.1f} s on {m['device']} ({m['precision']}); "
            f"{m['trainable_params']:,} of {m['total_params']:,} parameters trained",
            f"  run in {self.out}" + (f"; timm export in {self.export_dir}" if self.export_dir else ""),
        ]
        return "\n".join(lines)


@dataclass
class _Run:
    """Everything an epoch loop needs, built once per call."""

    config: FinetuneConfig
    out: Path
    src: ImageSource
    train_idx: np.ndarray
    eval_name: str
    embedder: ImageEmbedder
    trainer: Trainer
    train_loader: torch.utils.data.DataLoader
    eval_loader: torch.utils.data.DataLoader
    generator: torch.Generator
    state: dict  # epoch, history, best, fit_seconds, wall_seconds, skipped: what last.pt carries


def finetune(source: str | ImageSource, config: FinetuneConfig, out: str | os.PathLike) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``source`` into the run folder ``out``."""
    t_start = time.perf_counter()
    config.validate()
    run, resumed_from = _setup(source, config, Path(out))
    wall_before = run.state["wall_seconds"]
    try:
        for epoch in range(run.state["epoch"] + 1, config.epochs + 1):
            _train_and_checkpoint(run, epoch, wall_before, t_start)
    except torch.OutOfMemoryError:
        raise FeatxError(f"out of memory on {run.trainer.device} at batch size {config.batch_size}; rerun with a smaller --batch-size "
                         f"(e.g. {max(1, config.batch_size // 2)}) and --resume") from None
    except KeyboardInterrupt:
        _logger.warning("interrupted during epoch %d; finished epochs are saved in %s, rerun with --resume to continue",
                        run.state["epoch"] + 1, run.out / "last.pt")
        raise
    if not run.state["history"]:
        raise FeatxError(f"the run in '{run.out}' has no finished epoch to report; rerun with --resume")
    metrics = _final_metrics(run, wall_before + time.perf_counter() - t_start)
    write_json_atomic(run.out / "metrics.json", {**metrics, "history": run.state["history"], "skipped": run.state["skipped"]},
                      sort_keys=True)
    export_dir = export_model(run.out, which=config.export) if config.export != "none" else None
    if run.state["skipped"]:
        _logger.warning("%d unreadable images skipped, e.g. %s", len(run.state["skipped"]),
                        "; ".join(f"{run.src.ids[int(i)]}: {r}" for i, r in list(run.state["skipped"].items())[:3]))
    return FinetuneResult(out=run.out, metrics=metrics, history=run.state["history"], epochs_done=run.state["epoch"],
                          resumed_from=resumed_from, export_dir=export_dir)


def _setup(source, config: FinetuneConfig, out: Path) -> tuple[_Run, int]:
    """Images, model (with its initial head and frozen parts), run folder, loaders, optimizer, and the state to start from."""
    src = source if isinstance(source, ImageSource) else resolve_source(source)
    train_idx, test_idx, eval_name = choose_images(src, config)
    embedder = ImageEmbedder(config.model, pretrained=config.pretrained, weights=config.weights, img_size=config.img_size,
                             device=config.device, precision=config.precision, random_state=config.seed).fit()
    model = _headed_model(embedder, src.class_names, config)
    eval_tf = embedder.transform_
    train_tf = create_transform(**embedder.data_config_, is_training=True) if config.augment else eval_tf
    resuming = prepare_run_dir(out, config, _run_info(config, src, embedder, train_tf, eval_tf))
    device = embedder.device_
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    workers = training_workers(device) if config.workers is None else config.workers
    generator = seed_everything(config.seed)
    loader_args = dict(batch_size=config.batch_size, workers=workers, device=device)
    train_loader = make_loader(src, train_idx, train_tf, shuffle=True, generator=generator, **loader_args)
    eval_loader = make_loader(src, test_idx, eval_tf, shuffle=False, **loader_args)
    optimizer, scheduler = build_optimizer(model, config, len(train_loader) * config.epochs)
    trainer = Trainer(model, optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=embedder.precision_ == "fp16"),
                      torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), device, embedder.precision_, config)
    state = {"epoch": 0, "history": [], "best": None, "fit_seconds": 0.0, "wall_seconds": 0.0, "skipped": {}}
    run = _Run(config, out, src, train_idx, eval_name, embedder, trainer, train_loader, eval_loader, generator, state)
    if resuming:
        _restore(run)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _logger.info("%s: training %s of %s parameter values (freeze=%s) on %s (%s), %d steps per epoch", config.model,
                 f"{n_trainable:,}", f"{sum(p.numel() for p in model.parameters()):,}", config.freeze, device,
                 embedder.precision_, len(train_loader))
    return run, run.state["epoch"]


def _headed_model(embedder: ImageEmbedder, class_names: list[str], config: FinetuneConfig) -> torch.nn.Module:
    """The backbone with a classifier over ``class_names`` (from ``--init-head`` when given), frozen as asked."""
    model = embedder.model_
    model.reset_classifier(len(class_names))  # after loading: positional loading needs the headless model
    if config.init_head:
        weight, bias = linear_head_from_dir(config.init_head, class_names, embedder.num_features_, model=config.model,
                                            weights_sha256=embedder.info_.weights_sha256)
        classifier = model.get_classifier()
        if not isinstance(classifier, torch.nn.Linear) or tuple(classifier.weight.shape) != tuple(weight.shape):
            raise FeatxError(f"--init-head: '{config.model}' has no plain linear classifier of shape {tuple(weight.shape)} to initialise")
        with torch.no_grad():
            classifier.weight.copy_(weight)
            classifier.bias.copy_(bias)
    apply_freeze(model, config.freeze)
    return model


def _run_info(config: FinetuneConfig, src: ImageSource, embedder: ImageEmbedder, train_tf, eval_tf) -> dict:
    return {
        "featx_run": "finetune",
        "config": run_identity(config),
        "source": src.name,
        "source_fingerprint": src.fingerprint(),
        "class_names": list(src.class_names),
        "weights_sha256": embedder.info_.weights_sha256,
        "data_config": json.loads(json.dumps(embedder.data_config_, default=list)),
        "train_transform": repr(train_tf),
        "eval_transform": repr(eval_tf),
        **provenance(),
    }


def _restore(run: _Run) -> None:
    ckpt = load_checkpoint(run.out / "last.pt")
    t = run.trainer
    t.model.load_state_dict(ckpt["model"])
    t.optimizer.load_state_dict(ckpt["optimizer"])
    t.scheduler.load_state_dict(ckpt["scheduler"])
    t.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], run.generator)
    run.state = {k: ckpt[k] for k in run.state}
    _logger.info("resuming '%s' after epoch %d of %d", run.out, run.state["epoch"], run.config.epochs)


def _train_and_checkpoint(run: _Run, epoch: int, wall_before: float, t_start: float) -> None:
    """Train epoch ``epoch``, evaluate, and save last.pt (and best.pt when it is the best so far)."""
    state, config, trainer = run.state, run.config, run.trainer
    t_epoch = time.perf_counter()
    train_stats = trainer.train_epoch(run.train_loader, epoch, state["skipped"])
    state["fit_seconds"] += time.perf_counter() - t_epoch
    metrics = trainer.evaluate(run.eval_loader, len(run.src.class_names), state["skipped"])
    state["history"].append({"epoch": epoch, **train_stats, **{f"eval_{k}": v for k, v in metrics.items()},
                             "lr": max(g["lr"] for g in trainer.optimizer.param_groups), "seconds": time.perf_counter() - t_epoch})
    is_best = state["best"] is None or metrics["accuracy"] > state["best"]["accuracy"]
    if is_best:
        state["best"] = {"epoch": epoch, "accuracy": metrics["accuracy"]}
    state["epoch"] = epoch
    state["wall_seconds"] = wall_before + time.perf_counter() - t_start
    model_state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    common = {"model": model_state, "model_name": config.model, "class_names": list(run.src.class_names)}
    if is_best:
        save_checkpoint({**common, "epoch": epoch, "metrics": metrics, **provenance()}, run.out / "best.pt")
    save_checkpoint({**common, "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
                     "scaler": trainer.scaler.state_dict(), "rng": rng_state(run.generator), **state}, run.out / "last.pt")
    _logger.info("epoch %d/%d: train loss %.4f acc %.4f (%.1f img/s) | %s accuracy %.4f%s", epoch, config.epochs,
                 train_stats["train_loss"], train_stats["train_accuracy"], train_stats["images_per_s"], run.eval_name,
                 metrics["accuracy"], " (best)" if is_best else "")


def _final_metrics(run: _Run, wall_seconds: float) -> dict:
    """The fit-head schema plus what the fine-tuning run was."""
    state, config, model = run.state, run.config, run.trainer.model
    last = state["history"][-1]
    train_ok = len(run.train_idx) - len(set(map(int, state["skipped"])) & set(run.train_idx.tolist()))
    metrics = {
        "head": f"finetune:{config.freeze}" + ("+init-head" if config.init_head else ""),
        "model": config.model,
        **{k[len("eval_"):]: v for k, v in last.items() if k.startswith("eval_") and k not in ("eval_loss", "eval_n")},
        "n_train": int(train_ok),
        "n_test": int(last["eval_n"]),
        "fit_seconds": float(state["fit_seconds"]),
        "wall_seconds": float(wall_seconds),
        "epochs": config.epochs,
        "epochs_done": state["epoch"],
        "best_epoch": state["best"]["epoch"],
        "best_accuracy": state["best"]["accuracy"],
        "eval_loss": last["eval_loss"],
        "eval_split": run.eval_name,
        "n_skipped": len(state["skipped"]),
        "weights": run.embedder.info_.weights,
        "weights_sha256": run.embedder.info_.weights_sha256,
        "freeze": config.freeze,
        "init_head": config.init_head,
        "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "total_params": int(sum(p.numel() for p in model.parameters())),
        "img_size": int(run.embedder.data_config_["input_size"][-1]),
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "device": str(run.trainer.device),
        "precision": run.trainer.precision,
        "featx_version": provenance()["featx_version"],
    }
    return metrics
