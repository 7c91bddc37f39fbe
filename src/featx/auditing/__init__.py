"""``featx audit``: ``_neighbours`` (near-duplicate pairs and outlier distances from the kNN head's chunked search),
``_labels`` (out-of-fold probabilities, cleanlab's label issues, confusable classes), ``_workflow`` (the checks in
order), ``_report`` (audit.json, audit.md) and ``_page`` (audit.html with embedded thumbnails)."""

from ._workflow import AuditResult, audit

__all__ = ["AuditResult", "audit"]
