"""Which row of a comparison to trust, chosen without the test images, and which rows the test images cannot tell from it.

The recommendation reads validation accuracies only (each head's from its sweep's validation part, carved from the
training rows; a fine-tuning run's from the validation images that chose its epoch). Rows within one standard error
of the best validation accuracy are tied on validation (Breiman's one-standard-error rule: a difference smaller than
the noise of the best score chooses nothing), and the tie goes to the cheaper row: the lower cost per image
(extraction plus fit, the x axis of the plot). The test images are used once, afterwards, to say which rows they
cannot distinguish from the recommended one: an exact paired McNemar test on the same images, tied when p >= 0.05.
"""

from __future__ import annotations

import math

import numpy as np

from ..statistics import TIE_P, half_width, mcnemar_exact

__all__ = ["VALIDATION_RULE", "TEST_RULE", "recommend", "mark_test_ties", "summary_line", "correct_on", "OTHER_IMAGES"]

VALIDATION_RULE = ("recommended: the best validation accuracy, where rows within one standard error of the best "
                   "(sqrt(p(1-p)/n) of the best row's n validation images, at least one image) count as tied and the tie "
                   "goes to the cheaper row (extraction + fit seconds per image); the test images choose nothing")
OTHER_IMAGES = "scored on other test images"
TEST_RULE = f"tied: an exact paired McNemar test on the same test images cannot tell the row from the recommended one (p >= {TIE_P:g})"


def recommend(rows: list[dict]) -> int | None:
    """Index of the recommended row (validation accuracy, ties to the cheaper row), None when no row has a validation score."""
    scored = [i for i, r in enumerate(rows) if r.get("val_accuracy") is not None and r.get("n_val")]
    if not scored:
        return None
    best = max(scored, key=lambda i: rows[i]["val_accuracy"])
    p, n = rows[best]["val_accuracy"], rows[best]["n_val"]
    band = max(math.sqrt(p * (1 - p) / n), 1 / n) + 1e-12
    tied = [i for i in scored if rows[i]["val_accuracy"] >= p - band]
    return min(tied, key=lambda i: (rows[i]["cost_s_per_image"], -rows[i]["val_accuracy"], i))


def mark_test_ties(rows: list[dict], correct: list, recommended: int | None) -> None:
    """Set every row's ``mark`` ('recommended', 'tied', '' or 'not tested'), ``mcnemar_p`` and ``note``.

    ``correct[i]`` is row i's right/wrong per test image (in the comparison's test-image order), or a string saying
    why it has none.
    """
    for r in rows:
        r.update(mark="", mcnemar_p=None, note=r.get("note", ""))
    if recommended is None:
        for r in rows:
            r.update(mark="not tested", note=_join(r["note"], "no validation accuracy to recommend a row by"))
        return
    rows[recommended]["mark"] = "recommended"
    reference = correct[recommended]
    for i, r in enumerate(rows):
        if i == recommended:
            continue
        if isinstance(reference, str) or isinstance(correct[i], str):
            why = correct[i] if isinstance(correct[i], str) else f"the recommended row has no per-image test predictions ({reference})"
            r.update(mark="not tested", note=_join(r["note"], why))
            continue
        r["mcnemar_p"] = mcnemar_exact(reference, correct[i])
        r["mark"] = "tied" if r["mcnemar_p"] >= TIE_P else ""


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def summary_line(rows: list[dict], recommended: int | None, n_test: int) -> str:
    """'recommended: BACKBONE + HEAD (validation 0.970 ± 0.030); 6 rows tied with it on 153 test images (...)'."""
    if recommended is None:
        return "recommended: none (no row has a validation accuracy)"
    r = rows[recommended]
    tied = sum(x["mark"] == "tied" for x in rows)
    untested = sum(x["mark"] == "not tested" for x in rows)
    return (f"recommended: {r['backbone']} + {r['head']} (validation {r['val_accuracy']:.3f} ± {half_width(r['val_accuracy_ci']):.3f}"
            f" on {r['n_val']} images); {tied} row{'s' if tied != 1 else ''} tied with it on {n_test} test images "
            f"(exact paired McNemar test, p >= {TIE_P:g})" + (f"; {untested} not tested" if untested else ""))


def correct_on(test_ids: list[str], by_id: dict[str, bool] | None, missing: str) -> np.ndarray | str:
    """Right/wrong per test image in ``test_ids`` order from {id: right}; a reason string when they do not cover them."""
    if by_id is None:
        return missing
    try:
        return np.fromiter((by_id[i] for i in test_ids), dtype=bool, count=len(test_ids))
    except KeyError as e:
        return f"its test predictions lack image {e.args[0]!r} of this comparison's test images ({OTHER_IMAGES})"
