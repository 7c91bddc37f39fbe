"""The recipe search's reading of its runs: what each choice policy would have kept, and what that scores on search-test.

A search run scores every candidate (each epoch and each interpolation toward the start) on validation and, as
information only (``--test-curve``), on its search-test part. Interpolations are scored with the model's own weights
restored bit for bit afterwards, and early stopping only cuts the epoch sequence short, so what a run with fewer
interpolations, a patience or another significance would have kept is exactly replayed from one run's history.
"""

from __future__ import annotations

import itertools

import numpy as np

from featx.finetuning._decision import better, one_sided_mcnemar

__all__ = ["POLICIES", "replay", "policy_table", "search_markdown"]

ALPHA_SETS = {"none": (), "0.5": (0.5,), "0.25,0.5,0.75": (0.25, 0.5, 0.75)}
RULES = {"off": (1.0, False), "p < 0.2": (0.2, False), "p < 0.1": (0.1, False), "p < 0.05": (0.05, False),
         "p < 0.05, Bonferroni": (0.05, True)}  # (significance, corrected)
POLICIES = [{"interpolate": a, "patience": p, "rule": r} for a, p, r in itertools.product(ALPHA_SETS, (None, 1, 2), RULES)]
DEFAULT_POLICY = {"interpolate": "0.25,0.5,0.75", "patience": None, "rule": "p < 0.05, Bonferroni"}  # featx finetune's defaults


def replay(run: dict, interpolate: str, patience: int | None, rule: str) -> tuple[float, bool, dict | None, float | None]:
    """(search-test accuracy of the model kept, whether a fine-tuned one was kept, the best candidate, its p as the rule
    reads it) under a policy."""
    history, allowed = run["history"], ALPHA_SETS[interpolate]
    significance, corrected = RULES[rule]
    best, since, n = None, 0, 0
    for entry in history[1:]:
        for c in entry["candidates"]:
            if c["alpha"] >= 1 or c["alpha"] in allowed:
                n += 1
                if better(c, best):
                    best, since = c, -1
        since += 1
        if patience and since >= patience:
            break
    if best is None:
        return run["baseline"]["accuracy"], False, None, None
    p = one_sided_mcnemar(best["only_start"], best["only_candidate"]) * (n if corrected else 1)
    replace = (p < significance or significance >= 1) and best["val_loss"] < history[0]["val_loss"]
    return (best["test_accuracy_info_only"] if replace else run["baseline"]["accuracy"]), replace, best, min(1.0, p)


def policy_table(results: list[dict], policies: list[dict]) -> list[dict]:
    """Per policy and search variant: the gain over the frozen head in every regime (regimes without the variant use the
    defaults' run), its mean and its worst."""
    variants = list(dict.fromkeys(r["variant"] for res in results for r in res["runs"]))
    rows = []
    for policy in policies:
        row = {**policy, "by_variant": {}}
        for v in variants:
            gains, kept = {}, 0
            for res in results:
                run = next((r for r in res["runs"] if r["variant"] == v), res["runs"][0])
                acc, replaced, _, _ = replay(run, **policy)
                gains[res["regime"]] = 100 * (acc - res["frozen"]["accuracy"])
                kept += replaced
            row["by_variant"][v] = {"gains": gains, "mean": float(np.mean(list(gains.values()))), "worst": min(gains.values()),
                                    "finetuned_kept": kept}
        rows.append(row)
    return rows


def _runs_table(results: list[dict]) -> list[str]:
    lines = ["| regime | variant | train / val | frozen | own probe | kept (validation p, corrected) | kept model | gain | best "
             "candidate on search-test (information) | minutes |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for res in results:
        for r in res["runs"]:
            acc, replaced, best, p = replay(r, **DEFAULT_POLICY)
            kept = f"epoch {best['epoch']}, alpha {best['alpha']:g}" if replaced else "probe"
            oracle = max((c["test_accuracy_info_only"] for e in r["history"][1:] for c in e["candidates"]), default=float("nan"))
            lines.append(f"| {res['regime']} | {r['variant']} | {r['n_train']} / {r['n_val']} | {res['frozen']['accuracy']:.3f} | "
                         f"{r['baseline']['accuracy']:.3f} | {kept} (p = {'-' if p is None else f'{p:.2g}'}) | {acc:.3f} | "
                         f"{100 * (acc - res['frozen']['accuracy']):+.1f} | {oracle:.3f} | {r['wall_seconds'] / 60:.1f} |")
    return lines


def search_markdown(results: list[dict], table: list[dict], command: str, seconds: float, args) -> str:
    variants = list(table[0]["by_variant"])
    lines = ["## Fine-tuning recipe search, search parts (`benchmarks/finetune_vs_heads.py --search`)", "",
             f"Command: `{command}` ({seconds / 60:.1f} min, {args.device_type}; 1-minute load average {args.load_before} before, "
             f"{args.load_after} after). EfficientNet-Lite0 (real ImageNet weights) at {args.img_size} px, run seed 1, on the "
             "search parts only (other images than the report parts). Every run scores every candidate on its search-test part as "
             "information (`--test-curve`), which is what the search chooses on; the report parts are never read here. Regimes: "
             + ", ".join(r["regime"] for r in results) + ".", "",
             "Runs, each read under featx finetune's default policy (interpolations 0.25/0.5/0.75, no patience, one-sided "
             "McNemar p < 0.05 after a Bonferroni correction over the candidates, and a lower validation loss):", ""]
    lines += _runs_table(results)
    if any(res["frozen"].get("own_probe_rule") for res in results):
        lines += _probe_rule_table(results)
    lines += ["", "Policies replayed from the same runs: gain over the frozen head in points, mean over the regimes / worst regime / "
              "regimes where a fine-tuned model was kept (a regime above 1,000 training images runs the first variant only, and "
              "counts with it in every column):", "",
              "| interpolate | patience | rule | " + " | ".join(f"{v}: mean / worst / fine-tuned kept" for v in variants) + " |",
              "|---|---:|---|" + "---:|" * len(variants)]
    for row in table:
        cells = [f"{row['by_variant'][v]['mean']:+.2f} / {row['by_variant'][v]['worst']:+.2f} / {row['by_variant'][v]['finetuned_kept']}"
                 for v in variants]
        lines.append(f"| {row['interpolate']} | {row['patience'] or '-'} | {row['rule']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _probe_rule_table(results: list[dict]) -> list[str]:
    """The frozen probe's C by fit-head's rule against featx finetune's, both on the frozen head's features."""
    lines = ["", "The frozen probe, on the frozen head's own cached features: `fit-head --sweep` (C on a 20% hold-out of every "
              "training image) against featx finetune's probe (the start's C by 5-fold cross-validation on the run's training part "
              "below 2,000 images; the model kept when nothing beats the start is fit-head's sweep on every training image), both "
              "scored on the search-test part:", "",
              "| regime | fit-head C | its accuracy | featx finetune's start C | kept probe's accuracy | difference (points) |",
              "|---|---:|---:|---:|---:|---:|"]
    for res in results:
        f, own = res["frozen"], res["frozen"].get("own_probe_rule")
        if own:
            lines.append(f"| {res['regime']} | {(f.get('C') or {}).get('C', '-')} | {f['accuracy']:.3f} | {own['C']:g} | "
                         f"{own['accuracy']:.3f} | {100 * (own['accuracy'] - f['accuracy']):+.1f} |")
    return lines
