"""``featx finetune``: setup, train, evaluate, checkpoint, report, as a short list of named steps."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..device import training_workers
from ..embedder import ImageEmbedder
from ..errors import FeatxError
from ..files import write_json_atomic
from ..provenance import provenance
from ..sources import ImageSource, resolve_source
from ..configs import FinetuneConfig
from ._data import RunImages, choose_images, make_loader, training_transform
from ._freezing import apply_freeze
from ._head_init import linear_head_from_dir
from ._loop import Trainer
from ._optim import build_optimizer
from ._probe import fit_probe
from ._report import SCORES, final_metrics, run_summary
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
        return run_summary(self.metrics, self.out, self.export_dir, self.finished, self.resumed_from)


@dataclass
class _Run:
    """Everything an epoch loop needs, built once per call."""

    config: FinetuneConfig
    out: Path
    src: ImageSource
    images: RunImages
    embedder: ImageEmbedder
    trainer: Trainer
    loaders: dict  # train (augmented), probe (training images, eval transform), val, test
    generator: torch.Generator
    state: dict  # epoch, planned_epochs, history, best, baseline, stopped_by, seconds, skipped: what last.pt carries


def finetune(source: str | ImageSource, config: FinetuneConfig, out: str | os.PathLike) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``source`` into the run folder ``out``.

    The classifier starts from a linear probe (or ``init_head``); the epoch (the probe itself included, as epoch 0) is
    chosen on validation images carved from the training split, and the test images are scored once, for the chosen
    model, beside the frozen probe's score on the same images.
    """
    t_start = time.perf_counter()
    config.validate()
    config = _absolute_paths(config)
    run, resumed_from = _setup(source, config, Path(out))
    wall_before = run.state["wall_seconds"]

    def clock() -> float:
        return wall_before + time.perf_counter() - t_start

    try:
        if not run.state["history"]:
            _start(run, clock)
        while run.state["epoch"] < run.state["planned_epochs"] and not _out_of_time(run, clock()):
            _train_and_checkpoint(run, run.state["epoch"] + 1, clock)
        test = _score_chosen(run)
    except torch.OutOfMemoryError:
        raise FeatxError(f"out of memory on {run.trainer.device} at batch size {config.batch_size}; rerun with a smaller --batch-size "
                         f"(e.g. {max(1, config.batch_size // 2)}) and --resume") from None
    except KeyboardInterrupt:
        _logger.warning("interrupted during epoch %d; finished epochs are saved in %s, rerun with --resume to continue",
                        run.state["epoch"] + 1, run.out / "last.pt")
        raise
    metrics = final_metrics(run.config, run.state, test, _facts(run), clock())
    write_json_atomic(run.out / "metrics.json", {**metrics, "history": run.state["history"], "skipped": run.state["skipped"]},
                      sort_keys=True)
    export_dir = export_model(run.out, which=config.export) if config.export != "none" else None
    if run.state["skipped"]:
        _logger.warning("%d unreadable images skipped, e.g. %s", len(run.state["skipped"]),
                        "; ".join(f"{run.src.ids[int(i)]}: {r}" for i, r in list(run.state["skipped"].items())[:3]))
    return FinetuneResult(out=run.out, metrics=metrics, history=run.state["history"], epochs_done=run.state["epoch"],
                          resumed_from=resumed_from, export_dir=export_dir)


def _absolute_paths(config: FinetuneConfig) -> FinetuneConfig:
    """--weights and --init-head as absolute paths, so run.json and --resume mean the same files from any folder."""
    paths = {k: str(Path(v).resolve()) for k in ("weights", "init_head")
             if (v := getattr(config, k)) and v != "package" and Path(v).exists()}
    return replace(config, **paths) if paths else config


def _setup(source, config: FinetuneConfig, out: Path) -> tuple[_Run, int]:
    """Images, model (with its initial head and frozen parts), run folder, loaders, optimizer, and the state to start from."""
    src = source if isinstance(source, ImageSource) else resolve_source(source)
    images = choose_images(src, config)
    embedder = ImageEmbedder(config.model, pretrained=config.pretrained, weights=config.weights, img_size=config.img_size,
                             device=config.device, precision=config.precision, random_state=config.seed).fit()
    model = _headed_model(embedder, src.class_names, config)
    eval_tf = embedder.transform_
    train_tf = training_transform(embedder.data_config_, eval_tf, config.augment)
    resuming = prepare_run_dir(out, config, _run_info(config, src, embedder, train_tf, eval_tf, images))
    device = embedder.device_
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    workers = training_workers(device) if config.workers is None else config.workers
    generator = seed_everything(config.seed)
    args = dict(batch_size=config.batch_size, workers=workers, device=device)
    loaders = {"train": make_loader(src, images.train, train_tf, shuffle=True, generator=generator, **args),
               **{name: make_loader(src, idx, eval_tf, shuffle=False, **args)
                  for name, idx in (("probe", images.train), ("val", images.val), ("test", images.test))}}
    optimizer, scheduler = build_optimizer(model, config, len(loaders["train"]) * config.epochs)
    trainer = Trainer(model, optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=embedder.precision_ == "fp16"),
                      torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), device, embedder.precision_, config)
    state = {"epoch": 0, "planned_epochs": config.epochs, "history": [], "best": None, "baseline": None, "stopped_by": None,
             "schedule_fitted": False, "fit_seconds": 0.0, "wall_seconds": 0.0, "skipped": {}}
    run = _Run(config, out, src, images, embedder, trainer, loaders, generator, state)
    if resuming:
        _restore(run)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _logger.info("%s: training %s of %s parameter values (freeze=%s, BatchNorm statistics %s, augmentation %s) on %s (%s), "
                 "%d steps per epoch; %d training, %d validation, %d test images", config.model, f"{n_trainable:,}",
                 f"{sum(p.numel() for p in model.parameters()):,}", config.freeze, config.bn, config.augment, device,
                 embedder.precision_, len(loaders["train"]), len(images.train), len(images.val), len(images.test))
    return run, run.state["epoch"]


def _headed_model(embedder: ImageEmbedder, class_names: list[str], config: FinetuneConfig) -> torch.nn.Module:
    """The backbone with a classifier over ``class_names`` (from ``--init-head`` when given), frozen as asked."""
    model = embedder.model_
    model.reset_classifier(len(class_names))  # after loading: positional loading needs the headless model
    if config.init_head:
        weight, bias = linear_head_from_dir(config.init_head, class_names, embedder.num_features_, model=config.model,
                                            weights_sha256=embedder.info_.weights_sha256)
        _set_classifier(model, weight, bias, config.model)
    apply_freeze(model, config.freeze)
    return model


def _set_classifier(model: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor, name: str) -> None:
    classifier = model.get_classifier()
    if not isinstance(classifier, torch.nn.Linear) or tuple(classifier.weight.shape) != tuple(weight.shape):
        raise FeatxError(f"'{name}' has no plain linear classifier of shape {tuple(weight.shape)} to start from a linear head; "
                         "pass --no-probe")
    with torch.no_grad():
        classifier.weight.copy_(weight.to(classifier.weight.device))
        classifier.bias.copy_(bias.to(classifier.bias.device))


def _run_info(config: FinetuneConfig, src: ImageSource, embedder: ImageEmbedder, train_tf, eval_tf, images: RunImages) -> dict:
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
        "images": {"train": len(images.train), "val": len(images.val), "test": len(images.test),
                   "test_split": images.eval_description, "val_split": images.val_description},
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
    run.state = {k: ckpt.get(k, v) for k, v in run.state.items()}
    _logger.info("resuming '%s' after epoch %d of %d", run.out, run.state["epoch"], run.state["planned_epochs"])


def _start(run: _Run, clock) -> None:
    """Epoch 0: the classifier from the linear probe, scored on validation (a candidate like every epoch) and on the
    test images (the frozen baseline, reported, never used to choose); checkpointed so a resumed run skips it."""
    config, trainer, state = run.config, run.trainer, run.state
    t0 = time.perf_counter()
    probe = None
    if not config.init_head and config.probe:
        X, y = trainer.embed(run.loaders["probe"], state["skipped"])
        weight, bias, probe = fit_probe(X, y, len(run.src.class_names), seed=config.seed, device=str(trainer.device))
        _set_classifier(trainer.model, weight, bias, config.model)
    n_classes = len(run.src.class_names)
    val = trainer.evaluate(run.loaders["val"], n_classes, state["skipped"])
    start = "init-head" if config.init_head else "probe" if probe else "random"
    if start != "random":
        test = trainer.evaluate(run.loaders["test"], n_classes, state["skipped"])
        state["baseline"] = {"start": start, **(probe or {"head": config.init_head}), "seconds": time.perf_counter() - t0,
                             "val_accuracy": val["accuracy"], **{k: test[k] for k in SCORES if k in test}}
        _logger.info("frozen %s: validation accuracy %.4f, test accuracy %.4f (%.1f s)", "linear probe" if probe else "--init-head",
                     val["accuracy"], test["accuracy"], state["baseline"]["seconds"])
    state["history"].append({"epoch": 0, **{f"val_{k}": v for k, v in val.items()}, "seconds": time.perf_counter() - t0})
    state["best"] = {"epoch": 0, "val_accuracy": val["accuracy"]}
    _save(run, clock, best=True, val=val)


def _out_of_time(run: _Run, elapsed: float) -> bool:
    """True once --max-minutes is used up and at least one epoch is trained (the budget decides when, not whether, to train)."""
    if run.state["stopped_by"]:
        return True
    if run.config.max_minutes is None or elapsed < 60 * run.config.max_minutes or run.state["epoch"] == 0:
        return False
    run.state["stopped_by"] = "max-minutes"
    _logger.info("stopping after epoch %d of %d: %.1f of --max-minutes %g used", run.state["epoch"], run.state["planned_epochs"],
                 elapsed / 60, run.config.max_minutes)
    return True


def _fit_schedule(run: _Run, elapsed: float, epoch_seconds: float) -> None:
    """With --max-minutes, after the first epoch: end the cosine schedule at the epoch that will cross the budget."""
    state, config = run.state, run.config
    if config.max_minutes is None or state["schedule_fitted"]:
        return
    state["schedule_fitted"] = True
    fits = state["epoch"] + max(0, math.ceil((60 * config.max_minutes - elapsed) / max(epoch_seconds, 1e-9)))
    if fits < state["planned_epochs"]:
        state["planned_epochs"] = fits
        run.trainer.scheduler.lr_lambdas[0].total = fits * len(run.loaders["train"])
        _logger.info("--max-minutes %g: about %.1f min per epoch, so %d epochs; the learning-rate schedule ends there",
                     config.max_minutes, epoch_seconds / 60, fits)


def _train_and_checkpoint(run: _Run, epoch: int, clock) -> None:
    """Train epoch ``epoch``, score it on validation, and save last.pt (and best.pt when validation says it is the best)."""
    state, config, trainer = run.state, run.config, run.trainer
    t_epoch = time.perf_counter()
    train_stats = trainer.train_epoch(run.loaders["train"], epoch, state["skipped"], state["planned_epochs"])
    state["fit_seconds"] += time.perf_counter() - t_epoch
    n_classes = len(run.src.class_names)
    val = trainer.evaluate(run.loaders["val"], n_classes, state["skipped"])
    entry = {"epoch": epoch, **train_stats, **{f"val_{k}": v for k, v in val.items()},
             "lr": max(g["lr"] for g in trainer.optimizer.param_groups)}
    if config.test_curve:  # information only: nothing reads it to choose
        entry["test_accuracy_info_only"] = trainer.evaluate(run.loaders["test"], n_classes, state["skipped"])["accuracy"]
    entry["seconds"] = time.perf_counter() - t_epoch
    state["history"].append(entry)
    is_best = val["accuracy"] > state["best"]["val_accuracy"]
    if is_best:
        state["best"] = {"epoch": epoch, "val_accuracy": val["accuracy"]}
    state["epoch"] = epoch
    _fit_schedule(run, clock(), entry["seconds"])
    _save(run, clock, best=is_best, val=val)
    _logger.info("epoch %d/%d: train loss %.4f acc %.4f (%.1f img/s) | validation accuracy %.4f%s", epoch, state["planned_epochs"],
                 train_stats["train_loss"], train_stats["train_accuracy"], train_stats["images_per_s"], val["accuracy"],
                 " (best so far)" if is_best else "")


def _save(run: _Run, clock, *, best: bool, val: dict) -> None:
    state, trainer = run.state, run.trainer
    state["wall_seconds"] = clock()
    model_state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    common = {"model": model_state, "model_name": run.config.model, "class_names": list(run.src.class_names)}
    if best:
        save_checkpoint({**common, "epoch": state["epoch"], "val_metrics": val, **provenance()}, run.out / "best.pt")
    save_checkpoint({**common, "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
                     "scaler": trainer.scaler.state_dict(), "rng": rng_state(run.generator), **state}, run.out / "last.pt")


def _score_chosen(run: _Run) -> dict:
    """The test images scored once, by the epoch chosen on validation (best.pt)."""
    model = run.trainer.model
    if run.state["best"]["epoch"] != run.state["epoch"]:
        model.load_state_dict(load_checkpoint(run.out / "best.pt")["model"])
    return run.trainer.evaluate(run.loaders["test"], len(run.src.class_names), run.state["skipped"])


def _facts(run: _Run) -> dict:
    """What final_metrics needs to know about this run besides its config and state."""
    model, images = run.trainer.model, run.images
    skipped = set(map(int, run.state["skipped"]))
    return {"n_train": int(len(set(images.train.tolist()) - skipped)), "n_val": int(len(set(images.val.tolist()) - skipped)),
            "eval_split": images.eval_split, "eval_split_description": images.eval_description,
            "val_split_description": images.val_description,
            "weights": run.embedder.info_.weights, "weights_sha256": run.embedder.info_.weights_sha256,
            "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
            "total_params": int(sum(p.numel() for p in model.parameters())),
            "img_size": int(run.embedder.data_config_["input_size"][-1]), "device": str(run.trainer.device),
            "precision": run.trainer.precision}
