"""The audit as data (audit.json: every finding, with ids, scores and thresholds) and as a summary (audit.md)."""

from __future__ import annotations

from ..provenance import provenance
from ..statistics import wilson_interval, with_interval

__all__ = ["audit_dict", "duplicate_rule", "summary_lines", "markdown"]

_DUPLICATE_RULE = "cosine similarity of the embeddings (every tap weighing the same) at or above the threshold"
_OUTLIER_RULE = "cosine distance to the k-th nearest other image above Q3 + 3 IQR of all images' distances (Tukey's far-out fence)"
_PIXEL_RULE = ("; or cosine at or above candidate_threshold and pixel similarity at or above pixel_threshold (normalized "
               "cross-correlation of 32 x 32 grayscale images band-passed by a difference of Gaussians, the higher of the "
               "image and its mirror)")


def duplicate_rule(result) -> str:
    """The near-duplicate rule in one line, with its thresholds."""
    c = result.config
    text = f"cosine >= {c.threshold:g}"
    return text + (f", or >= {c.candidate_threshold:g} with pixel similarity >= {c.pixel_threshold:g}" if result.verified else "")


def _accuracy_text(result) -> str:
    lc = result.labels
    n = len(lc.rows)
    return with_interval(lc.accuracy, wilson_interval(round(lc.accuracy * n), n))


def audit_dict(result) -> dict:
    c, lc = result.config, result.labels
    attrs = result.attrs
    return {
        "features": result.features, "model_key": result.key, "model": attrs.get("model"),
        "weights_sha256": attrs.get("weights_sha256"), "image_list_sha256": attrs.get("image_list_sha256"),
        "n_images": len(result.rows), "taps": len(result.rows.blocks or [None]), "splits": {"train": result.train_split, "test": result.test_split},
        "notes": result.notes, "seconds": result.seconds,
        "near_duplicates": {"threshold": c.threshold, "k": c.k, "rule": _DUPLICATE_RULE + (_PIXEL_RULE if result.verified else ""),
                            "verify": "pixels" if result.verified else "none",
                            "candidate_threshold": c.candidate_threshold if result.verified else None,
                            "pixel_threshold": c.pixel_threshold if result.verified else None,
                            "pixel_check": result.verified or None, "n_pairs": len(result.duplicates),
                            "n_across_splits": sum(p["across_splits"] for p in result.duplicates),
                            "images_with_k_or_more": result.saturated, **result.cross_counts(), "pairs": result.duplicates},
        "outliers": {"k": c.k, "rule": _OUTLIER_RULE, "fence": result.fence, "flagged": result.outliers()},
        "label_issues": {
            "skipped": lc.skipped, "method": "cleanlab.filter.find_label_issues (prune_by_noise_rate), ranked by self-confidence, "
                                             f"on {c.folds}-fold out-of-fold probabilities of the logistic regression swept by validation log-loss",
            "split": result.train_split, "n_checked": 0 if lc.rows is None else len(lc.rows), "folds": c.folds, "seed": c.seed,
            "classes_left_out": lc.left_out, "chosen_C_per_fold": lc.chosen_C, "out_of_fold_accuracy": lc.accuracy,
            "out_of_fold_accuracy_interval": None if lc.accuracy is None else list(wilson_interval(round(lc.accuracy * len(lc.rows)), len(lc.rows))),
            "n_suspects": len(lc.suspects), "suspects": lc.suspects},
        "confusable_pairs": {"rule": "share of the two classes' training images that the out-of-fold predictions give to the other one",
                             "pairs": lc.confusable},
        "config": {k: v for k, v in vars(c).items() if k not in ("progress",)},
        "provenance": provenance(),
    }


def summary_lines(result) -> list[str]:
    c, lc = result.config, result.labels
    cross = result.cross_counts()
    lines = [f"Audit of '{result.key}' ({len(result.rows)} images) in '{result.features}':"]
    across = sum(p["across_splits"] for p in result.duplicates)
    lines.append(f"  near-duplicates ({duplicate_rule(result)}): {len(result.duplicates)} pairs, {across} across splits"
                 + (f"; {cross['test_rows_with_training_duplicate']} '{result.test_split}' images have one in '{result.train_split}'"
                    if result.test_split else ""))
    if lc.skipped:
        lines.append(f"  label issues: skipped ({lc.skipped})")
    else:
        lines.append(f"  label issues: {len(lc.suspects)} suspects among {len(lc.rows)} '{result.train_split}' images "
                     f"(out-of-fold accuracy {_accuracy_text(result)})")
        if lc.confusable:
            p = lc.confusable[0]
            lines.append(f"  most confusable classes: {p['a']} / {p['b']} ({p['share']:.1%} of their images given to the other)")
    lines.append(f"  outliers (distance to the {c.k}-th neighbour > {result.fence:.4f}): {len(result.outliers())}")
    lines += [f"  note: {n}" for n in result.notes]
    if result.paths:
        lines.append(f"Wrote {', '.join(str(p) for p in result.paths)}.")
    return lines


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(v).replace("|", "\\|") for v in r) + " |" for r in rows]
    return out


def markdown(result) -> str:
    c, lc = result.config, result.labels
    top = c.top
    lines = ["# Audit", "", *[f"- {line.strip()}" for line in summary_lines(result)[1:] if not line.startswith("Wrote")], ""]
    lines += [f"## Near-duplicates ({duplicate_rule(result)})", ""]
    pairs = sorted(result.duplicates, key=lambda p: (not p["across_splits"], -p["similarity"]))[:top]
    lines += _table(["similarity", "a", "split", "label", "b", "split", "label", "same bytes", "pixels"],
                    [[f"{p['similarity']:.4f}", p["a"], p["a_split"], p["a_label"] or "", p["b"], p["b_split"], p["b_label"] or "",
                      "yes" if p["identical_bytes"] else "", "" if p["pixel_similarity"] is None else f"{p['pixel_similarity']:.3f}"]
                     for p in pairs]) if pairs else ["None."]
    lines += ["", "## Likely label errors", ""]
    if lc.skipped:
        lines.append(f"Skipped: {lc.skipped}.")
    else:
        lines += _table(["rank", "id", "given", "suggested", "p(given)", "p(suggested)"],
                        [[i + 1, s["id"], s["given"], s["suggested"], f"{s['label_quality']:.3f}", f"{s['suggested_probability']:.3f}"]
                         for i, s in enumerate(lc.suspects[:top])]) if lc.suspects else ["None."]
    lines += ["", f"## Outliers (cosine distance to the {c.k}-th neighbour)", ""]
    flagged = result.outliers()[:top]
    lines += _table(["id", "split", "label", "any class", "same class"],
                    [[o["id"], o["split"], o["label"] or "", f"{o['any_class_distance']:.4f}",
                      "" if o["same_class_distance"] is None else f"{o['same_class_distance']:.4f}"] for o in flagged]) if flagged else [
        f"None beyond the fence ({result.fence:.4f})."]
    lines += ["", "## Confusable class pairs (out-of-fold)", ""]
    if lc.confusable:
        lines += _table(["classes", "a as b", "b as a", "share"],
                        [[f"{p['a']} / {p['b']}", p["a_as_b"], p["b_as_a"], f"{p['share']:.1%}"] for p in lc.confusable[:top]])
    else:
        lines.append("None." if not lc.skipped else f"Skipped: {lc.skipped}.")
    return "\n".join(lines) + "\n"
