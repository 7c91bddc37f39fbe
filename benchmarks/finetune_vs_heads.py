"""Fine-tuning against frozen heads, line for line, with the real EfficientNet-Lite0 weights.

For each data set (CIFAR-10 from ../shared/data, Fashion-MNIST from the Debian package) this
runs, on the same images and resolution:

1. frozen head: ``featx extract`` features + ``featx fit-head --head logreg --sweep`` (C chosen on a validation part);
2. ``featx finetune`` with its default recipe (a linear probe fitted on the fly, BatchNorm statistics frozen, flips,
   AdamW 3e-4, random resized crops, the epoch chosen on a validation part of the training images): only --model, --weights, --img-size;
3. (quick mode) the same recipe on the last two stages only (``--freeze stages:2``) and on the classifier only;

and writes one table to RESULTS.md: accuracy on the same test images, wall time, and accuracy points gained over
the frozen head per CPU- (or GPU-) minute. Default mode: 500 training and 100 test images per class at 128 px
(about 10 minutes per data set on a 2-core CPU). ``--quick``: 100 / 30 per class at 64 px, 2 epochs, a few minutes.
``--experiments``: the recipe search (one change at a time from the prototype's recipe, on 200 / 100 CIFAR-10 images per
class) that chose the defaults, written to its own section.

    python benchmarks/finetune_vs_heads.py                       # default mode, both data sets
    python benchmarks/finetune_vs_heads.py --experiments         # the recipe table
    python benchmarks/finetune_vs_heads.py --full                # GPU: all images at 224 px

Rows are kept per data set (benchmarks/_cache/finetune_vs_heads/rows-*.json), so a table written after a second
call (one data set each) holds both data sets.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, CIFAR_TAR, cifar10_dir, command_line, lite0_weights, write_section  # noqa: E402

from featx import ExtractConfig, FinetuneConfig, FitHeadConfig, extract, finetune, fit_head  # noqa: E402
from featx.device import resolve_device  # noqa: E402
from featx.finetuning._run_dir import run_identity  # noqa: E402
from featx.sources import ImageSource, resolve_source  # noqa: E402

MODEL = "tf_efficientnet_lite0"
WORK = CACHE / "finetune_vs_heads"
ANCHOR = ("Anchor (the Keras recipe this project started from): a frozen VGG16 with a dense head reaches 78.5% on CIFAR-10, "
          "80.5% after unfreezing its last layers.")


def subset(src: ImageSource, per_class: dict[str, int | None], seed: int = 0) -> ImageSource:
    """The first ``per_class[split]`` images of every class in each split, after a seeded shuffle (None: all)."""
    rng = np.random.default_rng(seed)
    splits = np.asarray(src.splits)
    keep = []
    for split, n in per_class.items():
        for c in range(len(src.class_names)):
            members = np.flatnonzero((splits == split) & (src.labels == c))
            keep += members.tolist() if n is None else rng.permutation(members)[:n].tolist()
    return src.subset(sorted(keep))


def frozen_head(src: ImageSource, name: str, args, device: str) -> tuple[dict, Path, float]:
    """``featx extract`` + ``featx fit-head --head logreg --sweep``; returns (metrics, head dir, seconds incl. extraction)."""
    t0 = time.perf_counter()
    store = WORK / f"{name}-{args.img_size}.h5"
    store.unlink(missing_ok=True)  # timed from scratch, like the fine-tune runs
    extract(src, ExtractConfig(model=MODEL, weights=lite0_weights(), img_size=args.img_size, device=device,
                               batch_size=args.batch_size * 2, workers=args.workers, progress=not args.no_progress), store)
    t_extract = time.perf_counter() - t0
    head_dir = WORK / f"{name}-{args.img_size}-logreg"
    fitted = fit_head(store, FitHeadConfig(head="logreg", sweep=True, model=MODEL, device=device, seed=args.seed, overwrite=True,
                                           progress=False), head_dir)
    seconds = time.perf_counter() - t0
    metrics = {**fitted.to_dict(), "extract_seconds": t_extract, "wall_seconds": seconds, "head": "logreg (frozen, swept)"}
    return metrics, head_dir, seconds


def warm_up(device: str, img_size: int) -> None:
    """A few training steps so one-time costs (CUDA context, cuDNN autotuning, allocator) are not timed."""
    from featx.device import autocast_context, resolve_precision

    dev = resolve_device(device)
    model = timm.create_model(MODEL, num_classes=10).to(dev).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(8, 3, img_size, img_size, device=dev).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        with autocast_context(dev, resolve_precision("auto", dev)):
            loss = model(x).float().logsumexp(1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _finetune_row(src: ImageSource, name: str, label: str, config: FinetuneConfig, reuse: bool = False) -> dict:
    """One fine-tune run's metrics; with ``reuse``, a finished run of the same options in its folder is read back."""
    out = WORK / "runs" / f"{name}-{re.sub('[^a-z0-9]+', '-', label.lower())[:60]}"
    if reuse and (out / "metrics.json").is_file() and json.loads((out / "run.json").read_text())["config"] == run_identity(config):
        m = json.loads((out / "metrics.json").read_text())
        m.pop("history", None), m.pop("skipped", None)
        logging.info("%s / %s: read back from %s", name, label, out)
        return {"method": label, **m, "reused": True}
    m = dict(finetune(src, config, out).metrics)
    logging.info("%s / %s: accuracy %.4f (frozen start %s) in %.1f s", name, label, m["accuracy"],
                 f"{m['baseline']['accuracy']:.4f}" if m.get("baseline") else "-", m["wall_seconds"])
    return {"method": label, **m}


def variants(args) -> list[tuple[str, dict]]:
    """(label, FinetuneConfig overrides): only what the mode needs beyond model, weights and resolution."""
    budget = {} if args.epochs is None else {"epochs": args.epochs}
    rows = [("default recipe (featx finetune)", dict(budget))]
    if args.mode == "quick":
        rows += [("default recipe, last 2 stages (--freeze stages:2)", dict(budget, freeze="stages:2")),
                 ("default recipe, classifier only (--freeze all)", dict(budget, freeze="all"))]
    return rows


def run_dataset(name: str, src: ImageSource, args, device: str) -> list[dict]:
    logging.info("%s: %d images (%s)", name, len(src), ", ".join(f"{s} {src.splits.count(s)}" for s in src.split_names))
    rows = []
    frozen, head_dir, frozen_seconds = frozen_head(src, name, args, device)
    rows.append({"method": "frozen features + swept logreg", **frozen})
    common = dict(model=MODEL, weights=lite0_weights(), img_size=args.img_size, device=device, workers=args.workers,
                  progress=not args.no_progress, export="none", overwrite=True, seed=args.seed)
    for label, overrides in variants(args):
        rows.append(_finetune_row(src, name, label, FinetuneConfig(**{**common, **overrides})))
    base, base_seconds = frozen["accuracy"], frozen["wall_seconds"]
    for r in rows:
        r["dataset"] = name
        r["gain_points"] = 100 * (r["accuracy"] - base)
        timed = r.get("wall_seconds") and r is not rows[0]
        r["points_per_minute"] = r["gain_points"] / (r["wall_seconds"] / 60) if timed else None
        r["time_ratio"] = r["wall_seconds"] / base_seconds if timed else None
    return rows


def markdown(runs: dict, unit: str) -> str:
    """One table over every data set in ``runs`` ({dataset: {'rows', 'command', 'setup', 'seconds'}})."""
    lines = ["## Fine-tuning vs frozen heads (`benchmarks/finetune_vs_heads.py`, EfficientNet-Lite0, real ImageNet weights)", ""]
    for name, run in runs.items():
        lines.append(f"- {name}: `{run['command']}` ({run['seconds'] / 60:.1f} min): {run['setup']}")
    lines += [
        "",
        "Gain = accuracy points over the frozen swept logreg head on the same test images (scored once). Time = wall time of "
        "the method (frozen head: extraction + sweep + refit; fine-tune: its own linear probe, every epoch and the final "
        f"scoring), also as a multiple of the frozen head's. Per {unit}-minute = gain / wall minutes. Frozen start = the "
        "fine-tune's own linear probe (fitted on 90% of the training images) on the same test images; chosen epoch = the "
        "one with the best accuracy on the other 10% (0 would be the probe itself).",
        "",
        f"| data set | method | train / val / test | accuracy | frozen start | chosen epoch | wall time | x frozen time | "
        f"gain (points) | points per {unit}-minute |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        for r in run["rows"]:
            frozen = r["method"].startswith("frozen features")
            ppm = "baseline" if frozen else ("-" if r.get("points_per_minute") is None else f"{r['points_per_minute']:+.2f}")
            ratio = "1.0" if frozen else ("-" if r.get("time_ratio") is None else f"{r['time_ratio']:.1f}")
            start = f"{100 * r['baseline']['accuracy']:.2f}%" if r.get("baseline") else "-"
            epoch = "-" if frozen else f"{r['best_epoch']} of {r['epochs_done']}"
            sizes = f"{r.get('n_train', '?')} / {r.get('n_val', '-')} / {r.get('n_test', '?')}"
            lines.append(f"| {name} | {r['method']} | {sizes} | {100 * r['accuracy']:.2f}% | {start} | {epoch} | "
                         f"{r['wall_seconds']:.0f} s | {ratio} | {r['gain_points']:+.2f} | {ppm} |")
    lines += ["", ANCHOR]
    if any(run["mode"] == "quick" for run in runs.values()):
        lines.append("Quick mode trains on a small subset at low resolution for a few epochs: its numbers show that every method runs "
                     "and what each costs, not the accuracy a full run reaches.")
    return "\n".join(lines)


# The recipe the search started from (the prototype of issue 10); featx finetune's defaults are what won (lr 3e-4, crops).
START = dict(probe=True, bn="frozen", augment="flip", lr=1e-4, layer_decay=None, label_smoothing=0.0, head_lr_scale=1.0)
EXPERIMENTS = [  # (label, overrides of START): one change at a time, then the winners together
    ("start: probe start, BatchNorm statistics frozen, flips, AdamW 1e-4, no layer decay, no label smoothing", {}),
    ("BatchNorm statistics re-estimated (--bn train)", dict(bn="train")),
    ("random classifier start (--no-probe)", dict(probe=False)),
    ("featx 0.1.0 recipe: random start, lr 1e-3, layer decay 0.8, label smoothing 0.1, timm augmentation, BN re-estimated",
     dict(probe=False, lr=1e-3, layer_decay=0.8, label_smoothing=0.1, augment="timm", bn="train")),
    ("lr 3e-4", dict(lr=3e-4)),
    ("lr 3e-5", dict(lr=3e-5)),
    ("classifier at 10x the lr (--head-lr-scale 10)", dict(head_lr_scale=10.0)),
    ("layer decay 0.8", dict(layer_decay=0.8)),
    ("random resized crops >= 35% + flips (--augment crop)", dict(augment="crop")),
    ("timm's ImageNet augmentation (--augment timm)", dict(augment="timm")),
    ("no augmentation (--augment none)", dict(augment="none")),
    # second round: the two changes that helped, together, and a step further
    ("lr 3e-4 + random resized crops (--lr 3e-4 --augment crop)", dict(lr=3e-4, augment="crop")),
    ("lr 1e-3", dict(lr=1e-3)),
    ("lr 3e-4, 4 epochs", dict(lr=3e-4, epochs=4)),
]


def experiments(args, device: str) -> str:
    """The recipe search: every variant of EXPERIMENTS on the same CIFAR-10 subset, epochs and resolution, one run."""
    src = subset(resolve_source(cifar10_dir(args.cifar_tar)), {"train": args.train_per_class, "test": args.test_per_class}, args.seed)
    common = dict(model=MODEL, weights=lite0_weights(), img_size=args.img_size, epochs=args.epochs, device=device, workers=args.workers,
                  progress=not args.no_progress, export="none", overwrite=True, seed=args.seed)
    rows = [_finetune_row(src, "cifar10-experiment", label, FinetuneConfig(**{**common, **START, **o}), reuse=True)
            for label, o in EXPERIMENTS]
    reused = sum(bool(r.get("reused")) for r in rows)
    lines = ["## Fine-tuning recipe search (`benchmarks/finetune_vs_heads.py --experiments`)", "",
             f"Command: `{command_line()}` ({sum(r['wall_seconds'] for r in rows) / 60:.1f} min of runs, {device}, {torch.get_num_threads()} threads). "
             f"CIFAR-10, {args.train_per_class} training and {args.test_per_class} test images per class, EfficientNet-Lite0 "
             f"(real ImageNet weights) at {args.img_size} px, {args.epochs} epochs, batch 32: one change at a time from the start "
             "(the first row), then the changes that helped, together. featx finetune's defaults are the best row at the search's "
             "2 epochs (lr 3e-4 with random resized crops), over 5 epochs by default (the last row: more epochs keep paying). "
             "Frozen start = the run's own linear probe on the same test images; chosen epoch on the validation part "
             "(10% of the training images); test accuracy of the chosen model, scored once."
             + (f" {reused} of the {len(rows)} rows were read back from an earlier invocation of the same command (same options, "
                "same machine, same day): the script reruns only variants it has no finished run of." if reused else ""), "",
             "| variant | frozen start | chosen epoch | test accuracy | gain over its start (points) | wall time |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        start = f"{100 * r['baseline']['accuracy']:.2f}%" if r.get("baseline") else "-"
        gain = f"{r['gain_points']:+.2f}" if r.get("gain_points") is not None else "-"
        lines.append(f"| {r['method']} | {start} | {r['best_epoch']} of {r['epochs_done']} | {100 * r['accuracy']:.2f}% | {gain} | "
                     f"{r['wall_seconds']:.0f} s |")
    return "\n".join(lines)


MODES = {  # train / test images per class, px, epochs (None: featx finetune's default), batch of the frozen extraction
    "quick": dict(train_per_class=100, test_per_class=30, img_size=64, epochs=2, batch_size=32),
    "default": dict(train_per_class=500, test_per_class=100, img_size=128, epochs=None, batch_size=32),
    "experiments": dict(train_per_class=200, test_per_class=100, img_size=96, epochs=2, batch_size=32),
    "full": dict(train_per_class=None, test_per_class=None, img_size=224, epochs=None, batch_size=128),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick", help="small subset, 64 px, 2 epochs")
    mode.add_argument("--experiments", action="store_const", dest="mode", const="experiments", help="the recipe search table")
    mode.add_argument("--full", action="store_const", dest="mode", const="full", help="all images at 224 px (a GPU's job)")
    p.add_argument("--datasets", default="cifar10,fashion-mnist")
    p.add_argument("--train-per-class", type=int, help="training images per class (default: the mode's)")
    p.add_argument("--test-per-class", type=int, help="test images per class (default: the mode's)")
    p.add_argument("--img-size", type=int, help="input resolution (default: the mode's)")
    p.add_argument("--epochs", type=int, help="default: the mode's (default mode: featx finetune's own default)")
    p.add_argument("--batch-size", type=int, help="batch of the frozen extraction (default: the mode's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, help="decoding workers (default: featx's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cifar-tar", default=str(CIFAR_TAR))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print the table instead of writing RESULTS.md")
    args = p.parse_args(argv)
    args.mode = args.mode or "default"
    for k, v in MODES[args.mode].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = resolve_device(args.device)
    WORK.mkdir(parents=True, exist_ok=True)
    warm_up(str(device), args.img_size)
    if args.mode == "experiments":
        text = experiments(args, str(device))
        print(text)
        if not args.no_write:
            write_section("finetune_recipe", text)
        return 0
    results, dataset_seconds = [], {}
    datasets = args.datasets.split(",")
    for name in datasets:
        if name == "cifar10":
            src = resolve_source(cifar10_dir(args.cifar_tar))
        elif name == "fashion-mnist":
            src = resolve_source("fashion-mnist")
        else:
            raise SystemExit(f"unknown data set '{name}'; use cifar10 and/or fashion-mnist")
        src = subset(src, {"train": args.train_per_class, "test": args.test_per_class}, seed=args.seed)
        t_dataset = time.perf_counter()
        results += run_dataset(name, src, args, str(device))
        dataset_seconds[name] = time.perf_counter() - t_dataset
    # each data set's rows are kept, so runs can be split over several calls (one data set each)
    signature = f"{args.mode}-{args.img_size}px-{args.epochs}ep-{args.train_per_class}-{args.test_per_class}"
    store = WORK / f"rows-{signature}.json"
    runs = json.loads(store.read_text()) if store.exists() else {}
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    ft = next(r for r in results if r["method"].startswith("default recipe"))
    setup = (f"{device} ({hw}), {ft['precision']}; {args.img_size} px, {ft['epochs']} epochs, batch {ft['batch_size']}, AdamW lr "
             f"{ft['lr']:g}, warm-up 10% + cosine, BatchNorm statistics {ft['bn']}, augmentation {ft['augment']}, linear-probe start")
    for name in datasets:
        runs[name] = {"rows": [r for r in results if r["dataset"] == name], "command": command_line(), "setup": setup,
                      "seconds": dataset_seconds[name], "mode": args.mode}
    store.write_text(json.dumps(runs, indent=2, default=str))
    text = markdown(runs, "GPU" if device.type == "cuda" else "CPU")
    print(text)
    if not args.no_write:
        write_section("finetune", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
