"""The 'sweeps' and 'large_store' sections of benchmarks/heads.py."""

from __future__ import annotations

import json
import logging
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from _common import CACHE, cifar10_dir, command_line, lite0_weights

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

    store = cifar_store(args.features)
    train, test = load_features(store, split="train"), load_features(store, split="test")
    Xtr, ytr = train.X, train.y
    if args.sweep_rows:
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(ytr))[: args.sweep_rows])
        Xtr, ytr = Xtr[keep], ytr[keep]
    rows = run(((Xtr, ytr), (test.X, test.y)), args.sweep_heads, args.device, args.seed)
    source = f"`{store.name}` ({train.attrs.get('model')}, {train.attrs.get('img_size')} px, featx extract)"
    return "\n".join(_header(args, "Head sweeps at the speed of the hardware (`benchmarks/heads.py --section sweeps`)")
                     + render(rows, len(ytr), len(test.y), Xtr.shape[1], source))


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
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run(cmd, capture_output=True, text=True)
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append({"head": head, "seconds": time.perf_counter() - t0, "peak_gb": max(peak_kb, before) * 1024 / 1e9,
                        "accuracy": result["accuracy"], "streamed": "streaming" in proc.stderr})
        logging.info("%s: %s", head, results[-1])
    size = path.stat().st_size / 1e9
    lines = _header(args, "Stores larger than RAM (`benchmarks/heads.py --section large_store`)")
    lines += [f"A synthetic store of {rows} rows x {dim} float32 features ({size:.2f} GB on disk, 10 Gaussian classes), "
              f"`featx fit-head --max-memory {args.cap_gb:g}` (the cap is {size / args.cap_gb:.1f}x smaller than the features), "
              "run as a child process whose peak resident memory is read from getrusage (it includes torch and scikit-learn, "
              "about 0.4 GB before any data).", "",
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


def run_section(args) -> str:
    return sweeps(args) if args.section == "sweeps" else large_store(args)
