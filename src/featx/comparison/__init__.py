"""``featx compare``: ``_plan`` (backbones and heads, checked first), ``_run`` (extract, fit, fine-tune, each cached),
``_report`` (the leaderboard as Markdown, CSV, JSON and an accuracy-against-cost plot).

:func:`compare` is imported on first use, so the command line checks ``--heads`` and the source before torch is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._plan import is_store, parse_heads

__all__ = ["CompareResult", "compare", "is_store", "parse_heads"]


def __getattr__(name: str):
    if name in ("CompareResult", "compare"):
        from . import _run

        value = getattr(_run, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'featx.comparison' has no attribute '{name}'")


if TYPE_CHECKING:
    from ._run import CompareResult, compare  # noqa: F401
