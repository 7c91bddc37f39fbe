"""The 'sweeps' and 'large_store' sections of benchmarks/heads.py."""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from _common import CACHE, cifar10_dir, command_line, lite0_weights, run_watching_memory

from featx import ExtractConfig, extract, load_features
from featx.device import resolve_device

MODEL = "tf_efficientnet_lite0"


def cifar_store(path: Path) -> Path:
    """Full CIFAR-10 Lite0 features at 224 px, extracted once with featx (an existing store is used as it is)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        extract(str(cifar10_dir()), ExtractConfig(model=MODEL, weights=lite0_weights(), progress=False), path)
    return path


def _header(args, title: str) -> list[str]:
    dev = resolve_device(args.device)
    return [f"## {title}", "", f"Command: `{command_line()}`  ",
            f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, device {dev}"
            + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "") + f"; torch {torch.__version__}.", ""]


def sweeps(args) -> str:
    from _sweeps import render, run

    layers_store = CACHE / "layers-cifar10-224-all-all.h5"  # written by --section layers: its 'last' tap is the same embedding
    if not args.features.exists() and layers_store.exists():
        store, train, test = layers_store, *_last_tap(layers_store)
    else:
        store = cifar_store(args.features)
        train, test = load_features(store, split="train"), load_features(store, split="test")
    Xtr, ytr = train.X, train.y
    if args.sweep_rows:
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(ytr))[: args.sweep_rows])
        Xtr, ytr = Xtr[keep], ytr[keep]
    rows = run(((Xtr, ytr), (test.X, test.y)), args.sweep_heads, args.device, args.seed, repeats=args.repeats, cold=args.sklearn_cold)
    source = f"`{store.name}` ({train.attrs.get('model')}, {train.attrs.get('img_size')} px, featx extract" + (
        ", the 'last' tap's columns of the `--layers` group" if store == layers_store else "") + ")"
    return "\n".join(_header(args, "Head sweeps at the speed of the hardware (`benchmarks/heads.py --section sweeps`)")
                     + render(rows, len(ytr), len(test.y), Xtr.shape[1], source, args.repeats) + _load_note())


def _load_note() -> list[str]:
    import os

    return ["", f"1-minute load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work sharing the "
            "machine slows every variant; the rounds alternate so that each meets the same load)."]


def _last_tap(store: Path):
    """(train, test) feature sets of the 'last' tap (pre-logits) of the --layers group 'taps' of a layers store."""
    import dataclasses

    with __import__("featx").open_store(store) as fs:
        taps = json.loads(fs.attrs("taps")["taps"])
    stop = next(t["stop"] for t in taps if t["tap"] == "last")
    train, test = load_features(store, "taps", "train"), load_features(store, "taps", "test")
    return dataclasses.replace(train, X=train.X[:, :stop]), dataclasses.replace(test, X=test.X[:, :stop])


def large_store(args) -> str:
    """fit-head on a synthetic store several times its memory cap, in a child process whose peak RSS is measured."""
    path = CACHE / f"large-{args.store_gb:g}gb.h5"
    dim, classes = 1280, 10
    rows = int(args.store_gb * 1e9 / (dim * 4))
    if not path.exists():
        _write_synthetic(path, rows, dim, classes, args.seed)
    results = []
    for head in ("logreg", "torch-linear"):
        out = CACHE / f"large-head-{head}"
        cmd = [sys.executable, "-m", "featx", "fit-head", str(path), "--head", head, "--out", str(out), "--overwrite", "--json",
               "--no-progress", "--max-memory", str(args.cap_gb), "--device", args.device]
        if head == "torch-linear":
            cmd += ["--param", "max_epochs=3"]
        t0 = time.perf_counter()
        proc, peak_kb = run_watching_memory(cmd)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append({"head": head, "seconds": time.perf_counter() - t0, "peak_gb": peak_kb * 1024 / 1e9,
                        "accuracy": result["accuracy"], "streamed": "streaming" in proc.stderr})
        logging.info("%s: %s", head, results[-1])
    size = path.stat().st_size / 1e9
    lines = _header(args, "Stores larger than RAM (`benchmarks/heads.py --section large_store`)")
    lines += [f"A synthetic store of {rows} rows x {dim} float32 features ({size:.2f} GB on disk, 10 Gaussian classes), "
              f"`featx fit-head --max-memory {args.cap_gb:g}` (the cap is {size / args.cap_gb:.1f}x smaller than the features), "
              "run as a child process whose peak resident memory is its own high-water mark (VmHWM of /proc/PID/status, read "
              "every 50 ms; getrusage's children maximum would count the parent's pages copied at fork). It includes torch and "
              "scikit-learn, about 0.4 GB before any data, and the test split, which is scored in memory.", "",
              "| head | streamed | peak RSS GB | peak RSS / features | test accuracy | seconds |", "|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['head']} | {'yes' if r['streamed'] else 'no'} | {r['peak_gb']:.2f} | {r['peak_gb'] / size:.2f} | "
                     f"{r['accuracy']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def _write_synthetic(path: Path, rows: int, dim: int, classes: int, seed: int, block: int = 65536) -> None:
    """Gaussian classes in ``dim`` dimensions, written block by block (never in memory at once)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim)).astype(np.float32) * 0.15
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        g = f.create_group("synthetic")
        X = g.create_dataset("features", shape=(rows, dim), dtype=np.float32, chunks=(1024, dim))
        y = rng.integers(0, classes, rows)
        for s in range(0, rows, block):
            yb = y[s : s + block]
            X[s : s + len(yb)] = centres[yb] + rng.normal(0, 1, (len(yb), dim)).astype(np.float32)
        g.create_dataset("labels", data=y.astype(np.int64))
        g.create_dataset("ids", data=np.array([f"row{i}" for i in range(rows)], dtype=object), dtype=h5py.string_dtype("utf-8"))
        g.create_dataset("split", data=(rng.random(rows) < 0.1).astype(np.int8))  # 10% test
        g.create_dataset("index", data=np.arange(rows))
        s = g.create_group("skipped")
        for name in ("ids", "reasons"):
            s.create_dataset(name, data=np.array([], dtype=object), dtype=h5py.string_dtype("utf-8"))
        s.create_dataset("index", data=np.array([], dtype=np.int64))
        g.attrs.update({"model": "synthetic", "weights_sha256": "0" * 64, "class_names": json.dumps([f"c{k}" for k in range(classes)]),
                        "split_names": json.dumps(["train", "test"]), "num_features": dim, "n_rows": rows, "n_skipped": 0})
    tmp.rename(path)


def _layer_stores(dataset: str, args, taps: str) -> tuple[Path, dict]:
    """Store of ``dataset`` with ``taps`` (group 'taps') and the same with flip averaging (group 'taps+flip')."""
    from heads import load_dataset

    size = args.img_size or (224 if dataset == "cifar10" else 112)
    src = load_dataset(dataset, args.n_train, args.n_test, args.seed)
    store = CACHE / f"layers-{dataset}-{size}-{args.n_train or 'all'}-{args.n_test or 'all'}.h5"
    info = {"img_size": size, "n": len(src)}
    variants = [("taps", None)] + ([("taps+flip", "flip")] if dataset in args.flip_datasets else [])
    for key, tta in variants:
        r = extract(src, ExtractConfig(model=MODEL, weights="package", img_size=size, layers=taps, tta=tta, key=key,
                                       batch_size=args.batch_size, progress=not args.no_progress), store)
        info[key] = "cache hit" if r.cache_hit else f"{r.images_per_s:.1f} img/s"
    return store, info


def _layer_rows(store: Path, dataset: str, taps_json: list, args) -> list[dict]:
    from featx.heads import grid_of, make_head, sweep

    rows = []
    first = {t["tap"]: t for t in taps_json}
    four = [t for t in taps_json if t["tap"] in ("last", "b-1", "b-2", "b-3", "b-4")]
    cut4 = max(t["stop"] for t in four)
    plan = [("last", "taps", first["last"]["stop"], "logreg", False), ("last + 4 blocks", "taps", cut4, "logreg", False),
            ("last + 7 blocks", "taps", None, "logreg", False), ("last, flip", "taps+flip", first["last"]["stop"], "logreg", False),
            ("last + 4 blocks, flip", "taps+flip", cut4, "logreg", False), ("last + 7 blocks, flip", "taps+flip", None, "logreg", False),
            ("last + 4 blocks, tap-norm", "taps", cut4, "logreg", True),
            ("last", "taps", first["last"]["stop"], "knn", False), ("last + 4 blocks", "taps", cut4, "knn", False),
            ("last + 4 blocks, tap-norm", "taps", cut4, "knn", True)]
    for label, key, cut, head, tap_norm in plan:
        if key == "taps+flip" and dataset not in args.flip_datasets:
            continue
        train, test = load_features(store, key, "train"), load_features(store, key, "test")
        Xtr, Xte = (train.X, test.X) if cut is None else (train.X[:, :cut], test.X[:, :cut])
        blocks = [(t["start"], t["stop"]) for t in taps_json if t["stop"] <= Xtr.shape[1]] if tap_norm else None
        t0 = time.perf_counter()
        pipe, result = sweep(make_head(head, device=args.device, tap_blocks=blocks), Xtr, train.y, grid_of(head), random_state=args.seed)
        rows.append({"dataset": dataset, "features": label, "dim": Xtr.shape[1], "head": head, "chosen": result.best,
                     "val": result.best_val_accuracy, "test": float((pipe.predict(Xte) == test.y).mean()), "seconds": time.perf_counter() - t0})
        logging.info("%s", rows[-1])
    return rows


def _layer_throughput(args, taps: str, n: int = 2048) -> dict:
    """images/s of featx extract on the same CIFAR-10 JPEGs: last layer, the taps, the taps with flip (fresh stores, one run)."""
    import shutil
    import tempfile

    from heads import load_dataset

    src = load_dataset("cifar10", n, 0, args.seed)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for label, layers, tta in (("last", "last", None), ("taps", taps, None), ("taps+flip", taps, "flip"), ("last again", "last", None)):
            r = extract(src, ExtractConfig(model=MODEL, weights="package", layers=layers, tta=tta, batch_size=args.batch_size,
                                           progress=False), Path(d) / f"{label}.h5")
            out[label] = r.images_per_s
        shutil.rmtree(d, ignore_errors=True)
    return out


def layers(args) -> str:
    """Last layer vs last + block taps vs flip averaging, swept logreg (and kNN), chosen on validation."""
    taps = args.taps
    all_rows, infos = [], {}
    for dataset in args.datasets:
        store, infos[dataset] = _layer_stores(dataset, args, taps)
        with __import__("featx").open_store(store) as fs:
            taps_json = json.loads(fs.attrs("taps")["taps"])
        all_rows += _layer_rows(store, dataset, taps_json, args)
    lines = _header(args, "Features beyond the last layer (`benchmarks/heads.py --section layers`)")
    lines += ["EfficientNet-Lite0 (real ImageNet weights), features `--layers " + taps + "` with and without `--tta flip`, extracted once "
              "with featx extract; variants are column slices of those stores (the taps are concatenated in the stated order). "
              "Heads: featx's swept logreg (C chosen on a 20% validation part of the training split) and swept kNN; test split scored once.",
              "", "Extraction: " + "; ".join(f"{d}: {i['n']} images at {i['img_size']} px, taps {i['taps']}, taps+flip {i.get('taps+flip', 'not run')}"
                                           for d, i in infos.items()) + ".", "",
              "| dataset | features | dim | head | chosen | validation | test accuracy | sweep s |", "|---|---|---:|---|---|---:|---:|---:|"]
    for r in all_rows:
        lines.append(f"| {r['dataset']} | {r['features']} | {r['dim']} | {r['head']} | "
                     + ", ".join(f"{k}={v:g}" for k, v in r["chosen"].items()) + f" | {r['val']:.4f} | {r['test']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines + [""] + _speed_table(args, taps))


def _speed_table(args, taps: str) -> list[str]:
    speed = _layer_throughput(args, taps)
    base = (speed["last"] + speed["last again"]) / 2
    return ["Extraction speed on the same 2,048 CIFAR-10 JPEGs at 224 px, fresh stores, one run (last layer timed before and "
            "after, averaged):", "", "| features | images/s | relative to last layer | target |", "|---|---:|---:|---|",
            f"| last | {base:.1f} | 1.00 | |",
            f"| `{taps}` | {speed['taps']:.1f} | {speed['taps'] / base:.2f} | >= 0.90 |",
            f"| `{taps}`, flip | {speed['taps+flip']:.1f} | {speed['taps+flip'] / base:.2f} | >= 1/2.1 = 0.48 |"]


def layers_speed(args) -> str:
    """The extraction-speed table of --section layers alone (minutes, not hours: after a change to the forward path)."""
    return "\n".join(_header(args, "Extraction speed of taps and flip (`benchmarks/heads.py --section layers_speed`)")
                     + _speed_table(args, args.taps))


def run_section(args) -> str:
    return {"sweeps": sweeps, "large_store": large_store, "layers": layers, "layers_speed": layers_speed}[args.section](args)
