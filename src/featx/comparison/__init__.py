"""``featx compare``: ``_plan`` (backbones and heads, checked first), ``_run`` (extract, fit, fine-tune, each cached),
``_report`` (the leaderboard as Markdown, CSV, JSON and an accuracy-against-cost plot)."""

from ._run import CompareResult, compare

__all__ = ["CompareResult", "compare"]
