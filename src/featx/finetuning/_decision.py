"""The keep-or-replace rule: a fine-tuned model replaces the run's frozen start only when validation says it is better
by more than noise.

Every epoch, and every interpolation of it toward the start (WiSE-FT), is a candidate, ranked on the validation
images by accuracy, ties to the lower validation loss (:func:`better`). The best candidate replaces the start only if
both hold on the same validation images:

* the exact one-sided McNemar test rejects "no better than the start" at ``significance`` (default 0.05; 1 turns it
  off) after a Bonferroni correction for the number of candidates it was chosen from: of the images exactly one of
  the two gets right, the candidate gets more than half, under a fair coin per image (:func:`one_sided_mcnemar`),
  with p multiplied by the number of candidates scored;
* its mean validation log-loss is lower than the start's (a less quantised check that the gain is not a few lucky
  images near the boundary).

The correction is what makes the test honest about the choice: the best of 20 candidates on 30 validation images
will often look significant uncorrected (on CIFAR-10 at 10 images per class, a candidate 10 images up on 30 validation
images, p = 0.001 uncorrected, was 9 points below the probe on the test images). The rule errs toward keeping the start,
which is the safe side: a kept start costs the gain fine-tuning would have made, a wrong replacement costs accuracy the
frozen features had (on 245 natural photos, 0.948 -> 0.915 after one lucky image).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Decision", "decide", "one_sided_mcnemar", "better", "describe_candidate"]


def one_sided_mcnemar(only_start: int, only_candidate: int) -> float:
    """Exact one-sided McNemar p-value that the candidate is better: P(X >= only_candidate), X ~ Binomial(n, 1/2).

    ``only_start`` / ``only_candidate``: images right for the start only / for the candidate only (the discordant
    pairs; ``n`` is their sum). No discordant image gives p = 1.
    """
    n = only_start + only_candidate
    if n == 0:
        return 1.0
    from scipy.stats import binom

    return float(binom.sf(only_candidate - 1, n, 0.5))


def better(a: dict, b: dict | None) -> bool:
    """True when candidate ``a`` ranks above ``b`` on validation: higher accuracy, ties to the lower loss (then the earlier)."""
    if b is None:
        return True
    return (a["val_accuracy"], -a["val_loss"]) > (b["val_accuracy"], -b["val_loss"])


def describe_candidate(c: dict, start_name: str = "start") -> str:
    """``epoch 3`` or ``epoch 3 interpolated 50% of the way from the start`` (WiSE-FT)."""
    alpha = c.get("alpha", 1.0)
    return f"epoch {c['epoch']}" + ("" if alpha >= 1 else f" interpolated {alpha:.0%} of the way from the {start_name}")


@dataclass
class Decision:
    """What the run kept and why (``metrics.json``'s ``decision``)."""

    kept: str  # 'start' (the frozen probe or --init-head) or 'finetuned'
    reason: str
    rule: str
    significance: float
    n_val: int = 0
    only_start: int = 0  # validation images right for the start only
    only_candidate: int = 0  # validation images right for the candidate only
    p_value: float | None = None  # one-sided exact McNemar p of the best candidate against the start
    n_candidates: int = 0  # candidates the best was chosen from (epochs x interpolations)
    p_adjusted: float | None = None  # min(1, p_value * n_candidates): Bonferroni
    candidate: dict | None = None  # epoch, alpha, val_accuracy, val_loss
    start: dict | None = None  # val_accuracy, val_loss

    def to_dict(self) -> dict:
        return asdict(self)


RULE = ("the best fine-tuned candidate on validation (accuracy, then loss) replaces the start only if an exact one-sided "
        "McNemar test on the validation images, Bonferroni-corrected for the number of candidates, gives p < {significance:g} "
        "and its validation log-loss is lower")


def decide(start: dict | None, candidate: dict | None, *, significance: float, n_candidates: int = 1,
           start_name: str = "frozen probe") -> Decision:
    """Keep ``start`` or replace it by ``candidate``, the best of ``n_candidates``; each is ``{'val_accuracy', 'val_loss',
    'correct': [bool per image]}`` (candidates also ``epoch`` and ``alpha``), scored on the same validation images."""
    rule = RULE.format(significance=significance)
    if start is None:
        if candidate is None:
            return Decision("start", "kept the random start: no epoch was trained", rule, significance)
        return Decision("finetuned", f"kept {describe_candidate(candidate)}: the run started from a random classifier, so there "
                        "is no frozen start to keep", rule, significance, candidate=_public(candidate))
    if candidate is None:
        return Decision("start", f"kept the {start_name}: no epoch was trained", rule, significance, start=_public(start))
    a, b = np.asarray(start["correct"], bool), np.asarray(candidate["correct"], bool)
    assert a.shape == b.shape, "the start and the candidate are scored on the same validation images"
    only_start, only_candidate = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p = one_sided_mcnemar(only_start, only_candidate)
    n = max(1, int(n_candidates))
    p_adjusted = min(1.0, p * n)
    gain = 100 * (candidate["val_accuracy"] - start["val_accuracy"])
    what = describe_candidate(candidate, start_name)
    test = f"one-sided exact McNemar p = {p:.2g}" + (f", {p_adjusted:.2g} for the best of {n} candidates" if n > 1 else "")
    counts = (f"{gain:+.1f} points on {len(a)} validation images ({only_candidate} right only for it, {only_start} only for "
              f"the {start_name}; {test}")
    losses = f"validation loss {candidate['val_loss']:.3f} vs {start['val_loss']:.3f}"
    replace = (p_adjusted < significance or significance >= 1) and candidate["val_loss"] < start["val_loss"]
    if replace:
        reason = f"kept {what}: {counts}{' < ' if p_adjusted < significance else ', test off at '}{significance:g}); {losses}"
    elif p_adjusted >= significance:
        reason = f"kept the {start_name}: {what} is {counts} >= {significance:g}), within noise"
    else:
        reason = f"kept the {start_name}: {what} is {counts}) but its {losses} is not lower"
    return Decision("finetuned" if replace else "start", reason, rule, significance, int(len(a)), only_start, only_candidate, p, n,
                    p_adjusted, _public(candidate), _public(start))


def _public(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k in ("epoch", "alpha", "val_accuracy", "val_loss")}
