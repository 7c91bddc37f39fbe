"""Progress bars for head fitting, switched on by the caller (the fit-head workflow) rather than by estimator parameters."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

from tqdm.auto import tqdm

__all__ = ["showing_progress", "progress_bar"]

_ENABLED: ContextVar[bool] = ContextVar("featx_heads_progress", default=False)


@contextmanager
def showing_progress(enabled: bool = True):
    """Within the block, :func:`progress_bar` shows bars (on stderr)."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def progress_bar(total: int | None, desc: str, unit: str = "it") -> tqdm:
    """A tqdm bar, disabled unless inside :func:`showing_progress`."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not _ENABLED.get(), leave=False, dynamic_ncols=True)
