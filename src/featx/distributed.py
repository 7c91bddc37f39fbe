"""Running under torchrun: which rank this process is, its device, its share of a list, and the few collective steps.

Outside torchrun (or in a job of one process) :func:`launched_ranks` is None and nothing here
does anything. Coordination (barriers, a handful of small messages) always goes over gloo, on CPU
and GPU jobs alike: features never travel between ranks, each rank writes its own journal.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

from .errors import FeatxError

__all__ = ["Ranks", "launched_ranks", "rank_device", "process_group", "gather", "contiguous_shares"]

# A barrier waits for the slowest rank's whole share; torchrun ends the job if a rank dies, so this
# only has to exceed the longest extraction.
COLLECTIVE_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job."""

    rank: int  # global rank, 0 .. world - 1
    world: int  # number of processes in the job
    local_rank: int  # rank on this node: the GPU it uses

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        """'rank1-of-4': names this rank's journals."""
        return f"rank{self.rank}-of-{self.world}"


def launched_ranks() -> Ranks | None:
    """The ranks torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK); None outside a job of several."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        ranks = Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
    except ValueError:
        raise FeatxError(f"RANK={env['RANK']!r} / WORLD_SIZE={env['WORLD_SIZE']!r} are not integers; launch featx with torchrun") from None
    return ranks if ranks.world > 1 else None


def rank_device(device: str, ranks: Ranks | None) -> str:
    """``auto`` and ``cuda`` become ``cuda:LOCAL_RANK`` when CUDA is present (modulo the GPU count); anything else is kept."""
    if ranks is None or device not in ("auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu" if device == "auto" else device
    return f"cuda:{ranks.local_rank % torch.cuda.device_count()}"  # more processes than GPUs share them


@contextmanager
def process_group(ranks: Ranks | None):
    """The default process group over gloo for the duration of the block (if none is set up yet)."""
    if ranks is None:
        yield
        return
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def gather(value, ranks: Ranks | None) -> list:
    """``value`` of every rank, in rank order (every rank gets the list); ``[value]`` outside a job."""
    if ranks is None:
        return [value]
    import torch.distributed as dist

    out = [None] * ranks.world
    dist.all_gather_object(out, value)
    return out


def contiguous_shares(n: int, world: int, starts: np.ndarray | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` of each rank's share of ``n`` items: contiguous, in order, as even as possible.

    With ``starts`` (positions where a new tar shard begins) and at least as many shards as ranks,
    the cuts are moved to the nearest shard start, so each rank reads whole shards.
    """
    cuts = [round(k * n / world) for k in range(world + 1)]
    if starts is not None and len(starts) >= world:
        allowed = np.asarray(starts, dtype=np.int64)
        for k in range(1, world):
            options = allowed[allowed > cuts[k - 1]]
            later = world - 1 - k  # cuts still to place after this one, each at a later shard start
            options = options[: len(options) - later] if later else options
            if len(options):
                cuts[k] = int(options[np.argmin(np.abs(options - cuts[k]))])
    return [(cuts[k], cuts[k + 1]) for k in range(world)]
