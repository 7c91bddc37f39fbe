"""What an extraction did, as the summary line and the ``--json`` object."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["ExtractResult", "skip_digest"]


@dataclass
class ExtractResult:
    """What an extraction did."""

    out: Path
    key: str
    n_images: int  # images in the source
    n_rows: int  # feature rows in the store
    n_skipped: int  # undecodable images (listed in the store with reasons)
    n_processed: int  # images processed by this run (0 on a cache hit; all ranks' on rank 0 under torchrun)
    seconds: float
    cache_hit: bool = False
    resumed_from: int = 0  # first image this run processed, when it resumed a journal (of this rank's share)
    device: str = "cpu"
    precision: str = "fp32"
    skipped: list[tuple[str, str]] = field(default_factory=list)
    added_to: int = 0  # images the group already held when this run added new ones to it
    world_size: int = 1  # processes of the torchrun job
    rank: int = 0  # this process's rank
    dim: int | None = None  # feature dimension of the group

    @property
    def images_per_s(self) -> float:
        return self.n_processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "out": str(self.out), "images_per_s": self.images_per_s}

    def summary(self) -> str:
        if self.cache_hit:
            return (f"Cache hit: '{self.key}' in {self.out} already holds features for all {self.n_images} images "
                    f"({self.n_rows} rows{self._dim(', ')}, {self.n_skipped} skipped); nothing to do.")
        resumed = f" (resumed at image {self.resumed_from})" if self.resumed_from else ""
        if self.rank:
            return (f"Rank {self.rank} of {self.world_size}: embedded {self.n_processed} images{resumed} in {self.seconds:.1f} s "
                    f"on {self.device}; rank 0 assembled '{self.key}' in {self.out}.")
        new = f" new images (added to the {self.added_to} already stored)" if self.added_to else " images"
        where = f"{self.world_size} processes, {self.device} on rank 0" if self.world_size > 1 else self.device
        text = (f"Extracted {self.n_processed}{new}{resumed} in {self.seconds:.1f} s "
                f"({self.images_per_s:.1f} images/s on {where}, {self.precision}): "
                f"{self.n_rows} feature rows, {self.n_skipped} skipped")
        if self.skipped:
            text += f" ({skip_digest(self.skipped)}; full reasons in the store's skipped list)"
        return text + f". Features{self._dim(' (', ')')} are in {self.out} under '{self.key}'."

    def _dim(self, before: str, after: str = "") -> str:
        return f"{before}{self.dim}-dimensional{after}" if self.dim else ""


def skip_digest(skipped: list[tuple[str, str]], shown: int = 3) -> str:
    """'2 not a readable image: a.png, b.png; 1 empty file: c.png': skipped images grouped by reason."""
    by_reason: dict[str, list[str]] = {}
    for image_id, reason in skipped:
        by_reason.setdefault(reason.split(":")[0].split(" (")[0], []).append(image_id)
    return "; ".join(f"{len(ids)} {reason}: {', '.join(ids[:shown])}{', ...' if len(ids) > shown else ''}"
                     for reason, ids in by_reason.items())
