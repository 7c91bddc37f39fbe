"""``featx fit-head``: ``_plan`` (which rows train and test, from labels and splits), ``_workflow`` (fit in memory,
test once, save), ``_streamed`` (training features larger than memory, read in chunks)."""

from ._plan import FitPlan, plan_fit
from ._workflow import FitHeadResult, fit_head, format_params, near_duplicates_line

__all__ = ["FitHeadResult", "fit_head", "format_params", "near_duplicates_line", "FitPlan", "plan_fit"]
