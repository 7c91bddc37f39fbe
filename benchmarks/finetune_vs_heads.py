"""Fine-tuning against frozen heads, line for line, with the real EfficientNet-Lite0 weights.

For each data set (CIFAR-10 from ../shared/data, Fashion-MNIST from the Debian package) this
runs, on the same images and resolution:

1. frozen head: ``featx extract`` features + ``featx fit-head --head logreg`` (standardise + logistic regression);
   the best head of ``benchmarks/heads.py`` is shown too when its cached results match;
2. head-only training (``--freeze all``);
3. last-stages fine-tune (``--freeze stages:2``);
4. full fine-tune (``--freeze none``);
5. linear probe, then fine-tune (``--init-head`` from row 1's head, ``--freeze none``).

and writes one table to RESULTS.md: accuracy, wall time, and accuracy points gained over the
frozen head per device-minute. ``--quick`` runs a small subset at a small resolution for three
epochs, so the whole script fits in a few minutes on a 2-core CPU; the full run (all images,
224 px, 5 epochs, bf16) needs a GPU.

    python benchmarks/finetune_vs_heads.py --quick
    python benchmarks/finetune_vs_heads.py            # on a GPU machine, or one data set per call:
    python benchmarks/finetune_vs_heads.py --datasets cifar10 && python benchmarks/finetune_vs_heads.py --datasets fashion-mnist

Rows are kept per data set (benchmarks/_cache/finetune_vs_heads/rows-*.json), so the table after
the second call holds both data sets.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
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
from featx.sources import ImageSource, resolve_source  # noqa: E402

MODEL = "tf_efficientnet_lite0"
WORK = CACHE / "finetune_vs_heads"
HEADS_RESULTS = CACHE / "heads" / "results.json"  # written by benchmarks/heads.py, when it has run
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
    """``featx extract`` + ``featx fit-head --head logreg``; returns (metrics, head dir, seconds incl. extraction)."""
    t0 = time.perf_counter()
    store = WORK / f"{name}-{args.img_size}.h5"
    store.unlink(missing_ok=True)  # timed from scratch, like the fine-tune runs
    extract(src, ExtractConfig(model=MODEL, weights=lite0_weights(), img_size=args.img_size, device=device,
                               batch_size=args.batch_size * 2, workers=args.workers, progress=not args.no_progress), store)
    t_extract = time.perf_counter() - t0
    head_dir = WORK / f"{name}-{args.img_size}-logreg"
    fitted = fit_head(store, FitHeadConfig(head="logreg", model=MODEL, device=device, seed=args.seed, overwrite=True), head_dir)
    seconds = time.perf_counter() - t0
    metrics = {**fitted.to_dict(), "extract_seconds": t_extract, "wall_seconds": seconds, "head": "logreg (frozen)"}
    return metrics, head_dir, seconds


def heads_benchmark_best(dataset: str, img_size: int, n_train: int, n_test: int) -> dict | None:
    """Best head of benchmarks/heads.py on the same images and resolution, if it cached its rows.

    Reads ``HEADS_RESULTS``: a list of rows (or ``{"rows": [...], "img_size": N}``) with at least
    dataset, head, accuracy; rows of other data sets, sizes, resolutions or raw-pixel features are ignored.
    """
    if not HEADS_RESULTS.is_file():
        return None
    try:
        doc = json.loads(HEADS_RESULTS.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    rows = doc.get("rows", []) if isinstance(doc, dict) else doc
    size = doc.get("img_size") if isinstance(doc, dict) else None
    rows = [r for r in rows if isinstance(r, dict) and "accuracy" in r and r.get("dataset") == dataset
            and r.get("features", "lite0") == "lite0" and r.get("img_size", size) == img_size
            and r.get("n_train") == n_train and r.get("n_test") == n_test]
    return max(rows, key=lambda r: r["accuracy"]) if rows else None


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


def run_dataset(name: str, src: ImageSource, args, device: str) -> list[dict]:
    logging.info("%s: %d images (%s)", name, len(src), ", ".join(f"{s} {src.splits.count(s)}" for s in src.split_names))
    rows = []
    frozen, head_dir, frozen_seconds = frozen_head(src, name, args, device)
    rows.append({"method": "frozen features + logreg", **frozen})
    cached = heads_benchmark_best(name, args.img_size, frozen["n_train"], frozen["n_test"])
    if cached:
        rows.append({"method": f"best frozen head of heads.py ({cached.get('head')})", **cached, "from_cache": True})
    common = dict(model=MODEL, weights=lite0_weights(), img_size=args.img_size, epochs=args.epochs, batch_size=args.batch_size,
                  lr=args.lr, device=device, workers=args.workers, progress=not args.no_progress, export="none",
                  overwrite=True, seed=args.seed)
    variants = [
        ("head only (--freeze all)", dict(freeze="all", lr=args.head_lr)),
        ("last 2 stages (--freeze stages:2)", dict(freeze="stages:2")),
        ("full fine-tune (--freeze none)", dict(freeze="none")),
        ("linear probe, then fine-tune (--init-head)", dict(freeze="none", init_head=str(head_dir))),
    ]
    for label, overrides in variants:
        out = WORK / "runs" / f"{name}-{overrides['freeze'].replace(':', '')}{'-lpft' if 'init_head' in overrides else ''}"
        result = finetune(src, FinetuneConfig(**{**common, **overrides}), out)
        m = dict(result.metrics)
        if "init_head" in overrides:  # the linear probe is part of this method's cost
            m["wall_seconds"] += frozen_seconds
        rows.append({"method": label, **m})
        logging.info("%s / %s: accuracy %.4f in %.1f s", name, label, m["accuracy"], m["wall_seconds"])
    base, base_seconds = frozen["accuracy"], frozen["wall_seconds"]
    for r in rows:
        r["dataset"] = name
        r["gain_points"] = 100 * (r["accuracy"] - base)
        timed = r.get("wall_seconds") and r is not rows[0] and not r.get("from_cache")
        r["points_per_minute"] = r["gain_points"] / (r["wall_seconds"] / 60) if timed else None
        r["time_ratio"] = r["wall_seconds"] / base_seconds if timed else None
    return rows


def markdown(runs: dict, unit: str) -> str:
    """One table over every data set in ``runs`` ({dataset: {'rows', 'command', 'setup', 'seconds'}})."""
    lines = [
        "## Fine-tuning vs frozen heads (`benchmarks/finetune_vs_heads.py`, EfficientNet-Lite0, real ImageNet weights)",
        "",
    ]
    for name, run in runs.items():
        lines.append(f"- {name}: `{run['command']}` ({run['seconds'] / 60:.1f} min): {run['setup']}")
    lines += [
        "",
        f"Gain = accuracy points over the frozen logreg head on the same images. Time = wall time of the method "
        f"(frozen head: extraction + fit; linear probe then fine-tune: the probe's time included), also as a multiple of the "
        f"frozen head's. Per {unit}-minute = gain / wall minutes.",
        "",
        f"| data set | method | train / test | accuracy | wall time | x frozen time | gain (points) | points per {unit}-minute |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        for r in run["rows"]:
            frozen = r["method"].startswith("frozen features")
            ppm = "baseline" if frozen else ("-" if r.get("points_per_minute") is None else f"{r['points_per_minute']:+.2f}")
            wall = f"{r['wall_seconds']:.0f} s" if r.get("wall_seconds") and not r.get("from_cache") else "(heads.py)"
            ratio = "1.0" if frozen else ("-" if r.get("time_ratio") is None else f"{r['time_ratio']:.1f}")
            lines.append(f"| {name} | {r['method']} | {r.get('n_train', '?')} / {r.get('n_test', '?')} | {100 * r['accuracy']:.2f}% | "
                         f"{wall} | {ratio} | {r['gain_points']:+.2f} | {ppm} |")
    lines += ["", ANCHOR]
    if any(run["quick"] for run in runs.values()):
        lines.append("Quick mode trains on a small subset at low resolution for a few epochs: its numbers show that every method runs "
                     "and what each costs, not the accuracy a full run reaches.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small subset, small images, 3 epochs (a few minutes on a 2-core CPU)")
    p.add_argument("--datasets", default="cifar10,fashion-mnist")
    p.add_argument("--train-per-class", type=int, help="training images per class (default: quick 100, full all)")
    p.add_argument("--test-per-class", type=int, help="test images per class (default: quick 30, full all)")
    p.add_argument("--img-size", type=int, help="input resolution (default: quick 64, full 224)")
    p.add_argument("--epochs", type=int, help="default: quick 3, full 5")
    p.add_argument("--batch-size", type=int, help="default: quick 32, full 128")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak lr of the fine-tunes")
    p.add_argument("--head-lr", type=float, default=3e-3, help="AdamW peak lr of head-only training")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, help="decoding workers (default: featx's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cifar-tar", default=str(CIFAR_TAR))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print the table instead of writing RESULTS.md")
    args = p.parse_args(argv)
    quick = args.quick
    args.train_per_class = args.train_per_class if args.train_per_class is not None else (100 if quick else None)
    args.test_per_class = args.test_per_class if args.test_per_class is not None else (30 if quick else None)
    args.img_size = args.img_size or (64 if quick else 224)
    args.epochs = args.epochs or (3 if quick else 5)
    args.batch_size = args.batch_size or (32 if quick else 128)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = resolve_device(args.device)
    WORK.mkdir(parents=True, exist_ok=True)
    warm_up(str(device), args.img_size)
    results = []
    datasets = args.datasets.split(",")
    dataset_seconds = {}
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
    # each data set's rows are kept, so full runs can be split over several calls (one data set each)
    signature = f"{'quick' if quick else 'full'}-{args.img_size}px-{args.epochs}ep-{args.train_per_class}-{args.test_per_class}"
    store = WORK / f"rows-{signature}.json"
    runs = json.loads(store.read_text()) if store.exists() else {}
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    precision = next((r["precision"] for r in results if "precision" in r), "n/a")
    setup = (f"{device} ({hw}), {precision}; {args.img_size} px, {args.epochs} epoch(s), batch {args.batch_size}, AdamW lr {args.lr} "
             f"(head-only {args.head_lr}), layer decay 0.8, warm-up 10% + cosine, label smoothing 0.1, timm training augmentation")
    for name in datasets:
        runs[name] = {"rows": [r for r in results if r["dataset"] == name], "command": command_line(), "setup": setup,
                      "seconds": dataset_seconds[name], "quick": quick}
    store.write_text(json.dumps(runs, indent=2, default=str))
    text = markdown(runs, "GPU" if device.type == "cuda" else "CPU")
    print(text)
    if not args.no_write:
        write_section("finetune", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
