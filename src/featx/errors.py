"""Errors that featx reports to the user as one line, without a traceback, and the wording they share."""

from __future__ import annotations

import re
import shlex

__all__ = ["FeatxError", "BadImage", "load_failure", "shell_command"]


class FeatxError(Exception):
    """A user mistake or an unusable input; the message says what to do about it."""


class BadImage(Exception):
    """An image that cannot be decoded; it is skipped and recorded, never fatal."""


def load_failure(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, without torch's advice to load unsafely (featx never does)."""
    text = str(e).strip()
    if "Weights only load failed" in text:
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text)
        return "it is not a file of plain tensors" + (f" ({m.group(1).strip()[:160]})" if m else "")
    return f"it is not a readable torch checkpoint ({type(e).__name__}{': ' + text.splitlines()[0][:200] if text else ''})"


def shell_command(*words) -> str:
    """A command to suggest, ready to paste: words with spaces or shell characters quoted (double quotes where enough)."""
    out = []
    for w in map(str, words):
        quoted = shlex.quote(w)
        out.append(w if quoted == w else f'"{w}"' if not set(w) & set('"$`\\!') else quoted)
    return " ".join(out)
