"""Warnings of the libraries featx calls, said once each in featx's words instead of raw, with source lines."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

__all__ = ["library_warnings_said_once"]

_logger = logging.getLogger("featx")

# (category name, words the message contains) -> what it means for a featx user
_MEANINGS = [
    ("ConvergenceWarning", "", "a solver stopped at its iteration limit before converging; the result may be slightly off "
                               "(raise it with --param max_iter=N)"),
    ("LinAlgWarning", "ill-conditioned", "a linear solve was ill-conditioned (nearly collinear features at weak "
                                         "regularisation); prefer a larger alpha or C, or --sweep"),
    ("UserWarning", "y_pred contains classes not in y_true", "some predicted classes do not occur among the evaluated "
                                                              "rows; balanced accuracy averages over the classes present"),
    ("UserWarning", "within_class_std_dev_", "some feature is constant within a class (harmless for a nearest-class-mean head)"),
    ("UserWarning", "pickle protocol", "the checkpoint was saved with a newer pickle protocol; it was read with safe "
                                       "(weights_only) loading"),
]


def _meaning(w: warnings.WarningMessage) -> str:
    category, text = w.category.__name__, str(w.message)
    for name, words, meaning in _MEANINGS:
        if category == name and words.lower() in text.lower():
            return meaning
    first = text.strip().splitlines()[0] if text.strip() else category
    return f"{w.category.__module__.split('.')[0]} says ({category}): {first[:300]}"


@contextmanager
def library_warnings_said_once():
    """Collect warnings raised inside the block; afterwards log each distinct meaning once, with how often it came."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            yield
        finally:
            counts: dict[str, int] = {}
            for w in caught:
                meaning = _meaning(w)
                counts[meaning] = counts.get(meaning, 0) + 1
            for meaning, n in counts.items():
                _logger.warning("note: %s%s", meaning, f" ({n} times)" if n > 1 else "")
