"""``featx predict``: the head's own backbone (same weights, verified by hash; same preprocessing) and the head on new images."""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .configs import PredictConfig
from .embedder import ImageEmbedder
from .errors import FeatxError
from .files import atomic_path
from .head_folder import LoadedHead, load_head
from .sources import ImageSource, resolve_source

__all__ = ["PredictResult", "predict_images"]

_logger = logging.getLogger(__name__)


@dataclass
class PredictResult:
    """What ``predict_images`` wrote."""

    out: Path
    n_images: int
    n_predicted: int
    unreadable: list[tuple[str, str]]  # (path, reason)
    seconds: float
    accuracy: float | None = None  # when the source carries labels

    def to_dict(self) -> dict:
        return {**asdict(self), "out": str(self.out)}

    def summary(self) -> str:
        text = f"Predicted {self.n_predicted} of {self.n_images} images in {self.seconds:.1f} s into {self.out}"
        if self.accuracy is not None:
            text += f" (accuracy on the source's labels: {self.accuracy:.4f})"
        if self.unreadable:
            text += f"; {len(self.unreadable)} unreadable, listed with an empty label and the reason in the 'error' column"
        return text + "."


def predict_images(head_dir: str | os.PathLike, source, out: str | os.PathLike, config: PredictConfig | None = None) -> PredictResult:
    """Embed the images of ``source`` with the head's backbone and write ``path,label,probability,error[,true_label]``
    per image to the CSV ``out``.

    Unreadable images get a row with an empty label and the reason in ``error``; they never stop the run.
    ``config.weights`` points at the checkpoint when it has moved; its hash must still match the head's.
    """
    config = config or PredictConfig()
    t0 = time.perf_counter()
    out = Path(out)
    if out.is_dir():
        raise FeatxError(f"--out '{out}' is a folder; pass a CSV file path such as {out / 'predictions.csv'}")
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise FeatxError(f"cannot write --out '{out}': folder '{out.parent}' does not exist")
    head = load_head(head_dir)
    src = source if isinstance(source, ImageSource) else resolve_source(source)
    embedder = head_embedder(head, device=config.device, batch_size=config.batch_size, workers=config.workers, weights=config.weights)
    feats, reasons = _embed(embedder, src, int(head.meta["feature_dim"]), config.progress)
    if head.meta["backbone"].get("dtype") == "float16":
        feats = feats.astype(np.float16).astype(np.float32)  # as the head saw its training features
    labels, probs = _classify(head, feats, reasons)
    has_truth = bool((src.labels >= 0).any()) and list(src.class_names) == list(head.class_names)
    paths = [str(src.path(i)) if src.path(i) is not None else src.ids[i] for i in range(len(src))]
    _write_csv(out, paths, head.class_names, labels, probs, reasons, src.labels if has_truth else None)
    unreadable = [(paths[i], reasons[i]) for i in sorted(reasons)]
    if unreadable:
        shown = "; ".join(f"{p}: {r}" for p, r in unreadable[:10])
        _logger.warning("%d images could not be read (empty label in the CSV): %s%s", len(unreadable), shown,
                        "; ..." if len(unreadable) > 10 else "")
    accuracy = None
    if has_truth:
        m = (src.labels >= 0) & (labels >= 0)
        accuracy = float((src.labels[m] == labels[m]).mean()) if m.any() else None
    return PredictResult(out=out, n_images=len(src), n_predicted=int((labels >= 0).sum()), unreadable=unreadable,
                         seconds=time.perf_counter() - t0, accuracy=accuracy)


def head_embedder(head: LoadedHead, *, device: str = "auto", batch_size: int = 64, workers: int | None = None,
                  weights: str | None = None) -> ImageEmbedder:
    """The backbone the head's features came from, rebuilt and checked (weights hash, preprocessing)."""
    bb = head.meta["backbone"]
    recorded = bb.get("weights") or "random"
    ckpt = weights or (None if recorded in ("random", "timm-pretrained") else recorded)
    if ckpt is not None and not Path(ckpt).is_file():
        raise FeatxError(f"the checkpoint the head's features came from, '{ckpt}', does not exist; pass its new location with --weights PATH")
    mode = json.loads(bb.get("preprocessing") or "{}").get("mode", "host")
    embedder = ImageEmbedder(bb["model"], pretrained=recorded == "timm-pretrained" and weights is None, weights=ckpt,
                             img_size=bb.get("img_size"), device=device, precision=_precision(bb, device), batch_size=batch_size,
                             workers=workers, preprocess=mode).fit()
    if embedder.info_.weights_sha256 != bb.get("weights_sha256"):
        raise FeatxError(
            f"the backbone weights ({embedder.info_.weights}) hash to {embedder.info_.weights_sha256[:12]}..., but head "
            f"'{head.path}' was fitted on features of weights {str(bb.get('weights_sha256'))[:12]}...; restore the original "
            "checkpoint or refit the head on features of these weights"
        )
    rebuilt = embedder.identity()["data_config"]
    if bb.get("data_config") and rebuilt != bb["data_config"]:
        raise FeatxError(f"rebuilt preprocessing {rebuilt} differs from the recorded {bb['data_config']}; "
                         "use the timm version the features were extracted with")
    return embedder


def _precision(bb: dict, device: str) -> str:
    from .device import resolve_device

    precision = bb.get("precision") or "fp32"
    if precision == "fp16" and resolve_device(device).type == "cpu":
        _logger.warning("features were computed in fp16, which this CPU cannot run; using fp32 (predictions may differ slightly)")
        return "fp32"
    return precision


def _embed(embedder: ImageEmbedder, src: ImageSource, dim: int, progress: bool) -> tuple[np.ndarray, dict[int, str]]:
    """(features [n, dim] with NaN rows for unreadable images, {image index: reason})."""
    n = len(src)
    feats = np.full((n, dim), np.nan, np.float32)
    reasons: dict[int, str] = {}
    with tqdm(total=n, unit="img", desc="predict", disable=not progress) as bar:
        for batch in embedder.iter_batches(src):
            if batch.index:
                if batch.features.shape[1] != dim:
                    raise FeatxError(f"the backbone gives {batch.features.shape[1]}-dimensional features, the head expects {dim}")
                feats[batch.index] = batch.features
            reasons.update(dict(batch.bad))
            bar.update(len(batch.index) + len(batch.bad))
    return feats, reasons


def _classify(head: LoadedHead, feats: np.ndarray, reasons: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class index or -1, probability or NaN) per image; non-finite embeddings get a reason."""
    n = len(feats)
    finite = np.isfinite(feats).all(axis=1)
    for i in np.flatnonzero(~finite):
        reasons.setdefault(int(i), "embedding is NaN or infinite")
    ok_idx = np.flatnonzero(finite)
    labels, probs = np.full(n, -1, dtype=np.int64), np.full(n, np.nan)
    if len(ok_idx):
        s = head.scores(feats[ok_idx])
        labels[ok_idx] = s.argmax(axis=1)
        probs[ok_idx] = s.max(axis=1)
    return labels, probs


def _write_csv(out: Path, paths, names, labels, probs, reasons, truth) -> None:
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "probability", "error"] + (["true_label"] if truth is not None else []))
        for i in range(len(paths)):
            row = [paths[i], names[labels[i]] if labels[i] >= 0 else "", f"{probs[i]:.6f}" if labels[i] >= 0 else "", reasons.get(i, "")]
            if truth is not None:
                row.append(names[truth[i]] if truth[i] >= 0 else "")
            w.writerow(row)
