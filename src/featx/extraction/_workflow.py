"""``featx extract``: frozen backbones over an image source, rows into the feature store.

Design (see DINOv2's ``extract_features``): inference mode, a fixed grid of batches over the
image list, every image accounted for (a row or a recorded skip), asserted at the end. Batches
are written to a journal as they finish and the finished group is committed into the store
atomically, so a killed run resumes where it stopped and reproduces the uninterrupted features
exactly (same batch grid, same kernels). Several backbones share one decode pass. Under torchrun
each rank embeds a contiguous share of the list into its own journal on its own device, and rank 0
joins the journals into the group, in image-list order, once every rank is done.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..configs import ExtractConfig
from ..distributed import Ranks, contiguous_shares, gather, launched_ranks, process_group, rank_device
from ..embedder import embed_together
from ..errors import FeatxError
from ..sources import ImageSource
from ..store import FeatureStore, ImageList, JournalWriter, commit_parts, group_attrs, journal_path
from ._cached import check_extraction
from ._plan import Job, group_meta, plan_job
from ._result import ExtractResult, skip_digest

__all__ = ["ExtractConfig", "ExtractResult", "extract", "extract_many"]

_logger = logging.getLogger(__name__)


def extract(source: str | ImageSource, config: ExtractConfig, out: str | os.PathLike) -> ExtractResult:
    """Extract embeddings of every image in ``source`` with ``config.model`` into the store ``out``."""
    return extract_many(source, [config], out)[0]


def extract_many(source: str | ImageSource, configs: list[ExtractConfig], out: str | os.PathLike) -> list[ExtractResult]:
    """Extract with several backbones (one group each) in one decode pass; each group is what :func:`extract` would write.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this with the same arguments.
    """
    t_start = time.perf_counter()
    out = Path(out)
    src = check_extraction(source, configs, out)
    ranks = launched_ranks()
    with process_group(ranks):
        device = rank_device(configs[0].device, ranks)
        jobs = [plan_job(c, src, out, device, ranks.world if ranks else 1, speak=ranks is None or ranks.is_main) for c in configs]
        _agree(jobs, ranks)
        processed, resumed = _embed_jobs(jobs, src, out, ranks, t_start)
        totals = gather(processed, ranks)  # also waits until every rank's journals are finished
        error = None
        if ranks is None or ranks.is_main:
            try:
                for job in jobs:
                    if job.todo is not None:
                        _commit(job, src, out, ranks, time.perf_counter() - t_start)
            except FeatxError as e:
                error = str(e)
        errors = [e for e in gather(error, ranks) if e]
        if errors:
            raise FeatxError(errors[0])
    seconds = time.perf_counter() - t_start
    results = [_result(job, src, out, ranks, seconds, sum(t[j] for t in totals) if (ranks is None or ranks.is_main) else processed[j],
                       resumed[j]) for j, job in enumerate(jobs)]
    if ranks is None or ranks.is_main:
        for r in results:
            _warn_skips(r)
    return results


def _agree(jobs: list[Job], ranks: Ranks | None) -> None:
    """Every rank must have planned the same work (the same images seen, the same groups found)."""
    plan = [(j.key, None if j.todo is None else (len(j.todo), int(j.todo.sum())), j.extend) for j in jobs]
    if any(p != plan for p in gather(plan, ranks)):
        raise FeatxError("the ranks of this torchrun job see different images or stores; give every node the same SOURCE and --out "
                         "(a shared file system) and do not change them while the job starts")


def _share(job: Job, src: ImageSource, ranks: Ranks | None) -> np.ndarray:
    """Positions (in the image list) this rank embeds for ``job``: a contiguous part of its work, shard-aligned for tars."""
    if ranks is None:
        return job.todo
    starts = src.subset(job.todo).shard_starts() if src.tar is not None else None
    a, b = contiguous_shares(len(job.todo), ranks.world, starts)[ranks.rank]
    return job.todo[a:b]


def _open_journal(job: Job, src: ImageSource, sub: ImageSource, out: Path, ranks: Ranks | None) -> JournalWriter:
    whole = ranks is None and not job.extend
    key = job.store_key if whole else replace(job.store_key, image_list_sha256=sub.fingerprint(),
                                              image_stamps_sha256=sub.stamps_fingerprint())
    writer = JournalWriter(out, job.key, key, group_meta(job, src), dim=job.embedder.num_features_,
                           n_images=len(sub), batch_size=job.config.batch_size, split_names=src.split_names,
                           part=ranks.tag if ranks else "")
    if writer.resumed:
        if writer.batch_size != job.config.batch_size:
            _logger.warning("resuming with the interrupted run's batch size %d so features match an uninterrupted run", writer.batch_size)
        _logger.info("resuming '%s' at image %d of %d", job.key, writer.next_image, len(sub))
    return writer


def _embed_jobs(jobs: list[Job], src: ImageSource, out: Path, ranks: Ranks | None, t_start: float) -> tuple[list[int], list[int]]:
    """Embed this rank's share of every job into its journal; jobs with the same images share one decode pass."""
    processed, resumed = [0] * len(jobs), [0] * len(jobs)
    passes: dict[tuple, list[int]] = {}
    writers: dict[int, JournalWriter] = {}
    shares = {}
    try:
        for j, job in enumerate(jobs):
            if job.todo is None:
                continue
            shares[j] = _share(job, src, ranks)
            sub = src if len(shares[j]) == len(src) else src.subset(shares[j])
            writers[j] = _open_journal(job, src, sub, out, ranks)
            resumed[j] = writers[j].next_image
            passes.setdefault((shares[j].tobytes(), writers[j].batch_size), []).append(j)
        for members in passes.values():
            positions = shares[members[0]]
            sub = src if len(positions) == len(src) else src.subset(positions)
            counts = _embed_pass([jobs[j] for j in members], [writers[j] for j in members], src, sub, positions,
                                 progress=jobs[members[0]].config.progress and (ranks is None or ranks.is_main))
            for j, n in zip(members, counts):
                processed[j] = n
        for j, w in writers.items():
            rows, skips = int(w.g.attrs["n_rows"]), int(w.g.attrs["n_skipped"])
            assert w.next_image == len(shares[j]) and rows + skips == len(shares[j]), "every image has a row or a recorded skip"
            if rows == 0 and ranks is None and not jobs[j].extend:
                _nothing_readable(w, src)
            elapsed = time.perf_counter() - t_start
            w.finish({"extract_seconds_last_run": elapsed, "device": str(jobs[j].embedder.device_),
                      "world_size": ranks.world if ranks else 1, "images_per_s": processed[j] / elapsed if elapsed > 0 else 0.0})
    except BaseException:
        for w in writers.values():
            w.close()
        raise
    return processed, resumed


def _nothing_readable(writer: JournalWriter, src: ImageSource) -> None:
    """No image could be read: nothing reaches the store, and the error names the first reasons."""
    skipped = writer.skipped()
    writer.discard()
    hint = ""
    if all(reason == "file not found" for _, reason in skipped) and str(src.name).lower().endswith(".csv"):
        hint = "; paths in a CSV manifest are relative to the CSV's folder"
    raise FeatxError(f"none of the {len(src)} images of '{src.name}' could be read ({skip_digest(skipped)}){hint}; nothing was written")


# Share of unreadable images above which extraction warns loudly (a few broken files are normal).
LOUD_SKIP_SHARE = 0.05


def _warn_skips(result: ExtractResult) -> None:
    if not result.cache_hit and result.n_skipped > LOUD_SKIP_SHARE * result.n_images:
        _logger.warning("%d of %d images (%.0f%%) could not be read and are skipped: %s", result.n_skipped, result.n_images,
                        100 * result.n_skipped / result.n_images, skip_digest(result.skipped) if result.skipped else "see the store")


def _embed_pass(jobs: list[Job], writers: list[JournalWriter], src: ImageSource, sub: ImageSource, positions: np.ndarray, *,
                progress: bool) -> list[int]:
    """Embed ``sub`` (images ``positions`` of ``src``) once for all ``jobs``, from where the least advanced journal stopped."""
    codes = {s: i for i, s in enumerate(src.split_names)}
    split_codes = np.asarray([codes[s] for s in sub.splits], dtype=np.int8)
    stamps = sub.file_stamps()
    done = [w.next_image for w in writers]
    start = min(done)
    counts = [0] * len(jobs)
    names = "+".join(job.embedder.model for job in jobs)
    with tqdm(total=len(sub), initial=start, unit="img", desc=f"extract {names}", disable=not progress, smoothing=0.1) as bar:
        for batches in embed_together([job.embedder for job in jobs], sub, start=start, batch_size=writers[0].batch_size,
                                      workers=jobs[0].config.workers, digests=True, done=done):
            for k, (job, writer, batch) in enumerate(zip(jobs, writers, batches)):
                if batch is None:
                    continue
                idx = np.asarray(batch.index, dtype=np.int64)
                bad = np.asarray([i for i, _ in batch.bad], dtype=np.int64)
                writer.write_batch(batch.next_image, batch.features.astype(np.dtype(job.config.dtype), copy=False), positions[idx],
                                   [sub.ids[i] for i in batch.index], sub.labels[idx], split_codes[idx],
                                   [(int(positions[i]), sub.ids[i], reason) for i, reason in batch.bad],
                                   digests=batch.digests, stamps=stamps[idx], skipped_stamps=stamps[bad])
                counts[k] += len(batch.index) + len(batch.bad)
            bar.update(batch.next_image - bar.n)
    return counts


def _commit(job: Job, src: ImageSource, out: Path, ranks: Ranks | None, seconds: float) -> None:
    """Put the finished journals of ``job`` into the store: as they are (one process, all images), or joined."""
    if ranks is None and not job.extend:
        commit_parts(out, job.key, [journal_path(out, job.key)], overwrite=job.config.overwrite)
        return
    codes = {s: i for i, s in enumerate(src.split_names)}
    journals = [journal_path(out, job.key, r.tag) for r in _all_ranks(ranks)] if ranks else [journal_path(out, job.key)]
    attrs = {**asdict(job.store_key), **group_meta(job, src), "split_names": json.dumps(src.split_names),
             "world_size": ranks.world if ranks else 1, "extract_seconds_last_run": seconds, "device": str(job.embedder.device_)}
    image_list = ImageList(src.ids, src.labels, np.asarray([codes[s] for s in src.splits], dtype=np.int8)) if job.extend else None
    commit_parts(out, job.key, journals, attrs=attrs, overwrite=job.config.overwrite, extend=job.extend, image_list=image_list)


def _all_ranks(ranks: Ranks) -> list[Ranks]:
    return [Ranks(r, ranks.world, 0) for r in range(ranks.world)]


def _result(job: Job, src: ImageSource, out: Path, ranks: Ranks | None, seconds: float, processed: int, resumed: int) -> ExtractResult:
    common = dict(out=out, key=job.key, n_images=len(src), device=str(job.embedder.device_), precision=job.embedder.precision_,
                  world_size=ranks.world if ranks else 1, rank=ranks.rank if ranks else 0, dim=job.embedder.num_features_)
    attrs = group_attrs(out, job.key) or {}
    n_rows, n_skipped = int(attrs.get("n_rows", 0)), int(attrs.get("n_skipped", 0))
    if job.todo is None:
        return ExtractResult(**common, n_rows=n_rows, n_skipped=n_skipped, n_processed=0, seconds=seconds, cache_hit=True)
    skipped = []
    if ranks is None or ranks.is_main:
        with FeatureStore(out) as store:
            skipped = store.skipped(job.key)
    return ExtractResult(**common, n_rows=n_rows, n_skipped=n_skipped, n_processed=processed, seconds=seconds, resumed_from=resumed,
                         skipped=skipped, added_to=job.added_to)
