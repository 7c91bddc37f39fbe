"""``featx compare``: extract every backbone into one store, fit every head with --sweep, optionally fine-tune, rank.

Every step is cached: a group already in the store with the same settings is a cache hit, a head folder whose
request and image list match is reused, a finished fine-tuning run is reused; an interrupted comparison rerun
continues from what is finished.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..configs import CompareConfig, ExtractConfig, FinetuneConfig, FitHeadConfig
from ..errors import FeatxError
from ..extraction import extract
from ..files import check_writable, write_text_atomic
from ..fitting import fit_head, near_duplicates_line, plan_fit
from ..head_folder import PREDICTIONS, read_predictions
from ..heads import HEADS
from ..sources import ImageSource, resolve_source
from ..store import FeatureStore
from ._plan import Backbone, is_store, parse_heads, parse_models
from ._recommend import OTHER_IMAGES, correct_on, mark_test_ties, recommend, summary_line
from ._report import Leaderboard, finetune_row, head_row

__all__ = ["CompareResult", "compare"]

_logger = logging.getLogger(__name__)

# A fine-tuning run's per-image test predictions: featx finetune writes them beside metrics.json; the chosen model's column
FINETUNE_PREDICTIONS = "test_predictions.csv"
FINETUNE_PREDICTED = ("finetuned", "predicted", "prediction", "chosen")


@dataclass
class CompareResult:
    """The leaderboard and where it was written."""

    out: Path
    leaderboard: Leaderboard
    plan: str  # the one-line plan printed at the start
    done: dict = field(default_factory=dict)  # {'extracted': n, 'cached_groups': n, 'fitted': n, 'cached_heads': n, ...}
    near_duplicates: int = 0  # test images with a near-duplicate among the training images (as fit-head counts them)
    features: str | None = None  # the store the rows were fitted on

    def to_dict(self) -> dict:
        return {"out": str(self.out), "plan": self.plan, "done": self.done, "n_train_test_near_duplicates": self.near_duplicates,
                **self.leaderboard.to_dict()}

    def summary(self) -> str:
        note = f"\n{near_duplicates_line(self.near_duplicates, self.leaderboard.test['n'], self.features)}" if self.near_duplicates else ""
        return (self.leaderboard.markdown() + f"\n\n{self.leaderboard.summary}"
                + f"\nWrote {', '.join(str(p) for p in self.leaderboard.paths)}." + note)


def compare(source: str | os.PathLike | ImageSource, config: CompareConfig, out: str | os.PathLike) -> CompareResult:
    """The leaderboard of ``config.models`` x ``config.heads`` (x fine-tuning) on ``source``, or of every group of a store."""
    out = Path(out)
    check_writable(out, option="--out", folder=True)
    heads = parse_heads(config.heads)
    from_store = not isinstance(source, ImageSource) and is_store(source)
    if from_store:
        if config.models or config.finetune:
            raise FeatxError("comparing an existing store uses its groups; --model and --finetune need an image SOURCE")
        store, backbones, src = Path(source), None, None
    else:
        backbones = parse_models(config)
        src = source if isinstance(source, ImageSource) else resolve_source(source)
        if not (src.labels >= 0).any():
            raise FeatxError(f"source '{src.name}' has no labels; a comparison needs labelled images (<class>/<image> or a CSV label column)")
        store = out / "features.h5"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    steps = _Steps(out, store, heads, config, backbones)
    plan = steps.describe(src)
    _logger.info("%s", plan)
    with tqdm(total=steps.total, desc="compare", unit="step", disable=not config.progress) as bar:
        steps.bar = bar
        groups = steps.extract_all(src) if backbones else _store_groups(store)
        test, test_ids = steps.test_images(groups[0])
        scored = [r for key in groups for r in steps.fit_heads(key, test_ids)]
        if config.finetune:
            scored += [steps.finetune(src, b, test_ids) for b in backbones]
        earlier = steps.earlier_rows({(r["backbone"], r["head"]) for r, _ in scored}, test_ids)
    rows, correct = [r for r, _ in scored + earlier], [c for _, c in scored + earlier]
    recommended = recommend(rows)
    mark_test_ties(rows, correct, recommended)
    leaderboard = Leaderboard(rows, test, n_classes=steps.n_classes(groups[0]), summary=summary_line(rows, recommended, test["n"]),
                              earlier=[f"{r['backbone']} + {r['head']}" for r, _ in earlier])
    leaderboard.write(out)
    steps.done["seconds"] = time.perf_counter() - t0
    return CompareResult(out=out, leaderboard=leaderboard, plan=plan, done=steps.done, near_duplicates=steps.near_duplicates,
                         features=str(store))


def _store_groups(store: Path) -> list[str]:
    """Every group of an existing store; they must hold features of one image list."""
    with FeatureStore(store) as fs:
        groups = fs.models()
        if not groups:
            raise FeatxError(f"feature store '{store}' holds no features")
        lists = {g: fs.attrs(g).get("image_list_sha256") for g in groups}
    first = groups[0]
    other = [g for g in groups if lists[g] != lists[first]]
    if other:
        raise FeatxError(f"group '{other[0]}' of '{store}' was extracted from another image list than '{first}'; "
                         "compare groups of the same images (extract them from one source)")
    return groups


class _Steps:
    """The comparison's steps, each skipped when its result is already there."""

    def __init__(self, out: Path, store: Path, heads: list[str], config: CompareConfig, backbones: list[Backbone] | None):
        self.out, self.store, self.heads, self.config, self.backbones = out, store, heads, config, backbones
        self.done = {"extracted": 0, "cached_groups": 0, "fitted": 0, "cached_heads": 0, "finetuned": 0, "cached_finetunes": 0}
        self.bar = None
        self.near_duplicates = 0  # the most test images with a training near-duplicate, over the groups' heads
        self.groups = [b.key for b in backbones] if backbones else _store_groups(store)
        self.total = len(self.groups) * (len(heads) + (1 if backbones else 0) + (1 if config.finetune else 0))

    def describe(self, src: ImageSource | None) -> str:
        cached_groups = self._cached_groups()
        cached_heads = sum(self._cached_head(g, h) is not None for g in cached_groups for h in self.heads)
        return (f"{len(self.groups)} backbone{'s' if len(self.groups) > 1 else ''} x {len(self.heads)} heads"
                + (" + fine-tuning" if self.config.finetune else "")
                + (f" on {len(src)} images of '{src.name}'" if src is not None else f" on the groups of '{self.store}'")
                + f", {len(cached_groups)} backbone{'s' if len(cached_groups) != 1 else ''} and {cached_heads} heads cached")

    def _cached_groups(self) -> list[str]:
        if not self.store.exists():
            return []
        with FeatureStore(self.store) as fs:
            return [g for g in fs.models() if g in self.groups]

    def _step(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update()

    def extract_all(self, src: ImageSource) -> list[str]:
        """Every backbone into the store, one pass each, so each row's images/s is its own backbone's."""
        c = self.config
        for b in self.backbones:
            result = extract(src, ExtractConfig(model=b.model, pretrained=b.pretrained, weights=b.weights, img_size=c.img_size,
                                                device=c.device, batch_size=c.batch_size, workers=c.workers, precision=c.precision,
                                                layers=c.layers, tta=c.tta, key=b.key, progress=False), self.store)
            self.done["cached_groups" if result.cache_hit else "extracted"] += 1
            self._step(f"{b.key}: {'cached' if result.cache_hit else f'{result.images_per_s:.0f} img/s'}")
        return [b.key for b in self.backbones]

    def _head_dir(self, group: str, head: str) -> Path:
        return self.out / "heads" / group / head

    def _head_config(self, group: str, head: str) -> FitHeadConfig:
        # --sweep for every head: one without a grid still gets its validation accuracy, which the recommendation reads
        return FitHeadConfig(head=head, model=group, sweep=True, device=self.config.device, seed=self.config.seed,
                             progress=False, overwrite=True)

    def _cached_head(self, group: str, head: str) -> dict | None:
        """The sidecar of a head fitted earlier with the same request on the same images (and its test predictions), else None."""
        sidecar = self._head_dir(group, head) / "head.json"
        if not sidecar.is_file() or not (self._head_dir(group, head) / PREDICTIONS).is_file():
            return None
        try:
            meta = json.loads(sidecar.read_text())
            with FeatureStore(self.store) as fs:
                attrs = fs.attrs(group)
                want = plan_fit(fs, self.store, self._head_config(group, head), None).request
        except (OSError, json.JSONDecodeError, FeatxError):
            return None
        same_images = meta.get("backbone", {}).get("image_list_sha256") == attrs.get("image_list_sha256")
        same_weights = meta.get("backbone", {}).get("weights_sha256") == attrs.get("weights_sha256")
        return meta if meta.get("request") == want and same_images and same_weights else None

    def fit_heads(self, group: str, test_ids: list[str]) -> list[tuple[dict, object]]:
        """(row, right/wrong per test image) of every head on ``group``, fitted or read back."""
        with FeatureStore(self.store) as fs:
            attrs = fs.attrs(group)
        rows = []
        for head in self.heads:
            meta = self._cached_head(group, head)
            if meta is None:
                fit_head(self.store, self._head_config(group, head), self._head_dir(group, head))
                meta = json.loads((self._head_dir(group, head) / "head.json").read_text())
                self.done["fitted"] += 1
            else:
                self.done["cached_heads"] += 1
            rows.append((head_row(group, head, meta, attrs), self._head_correct(group, head, test_ids)))
            self.near_duplicates = max(self.near_duplicates, int(meta.get("n_train_test_near_duplicates") or 0))
            self._step(f"{group} {head}: {rows[-1][0]['accuracy']:.3f}")
        return rows

    def _head_correct(self, group: str, head: str, test_ids: list[str]):
        return correct_on(test_ids, read_predictions(self._head_dir(group, head) / PREDICTIONS), f"the head folder has no {PREDICTIONS}")

    def finetune(self, src: ImageSource, b: Backbone, test_ids: list[str]) -> tuple[dict, object]:
        from ..finetuning import finetune

        c = self.config
        run_dir = self.out / "finetune" / b.key
        config = FinetuneConfig(model=b.model, pretrained=b.pretrained, weights=b.weights, img_size=c.img_size, device=c.device,
                                precision=c.precision, workers=c.workers, seed=c.seed, progress=False, resume=True)
        if (run_dir / "metrics.json").is_file():
            self.done["cached_finetunes"] += 1
        else:
            finetune(src, config, run_dir)
            self.done["finetuned"] += 1
        row, correct = self._finetune_row(b.key, run_dir, test_ids)
        self._step(f"{b.key} fine-tune: {row['accuracy']:.3f}")
        return row, correct

    def _finetune_row(self, key: str, run_dir: Path, test_ids: list[str]) -> tuple[dict, object]:
        """A fine-tuning run's row; its per-image test predictions (the chosen model's) from the run's test_predictions.csv."""
        metrics = json.loads((run_dir / "metrics.json").read_text())
        with FeatureStore(self.store) as fs:
            attrs = fs.attrs(key)
        by_id = read_predictions(run_dir / FINETUNE_PREDICTIONS, predicted=FINETUNE_PREDICTED, true=("true", "label", "true_label"))
        missing = (f"the run folder has no per-image test predictions ({FINETUNE_PREDICTIONS} with id, true and predicted columns), "
                   "so no paired test")
        return finetune_row(key, metrics, attrs), correct_on(test_ids, by_id, missing)

    def earlier_rows(self, done: set[tuple[str, str]], test_ids: list[str]) -> list[tuple[dict, object]]:
        """Rows still cached in the folder from earlier runs (other --heads, --model or --finetune) on the same test images."""
        if not self.store.exists():
            return []
        with FeatureStore(self.store) as fs:
            groups = fs.models()
        found = []
        for group in groups:
            for sidecar in sorted((self.out / "heads" / group).glob("*/head.json")):
                head = sidecar.parent.name
                if (group, head) in done or head not in HEADS or (meta := self._cached_head(group, head)) is None:
                    continue
                with FeatureStore(self.store) as fs:
                    row = head_row(group, head, meta, fs.attrs(group))
                found.append((row, self._head_correct(group, head, test_ids)))
            run_dir = self.out / "finetune" / group
            if (group, "finetune") not in done and (run_dir / "metrics.json").is_file():
                found.append(self._finetune_row(group, run_dir, test_ids))
        kept = []
        for r, c in found:
            if isinstance(c, str) and OTHER_IMAGES in c:
                _logger.warning("left out %s + %s, cached from an earlier run: %s", r["backbone"], r["head"], c)
                continue
            r["origin"] = "earlier run"
            kept.append((r, c))
        self.done["earlier_rows"] = len(kept)
        return kept

    def test_images(self, group: str) -> tuple[dict, list[str]]:
        """Which images every row is scored on (the fit-head rule), with their ids written to test_images.txt."""
        with FeatureStore(self.store) as fs:
            plan = plan_fit(fs, self.store, self._head_config(group, self.heads[0]), None)
            ids = fs.ids_of(plan.key, plan.test_rows)
        write_text_atomic(self.out / "test_images.txt", "\n".join(ids) + "\n")
        return {"description": plan.test_description, "n": len(ids), "file": "test_images.txt"}, ids

    def n_classes(self, group: str) -> int:
        with FeatureStore(self.store) as fs:
            return len(fs.class_names(group))
