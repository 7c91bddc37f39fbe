"""``featx finetune``: setup, train, evaluate, checkpoint, report, as a short list of named steps."""

from __future__ import annotations

import json
import logging
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
from ._freezing import apply_freeze, resolve_freeze
from ._head_init import linear_head_from_dir
from ._loop import Trainer
from ._optim import build_optimizer
from ._report import final_metrics, run_summary, write_test_predictions
from ._rng import seed_everything, set_rng_state
from ._run_dir import export_model, load_checkpoint, prepare_run_dir, run_identity
from ._steps import FINETUNED, Run, finish, fit_schedule, new_state, out_of_time, set_classifier, start, train_and_checkpoint

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


def finetune(source: str | ImageSource, config: FinetuneConfig, out: str | os.PathLike) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``source`` into the run folder ``out``.

    The classifier starts from a linear probe (or ``init_head``). Every epoch, and its interpolations toward the
    start, is scored on validation images carved from the training split; the best replaces the frozen start only when
    it beats it there by more than noise (:mod:`featx.finetuning._decision`). The test images are scored once for the
    model kept, beside the frozen probe's score on the same images.
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
            start(run, clock)
        while run.state["epoch"] < run.state["planned_epochs"]:
            fit_schedule(run, clock())
            if run.state["epoch"] >= run.state["planned_epochs"] or out_of_time(run, clock()):
                break
            train_and_checkpoint(run, run.state["epoch"] + 1, clock)
        decision, test, predictions = finish(run)
    except torch.OutOfMemoryError:
        raise FeatxError(f"out of memory on {run.trainer.device} at batch size {config.batch_size}; rerun with a smaller --batch-size "
                         f"(e.g. {max(1, config.batch_size // 2)}) and --resume") from None
    except KeyboardInterrupt:
        _logger.warning("interrupted during epoch %d; finished epochs are saved in %s, rerun with --resume to continue",
                        run.state["epoch"] + 1, run.out / "last.pt")
        raise
    predictions_file = write_test_predictions(run.out, run.src, predictions, run.state["baseline_test"])
    metrics = final_metrics(run.config, run.state, decision, test, predictions, _facts(run), clock())
    metrics["test_predictions"] = predictions_file.name
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


def _setup(source, config: FinetuneConfig, out: Path) -> tuple[Run, int]:
    """Images, model (with its initial head and frozen parts), run folder, loaders, optimizer, and the state to start from."""
    src = source if isinstance(source, ImageSource) else resolve_source(source)
    images = choose_images(src, config)
    embedder = ImageEmbedder(config.model, pretrained=config.pretrained, weights=config.weights, img_size=config.img_size,
                             device=config.device, precision=config.precision, random_state=config.seed).fit()
    given = config  # run.json keeps the options as given (--freeze auto); the run works with them made concrete
    config = replace(config, freeze=resolve_freeze(config.freeze, len(images.train) + len(images.val), embedder.model_))
    model = _headed_model(embedder, src.class_names, config)
    eval_tf = embedder.transform_
    train_tf = training_transform(embedder.data_config_, eval_tf, config.augment)
    resuming = prepare_run_dir(out, given, _run_info(given, src, embedder, train_tf, eval_tf, images))
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
    run = Run(config, out, src, images, embedder, trainer, loaders, generator, new_state(config))
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
        set_classifier(model, weight, bias, config.model)
    apply_freeze(model, config.freeze)
    return model


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


def _restore(run: Run) -> None:
    """The state of last.pt, the frozen start rebuilt (pretrained backbone, the start's classifier), the best candidate
    from finetuned.pt's own record (it is written before last.pt, so it is the later of the two)."""
    from ._freezing import classifier_keys
    from ._interpolation import snapshot

    ckpt = load_checkpoint(run.out / "last.pt")
    t = run.trainer
    pretrained = snapshot(t.model)
    t.model.load_state_dict(ckpt["model"])
    t.optimizer.load_state_dict(ckpt["optimizer"])
    t.scheduler.load_state_dict(ckpt["scheduler"])
    t.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], run.generator)
    run.state = {k: ckpt.get(k, v) for k, v in run.state.items()}
    if run.state["start_head"] is not None:
        run.start_state = {**pretrained, **dict(zip(classifier_keys(t.model), run.state["start_head"]))}
    if (run.out / FINETUNED).is_file():
        run.state["best"] = load_checkpoint(run.out / FINETUNED).get("candidate", run.state["best"])
    _logger.info("resuming '%s' after epoch %d of %d", run.out, run.state["epoch"], run.state["planned_epochs"])


def _facts(run: Run) -> dict:
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
