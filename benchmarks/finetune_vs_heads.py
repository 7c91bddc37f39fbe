"""Fine-tuning against the frozen swept logistic regression, on a robustness suite whose recipe search cannot see what
it reports (EfficientNet-Lite0 with its real ImageNet weights).

Each regime of :data:`_suite.REGIMES` (CIFAR-10 at 10/25/100/500 images per class, three two-class CIFAR-10 sets of
120 per class, Fashion-MNIST at 25 and 500 per class, digits) is cut into four disjoint parts (``_suite.build_parts``):

    python benchmarks/finetune_vs_heads.py --search   # recipe variants on the search parts, with every candidate's
                                                      # search-test score, and the policy table (section finetune_search)
    python benchmarks/finetune_vs_heads.py --report   # featx finetune's defaults on the report parts, scored once
                                                      # (section finetune_report)
    python benchmarks/finetune_vs_heads.py --report --scaled-down --regimes digits --no-write   # a smoke run

Per regime the report gives the frozen baseline (``featx extract`` + ``featx fit-head --head logreg --sweep`` on every
training image), ``featx finetune`` with its defaults (only --model, --weights, --img-size given), the gain on the
same test images with its 95% paired-bootstrap interval, the decision the run took on validation, and the minutes.
Search and report runs use other images and other seeds (search 1; report round r, r + 1). Each report round
(``--report-round``, default 2) is scored on report-test images no earlier round scored: round 1 was read before the
kept probe became fit-head's own swept logreg and before the second search, so round 2 reports on images nothing saw.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, CIFAR_TAR, cifar10_dir, command_line, lite0_weights, write_section  # noqa: E402
from _suite import REGIMES, TooFewImages, build_parts, old_search_test_images, regime_source, scaled_down  # noqa: E402
from _suite_analysis import POLICIES, policy_table, search_markdown  # noqa: E402

from featx import ExtractConfig, FinetuneConfig, FitHeadConfig, extract, finetune, fit_head, load_head  # noqa: E402
from featx.device import resolve_device  # noqa: E402
from featx.finetuning._run_dir import run_identity  # noqa: E402
from featx.sources import ImageSource, resolve_source  # noqa: E402
from featx.statistics import mcnemar_exact, paired_bootstrap_difference, wilson_interval, with_interval  # noqa: E402
from featx.store import load_features  # noqa: E402

MODEL = "tf_efficientnet_lite0"
WORK = CACHE / "finetune_suite"
SEARCH_SEED = 1  # the search runs' seed; a report round's runs use round + 1 (2 for round 1, 3 for round 2)
REPORT_ROUND = 2
SMALL = 1000  # regimes with at most this many training images get the search's extra variants
# The recipe variants of the search, one change at a time from the whole-network recipe (featx finetune's defaults when the
# search ran: --freeze auto came out of it): (label, FinetuneConfig overrides, run folder name). A fourth,
# "at least 100 steps" ({"min_steps": 100}: the epochs of a small regime raised until the run makes 100 optimizer steps),
# ran on cifar10-10 only: 34 epochs, each scoring every candidate on the search-test part, cost 30 min of the shared CPU.
# The second search (after the kept probe became fit-head's own swept logreg) ran featx finetune's defaults only
# (--variants defaults-now), to replay the keep-or-replace policies against a kept probe that is the frozen baseline.
VARIANTS = [("featx finetune defaults", {}, "defaults-now"),
            ("whole network (--freeze none)", {"freeze": "none"}, "defaults"),
            ("lr 1e-4", {"lr": 1e-4, "freeze": "none"}, "lr-1e-4"),
            ("last 2 stages (--freeze stages:2)", {"freeze": "stages:2"}, "last-2-stages-freeze-stages-2-")]
REPORT = [("featx finetune defaults", {}, "defaults")]


def load_dataset(name: str, args) -> ImageSource:
    if name == "cifar10":
        return resolve_source(args.cifar_dir or cifar10_dir(args.cifar_tar))
    if name == "fashion-mnist":
        return resolve_source("fashion-mnist")
    return resolve_source("digits")


def frozen_baseline(src: ImageSource, tag: str, args, seed: int, fresh: bool) -> dict:
    """``featx extract`` + ``featx fit-head --head logreg --sweep`` on the training part, scored on the test part."""
    t0 = time.perf_counter()
    store = WORK / f"{tag}-{args.img_size}.h5"
    if fresh:
        store.unlink(missing_ok=True)  # timed from scratch
    extract(src, ExtractConfig(model=MODEL, weights=lite0_weights(), img_size=args.img_size, device=args.device, batch_size=64,
                               workers=args.workers, progress=not args.no_progress), store)
    head_dir = WORK / f"{tag}-{args.img_size}-logreg"
    fitted = fit_head(store, FitHeadConfig(head="logreg", sweep=True, model=MODEL, device=args.device, seed=seed, overwrite=True,
                                           progress=False), head_dir)
    test = load_features(store, MODEL, "test")
    correct = load_head(head_dir).pipeline.predict(test.X) == test.y
    n, k = len(correct), int(correct.sum())
    return {"accuracy": k / n, "accuracy_ci": list(wilson_interval(k, n)), "n_test": n, "C": (fitted.sweep or {}).get("best"),
            "correct_by_id": dict(zip(test.ids.tolist(), correct.tolist())), "seconds": time.perf_counter() - t0}


def probe_on_frozen_features(src: ImageSource, tag: str, args, seed: int) -> dict:
    """featx finetune's own probe rule (C by k-fold on the run's training part, refit with the validation part) on the frozen
    head's cached features: how much of "own probe - frozen" is the choice of C alone."""
    from featx.finetuning._data import choose_images
    from featx.finetuning._probe import fit_probe

    store = WORK / f"{tag}-{args.img_size}.h5"
    images = choose_images(src, FinetuneConfig(model=MODEL, seed=seed))
    train, test = load_features(store, MODEL, "train"), load_features(store, MODEL, "test")
    row = {i: k for k, i in enumerate(train.ids.tolist())}
    fit, val = ([row[src.ids[i]] for i in part] for part in (images.train, images.val))
    probe = fit_probe(train.X[fit], train.y[fit], train.X[val], train.y[val], len(src.class_names), seed=seed, device="cpu",
                      source_order=np.argsort(np.concatenate([fit, val]), kind="stable"))
    weight, bias = probe.refit
    pred = (torch.from_numpy(test.X).float() @ weight.T + bias).argmax(1).numpy()
    return {"accuracy": float((pred == test.y).mean()), "C": probe.info["params"]["C"], "chosen_by": probe.info["chosen_by"]}


def _steps_epochs(src: ImageSource, config: FinetuneConfig, min_steps: int) -> int:
    """Epochs that make at least ``min_steps`` optimizer steps on the run's own training images (never fewer than the default)."""
    from featx.finetuning._data import choose_images

    steps = math.ceil(len(choose_images(src, config).train) / config.batch_size)
    return max(config.epochs, math.ceil(min_steps / steps))


def finetune_run(src: ImageSource, tag: str, label: str, overrides: dict, args, seed: int, reuse: bool, done: list) -> dict:
    """One featx finetune run's metrics (history included) and its per-image correctness on the test part; a variant whose
    options equal those of a run in ``done`` is that run (e.g. at least 100 steps where 5 epochs make more)."""
    overrides = dict(overrides)
    min_steps = overrides.pop("min_steps", None)
    config = FinetuneConfig(model=MODEL, weights=lite0_weights(), img_size=args.img_size, device=args.device, workers=args.workers,
                            progress=not args.no_progress, export="none", overwrite=True, seed=seed, test_curve=args.mode == "search",
                            **({"epochs": args.epochs} if args.epochs else {}), **overrides)
    if min_steps:
        min_steps = min(min_steps, 10) if args.scaled_down else min_steps
        config = FinetuneConfig(**{**config.__dict__, "epochs": _steps_epochs(src, config, min_steps)})
    same = next((r for r in done if r["identity"] == run_identity(config)), None)
    if same is not None:
        return {**same, "variant": label}
    out = WORK / "runs" / tag
    if reuse and (out / "metrics.json").is_file() and json.loads((out / "run.json").read_text())["config"] == run_identity(config):
        m = json.loads((out / "metrics.json").read_text())
        logging.info("%s / %s: read back from %s", tag, label, out)
    else:
        result = finetune(src, config, out)
        m = {**result.metrics, "history": result.history}
    with open(out / m.get("test_predictions", "test_predictions.csv"), newline="") as fh:
        m["correct_by_id"] = {r["id"]: r["prediction"] == r["label"] for r in csv.DictReader(fh)}
    return {"variant": label, **m, "identity": run_identity(config)}


def run_seed(which: str, report_round: int) -> int:
    """The featx runs' seed: the search's, or the report round's (round + 1)."""
    return SEARCH_SEED if which == "search" else report_round + 1


def paired(frozen: dict, ft: dict) -> dict:
    """Gain of the fine-tune over the frozen head on the images both scored, its 95% paired-bootstrap interval, McNemar's p."""
    ids = sorted(set(frozen["correct_by_id"]) & set(ft["correct_by_id"]))
    a = np.array([frozen["correct_by_id"][i] for i in ids])
    b = np.array([ft["correct_by_id"][i] for i in ids])
    lo, hi = paired_bootstrap_difference(a, b)
    return {"gain": 100 * (b.mean() - a.mean()), "gain_ci": [100 * lo, 100 * hi], "mcnemar_p": mcnemar_exact(a, b), "n_paired": len(ids)}


def regime_parts(regime, full: ImageSource, args) -> dict[str, np.ndarray]:
    """The regime's parts for the mode (a report: its round's)."""
    exclude = old_search_test_images(full) if regime.dataset == "cifar10" else None
    report_round = args.report_round if args.mode == "report" else 1
    return build_parts(full.labels, full.splits, full.class_names, regime, exclude_from_report=exclude, report_round=report_round)


def run_regime(regime, full: ImageSource, parts: dict[str, np.ndarray], args) -> dict:
    """Run what the mode asks on the regime's parts of ``full``."""
    which = args.mode
    report_round = args.report_round if which == "report" else 1
    src = regime_source(full, parts, which, regime)
    tag = f"{regime.name}-{which}" + (f"{report_round}" if report_round > 1 else "") + ("-scaled" if args.scaled_down else "")
    seed = run_seed(which, report_round)
    t0 = time.perf_counter()
    frozen = frozen_baseline(src, tag, args, seed, fresh=which == "report")
    if which == "search":
        frozen["own_probe_rule"] = probe_on_frozen_features(src, tag, args, seed)
    n_train = len(parts[f"{which}_train"])
    chosen = [v for v in VARIANTS if args.variants is None or v[2] in args.variants]
    variants = (chosen if n_train <= SMALL else chosen[:1]) if which == "search" else REPORT
    runs = []
    for label, overrides, folder in variants:
        run = finetune_run(src, f"{tag}-{folder}", label, overrides, args, seed, reuse=which == "search", done=runs)
        runs.append(run)
    for r in runs:
        r.update(paired(frozen, r))
    logging.info("%s: frozen %.4f, %s (%.1f min)", regime.name, frozen["accuracy"],
                 ", ".join(f"{r['variant']} {r['accuracy']:.4f} ({r['kept']})" for r in runs), (time.perf_counter() - t0) / 60)
    return {"regime": regime.name, "n_train": n_train, "frozen": frozen, "runs": runs, "seconds": time.perf_counter() - t0}


TARGETS = [("every regime: fine-tune >= frozen - 0.5 points", lambda g: min(g.values()) >= -0.5),
           ("mean gain >= +3 points", lambda g: float(np.mean(list(g.values()))) >= 3),
           ("CIFAR-10 500/class >= +8 points", lambda g: g.get("cifar10-500", -1e9) >= 8),
           ("Fashion-MNIST 500/class >= +3 points", lambda g: g.get("fashion-mnist-500", -1e9) >= 3)]


def _row(r: dict) -> str:
    f, ft = r["frozen"], r["runs"][0]
    d = ft["decision"]
    kept = ("frozen probe" if ft["kept"] == "start" else f"epoch {d['candidate']['epoch']}, alpha {d['candidate']['alpha']:g}")
    p = "-" if d.get("p_value") is None else f"{d['p_value']:.2g}"
    return (f"| {r['regime']} | {ft['n_train']} / {ft['n_val']} / {ft['n_test']} | {with_interval(f['accuracy'], f['accuracy_ci'])} | "
            f"{ft['baseline']['accuracy']:.3f} | {with_interval(ft['accuracy'], ft['accuracy_ci'])} | {ft['gain']:+.1f} "
            f"({ft['gain_ci'][0]:+.1f} to {ft['gain_ci'][1]:+.1f}) | {kept} (p = {p}) | {f['seconds'] / 60:.1f} | "
            f"{ft['wall_seconds'] / 60:.1f} |")


def report_markdown(results: list[dict], args, total_s: float) -> str:
    gains = {r["regime"]: r["runs"][0]["gain"] for r in results}
    ft = results[0]["runs"][0]
    hw = f"{platform.machine()} CPU, {torch.get_num_threads()} threads" if args.device_type == "cpu" else torch.cuda.get_device_name()
    lines = ["## Fine-tuning robustness suite, report parts (`benchmarks/finetune_vs_heads.py --report`)", "",
             f"Command: `{command_line()}` ({total_s / 60:.1f} min in all, {args.device_type}: {hw}; 1-minute load average "
             f"{args.load_before} before, {args.load_after} after). EfficientNet-Lite0 (real ImageNet weights) at {args.img_size} px; "
             f"featx finetune with its defaults ({ft['epochs']} epochs, lr {ft['lr']:g}, freeze {ft['freeze']}, interpolations "
             f"{ft['interpolate']}, patience {ft['patience']}, significance {ft['significance']:g}); report round "
             f"{args.report_round} (report-test images no earlier round scored), run seed {run_seed('report', args.report_round)}. "
             "Report-test parts: nothing chose on them; each run scores them once.", "",
             "Frozen = `featx fit-head --head logreg --sweep` on the features of every training image (its C on a 20% hold-out); "
             "own probe = the model the run keeps unless a fine-tuned one beats its start on validation by more than noise: fit-head's "
             "swept logreg on every training image, fitted by the run on its own embeddings (torch, where extract's may be ONNX "
             "Runtime's); gain = fine-tune - frozen on the same test "
             "images, with its 95% paired-bootstrap interval; decision = what the run kept, with the one-sided exact McNemar p of the "
             "best fine-tuned candidate against the probe on validation.", "",
             "| regime | train / val / test | frozen (95% CI) | own probe | featx finetune (95% CI) | gain, points (95% CI) | "
             "kept (validation p) | frozen min | fine-tune min |", "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    lines += [_row(r) for r in results]
    lines += ["", f"Mean gain over the {len(gains)} regimes: {np.mean(list(gains.values())):+.2f} points.", ""]
    lines += [f"- {name}: {'met' if check(gains) else '**missed**'}" for name, check in TARGETS]
    if len(gains) < len(REGIMES):
        lines.append(f"(only {len(gains)} of the suite's {len(REGIMES)} regimes ran: the targets are not judged on a part of the suite)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--search", action="store_const", dest="mode", const="search", help="recipe variants on the search parts")
    mode.add_argument("--report", action="store_const", dest="mode", const="report", help="the defaults on the report parts")
    p.add_argument("--regimes", help="comma-separated regime names (default: all): " + ", ".join(r.name for r in REGIMES))
    p.add_argument("--variants", type=lambda s: s.split(","),
                   help="--search: comma-separated variant folders (default: all): " + ", ".join(v[2] for v in VARIANTS))
    p.add_argument("--report-round", type=int, default=REPORT_ROUND,
                   help="--report: which round's report parts (each round's report-test images are new to every later round)")
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--epochs", type=int, help="override featx finetune's default (the scaled-down mode: 1)")
    p.add_argument("--scaled-down", action="store_true", help="a few images per class, 48 px, 1 epoch: shows the suite runs")
    p.add_argument("--cifar-dir", help="an unpacked CIFAR-10 JPEG folder (default: unpack --cifar-tar into the cache)")
    p.add_argument("--cifar-tar", default=str(CIFAR_TAR))
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = args.regimes.split(",") if args.regimes else [r.name for r in REGIMES]
    unknown = sorted(set(names) - {r.name for r in REGIMES})
    if unknown:
        p.error(f"unknown regime(s) {', '.join(unknown)}")
    bad = sorted(set(args.variants or ()) - {v[2] for v in VARIANTS})
    if bad:
        p.error(f"unknown variant(s) {', '.join(bad)}")
    if args.report_round < 1:
        p.error(f"--report-round must be 1 or more, not {args.report_round}")
    regimes = [r for r in REGIMES if r.name in names]
    if args.scaled_down:
        regimes = [scaled_down(r) for r in regimes]
        args.img_size, args.epochs = min(args.img_size, 48), args.epochs or 1
    args.device_type = resolve_device(args.device).type
    args.load_before = _load()
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    datasets = {name: load_dataset(name, args) for name in dict.fromkeys(r.dataset for r in regimes)}
    try:  # every regime's parts before the first run: a round with too few unused images is refused up front
        parts = [regime_parts(r, datasets[r.dataset], args) for r in regimes]
    except TooFewImages as e:
        p.error(str(e))
    results = [run_regime(r, datasets[r.dataset], rp, args) for r, rp in zip(regimes, parts)]
    args.load_after = _load()
    if args.mode == "search":
        text = search_markdown(results, policy_table(results, POLICIES), command_line(), time.perf_counter() - t0, args)
    else:
        text = report_markdown(results, args, time.perf_counter() - t0)
    (WORK / f"{args.mode}{'-scaled' if args.scaled_down else ''}.json").write_text(json.dumps(_jsonable(results), default=str))
    print(text)
    if not args.no_write and not args.scaled_down:
        write_section(f"finetune_{args.mode}", text)
    return 0


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def _jsonable(results: list[dict]) -> list[dict]:
    """Results without the per-image maps (kept in the run folders and stores)."""
    strip = lambda d: {k: v for k, v in d.items() if k != "correct_by_id"}  # noqa: E731
    return [{**r, "frozen": strip(r["frozen"]), "runs": [strip(x) for x in r["runs"]]} for r in results]


if __name__ == "__main__":
    sys.exit(main())
