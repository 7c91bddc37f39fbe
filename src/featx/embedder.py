"""Images in, embeddings out: a frozen timm backbone with its own preprocessing, as one object.

:class:`ImageEmbedder` is what extraction, prediction and fine-tuning build their backbone
with, and it is a scikit-learn transformer on images::

    make_pipeline(ImageEmbedder("tf_efficientnet_lite0", weights="lite0.pth"), LogisticRegression())

fitted on a list of image paths, PIL images or an :class:`~featx.sources.ImageSource`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .backbones import create_backbone
from .device import autocast_context, inference_workers, keep_freed_memory, resolve_device, resolve_precision
from .errors import FeatxError
from .loading import fixed_grid_loader
from .preprocess import DevicePreprocessor, Geometry, eval_transform
from .runtimes import GRAPH_RUNTIMES, OnnxExportFailed, cached_onnx, default_cache_dir, graph_forward, resolve_runtime
from .sources import ImageSource, images_source
from .taps import EmbeddingNet, parse_taps, pooling_name, tapped

__all__ = ["ImageEmbedder", "EmbeddedBatch", "EmbeddingNet", "embed_together", "pooling_name", "head_embedder", "run_embedder"]

_logger = logging.getLogger(__name__)


@dataclass
class EmbeddedBatch:
    """One batch of the fixed grid: rows for the readable images, reasons for the others."""

    features: np.ndarray  # [len(index), D] float32
    index: list[int]  # image indices of the rows
    bad: list[tuple[int, str]]  # (image index, reason) of unreadable images
    next_image: int  # first image index after this batch
    digests: list[str] | None = None  # content digest of each row's image (aligned with index), when asked for


class ImageEmbedder(TransformerMixin, BaseEstimator):
    """Pooled pre-logits embeddings of a frozen timm backbone, preprocessing taken from timm.

    Parameters
    ----------
    model : timm model name.
    pretrained, weights : timm's hub weights (needs internet), or a local checkpoint; neither: seeded random init.
    img_size : input resolution (None: the model's).
    device, precision : 'auto' | 'cpu' | 'cuda[:N]'; 'auto' | 'fp32' | 'bf16' | 'fp16' (auto: bf16/fp16 on GPU, fp32 on CPU).
    batch_size, workers : images per forward; decoding workers (None: 0 on CPU, up to 16 on CUDA).
    preprocess : 'device' (decode in workers, resize/crop/normalise batched on the device),
        'host' (timm's PIL transform per image) or 'auto' (device when it reproduces the transform).
    channels_last, compile : memory format and torch.compile of the backbone.
    layers : which outputs to pool and concatenate, in this order: 'last' (the pooled pre-logits), stages counted
        from the end (-1 the last stage of timm's ``feature_info``, -2 the one before ...) or blocks (b-1, b-2 ...: block
        outputs, for models whose ``forward_intermediates`` takes ``extra_blocks``), e.g. 'last,-1,-2'; every tap comes
        from the same forward pass and is global-average-pooled.
    tta : None, or 'flip': the embedding averaged over the image and its horizontal mirror (on CUDA one batched forward of
        both; on the CPU one forward per view).
    random_state : seed of the initialisation when no weights are loaded.
    num_classes : 0 for embeddings; K > 0 keeps the model's classifier over K classes (loaded from ``weights``, e.g. a
        fine-tuned checkpoint), so the outputs are its K logits (``layers`` must then be 'last').
    runtime : 'torch', 'onnx' / 'openvino' (the forward exported once to ONNX and run by ONNX Runtime / OpenVINO; CPU, fp32)
        or 'auto' (onnx, else openvino, where installed and on the CPU; else torch). A model that fails to export runs
        in torch, with one warning.
    onnx_cache : folder for exported graphs (None: the user's cache folder, ``~/.cache/featx/onnx``).
    """

    def __init__(self, model: str = "tf_efficientnet_lite0", *, pretrained: bool = False, weights: str | None = None,
                 img_size: int | None = None, device: str = "auto", precision: str = "auto", batch_size: int = 64,
                 workers: int | None = None, preprocess: str = "auto", channels_last: bool = True, compile: bool = False,
                 layers: str = "last", tta: str | None = None, random_state: int = 0, num_classes: int = 0,
                 runtime: str = "torch", onnx_cache: str | None = None):
        self.model = model
        self.pretrained = pretrained
        self.weights = weights
        self.img_size = img_size
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.workers = workers
        self.preprocess = preprocess
        self.channels_last = channels_last
        self.compile = compile
        self.layers = layers
        self.tta = tta
        self.random_state = random_state
        self.num_classes = num_classes
        self.runtime = runtime
        self.onnx_cache = onnx_cache

    # -- building ------------------------------------------------------------------------------
    def fit(self, X=None, y=None) -> "ImageEmbedder":
        """Create the backbone, load its weights and resolve its preprocessing (``X`` is not used)."""
        if self.batch_size < 1:
            raise FeatxError("--batch-size must be at least 1")
        self.device_ = resolve_device(self.device)
        self.precision_ = resolve_precision(self.precision, self.device_)
        if self.num_classes and self.layers != "last":
            raise FeatxError(f"--layers {self.layers}: a model with its classifier gives logits; use --layers last")
        self.model_, self.info_ = create_backbone(self.model, pretrained=self.pretrained, weights=self.weights, img_size=self.img_size,
                                                   num_classes=self.num_classes, seed=self.random_state)
        self.data_config_, self.transform_ = eval_transform(self.model_, self.img_size)
        self.geometry_ = Geometry.from_transform(self.transform_)
        self.preprocess_ = self._preprocess_mode()
        self._device_pre = DevicePreprocessor(self.geometry_) if self.preprocess_ == "device" else None
        self.taps_ = parse_taps(self.layers, self.model_, self.model)
        if self.tta not in (None, "none", "flip"):
            raise FeatxError(f"unknown --tta '{self.tta}'; use flip (or leave it out)")
        self.num_features_ = self.num_classes or sum(t.dim for t in self.taps_)
        self._forward_model = None
        self.runtime_ = resolve_runtime(self.runtime, self.device_, self.precision_, self.compile)
        self._graph = self._graph_forward() if self.runtime_ in GRAPH_RUNTIMES else None
        if self._graph is None:
            self.runtime_ = "torch"
        return self

    def embedding_net(self) -> EmbeddingNet:
        """The backbone with its taps and flip averaging as one module (on the CPU, eval mode)."""
        check_is_fitted(self, "model_")
        return EmbeddingNet(self.model_.eval(), self.taps_, self.tta)

    def _graph_identity(self) -> dict:
        keys = ("model", "weights_sha256", "img_size", "pooling", "layers", "tta")
        return {**{k: v for k, v in self.identity(runtime=False).items() if k in keys}, "num_classes": self.num_classes,
                "input_size": list(self.data_config_["input_size"])}

    def _graph_forward(self):
        """The forward exported to ONNX (cached) and loaded in the runtime; None, after one warning, when it cannot be."""
        example = torch.zeros(2, *self.data_config_["input_size"])
        try:
            path = cached_onnx(self.embedding_net(), example, self.onnx_cache or default_cache_dir(), self.model, self._graph_identity())
            return graph_forward(self.runtime_, path)
        except OnnxExportFailed as e:
            _logger.warning("'%s' could not be run as an ONNX graph (%s); computing it with --runtime torch", self.model, e)
            return None

    def _preprocess_mode(self) -> str:
        mode = self.preprocess
        if mode == "auto":
            return "device" if self.geometry_ is not None else "host"
        if mode == "device" and self.geometry_ is None:
            raise FeatxError(f"--preprocess device cannot reproduce this model's transform ({self.transform_}); use --preprocess host")
        if mode not in ("device", "host"):
            raise FeatxError(f"unknown preprocessing '{mode}'; use auto, device or host")
        return mode

    def identity(self, runtime: bool = True) -> dict:
        """What determines the embeddings besides the images: recorded with them and compared on reuse."""
        check_is_fitted(self, "model_")
        return ({"runtime": self.runtime_} if runtime else {}) | {
            "model": self.model,
            "weights_sha256": self.info_.weights_sha256,
            "data_config": json.dumps(self.data_config_, sort_keys=True, default=list),
            "preprocessing": json.dumps({"mode": self.preprocess_, "transform": repr(self.transform_)}),
            "img_size": int(self.data_config_["input_size"][-1]),
            "pooling": pooling_name(self.model_),
            "precision": self.precision_,
            "layers": ",".join(t.name for t in self.taps_),
            "tta": self.tta or "none",
        }

    def taps_json(self) -> str:
        """The concatenation order and the column range of every tap, recorded with the features."""
        return json.dumps([{"tap": t.name, "start": t.start, "stop": t.stop} for t in self.taps_])

    # -- embedding -----------------------------------------------------------------------------
    def prepare(self, img: Image.Image) -> torch.Tensor:
        """Host side of the preprocessing (runs in decoding workers): uint8 [3, H, W] or timm's normalised tensor."""
        return self._device_pre.host_prepare(img) if self._device_pre is not None else self.transform_(img)

    def _model_on_device(self) -> torch.nn.Module:
        if self._forward_model is None:
            model = self.model_.eval().to(self.device_)
            if self.device_.type == "cpu":
                keep_freed_memory()
            if self.channels_last:
                model = model.to(memory_format=torch.channels_last)
            self._forward_model = torch.compile(model, dynamic=True) if self.compile else model
        return self._forward_model

    def _forward(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(self.device_, self.precision_):
            return (model(x) if [t.name for t in self.taps_] == ["last"] else tapped(model, x, self.taps_)).float()

    @torch.inference_mode()
    def embed_prepared(self, prepared: list[torch.Tensor]) -> torch.Tensor:
        """Embeddings [len(prepared), D] (float32, on the device) of images returned by :meth:`prepare`."""
        if self._device_pre is not None:
            x = self._device_pre(prepared, self.device_)
        else:
            x = torch.stack(prepared).to(self.device_, non_blocking=True)
        if self._graph is not None:  # the graph computes taps and flip averaging itself
            return self._graph(x)
        model = self._model_on_device()
        views = [x, x.flip(3)] if self.tta == "flip" else [x]
        if self.device_.type == "cuda" and len(views) > 1:
            views = [torch.cat(views)]  # one batched forward of the image and its mirror
        # on the CPU, one forward per view. benchmarks/heads.py measured flip at 0.31x the last layer's images/s with one doubled
        # batch (section layers), 0.49x with one forward per view (section layers_speed): two runs on a noisy machine
        feats = torch.cat([self._forward(model, v) for v in views]) if len(views) > 1 else self._forward(model, views[0])
        if self.tta == "flip":
            feats = (feats[: len(feats) // 2] + feats[len(feats) // 2 :]) / 2
        return feats

    def iter_batches(self, source: ImageSource, *, start: int = 0, batch_size: int | None = None):
        """Yield an :class:`EmbeddedBatch` per batch of the fixed grid ``[start, start + batch_size), ...``.

        On CUDA the next batch is computed while the previous one is handed back.
        """
        check_is_fitted(self, "model_")
        for batches in embed_together([self], source, start=start, batch_size=batch_size or self.batch_size, workers=self.workers):
            yield batches[0]

    def transform(self, X) -> np.ndarray:
        """Embeddings [n, D] of ``X``: an ImageSource, or a list of image paths, PIL images or uint8 arrays."""
        check_is_fitted(self, "model_")
        source = X if isinstance(X, ImageSource) else images_source(X)
        out = np.empty((len(source), self.num_features_), np.float32)
        bad = []
        for batch in self.iter_batches(source):
            out[batch.index] = batch.features
            bad += batch.bad
        if bad:
            shown = "; ".join(f"{source.ids[i]}: {r}" for i, r in bad[:3])
            raise FeatxError(f"{len(bad)} images could not be read ({shown}); remove them or use featx extract, which skips them")
        return out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.input_tags.two_d_array = False
        return tags



def embed_together(embedders: list[ImageEmbedder], source: ImageSource, *, start: int = 0, batch_size: int,
                   workers: int | None = None, digests: bool = False, done: list[int] | None = None):
    """Yield, per batch of the fixed grid ``[start, start + batch_size), ...``, one :class:`EmbeddedBatch` per embedder.

    Each image is decoded once and prepared for every embedder (several backbones cost one decode
    pass). ``done[j]``: embedder ``j`` already holds the images before that position (its journal is
    ahead of the others'), so its entry is None for those batches. With ``digests`` each batch
    carries the content digest of its rows' images. On CUDA the next batch is computed while the
    previous one is handed back.
    """
    for e in embedders:
        check_is_fitted(e, "model_")
    if start >= len(source):
        return
    done = done or [0] * len(embedders)
    first = embedders[0]
    workers = inference_workers(first.device_) if workers is None else workers
    loader = fixed_grid_loader(source, [e.prepare for e in embedders], start=start, batch_size=batch_size, workers=workers, digests=digests)
    pending = None  # previous batches, handed back while the devices compute the next ones
    try:
        for batch in loader:
            ok = [(i, t, d) for i, t, _, d in batch if t is not None]
            active = [done[j] <= batch[0][0] for j in range(len(embedders))]
            feats = [e.embed_prepared([t[j] for _, t, _ in ok]).to("cpu", non_blocking=True) if ok and active[j] else None
                     for j, e in enumerate(embedders)]
            if pending is not None:
                yield pending
            for e in embedders:
                if e.device_.type == "cuda":
                    torch.cuda.current_stream(e.device_).synchronize()
            bad = [(i, r) for i, t, r, _ in batch if t is None]
            pending = [EmbeddedBatch(f.numpy() if f is not None else np.empty((0, e.num_features_), np.float32), [i for i, _, _ in ok], bad,
                                     batch[-1][0] + 1, [d for _, _, d in ok] if digests else None) if active[j] else None
                       for j, (e, f) in enumerate(zip(embedders, feats))]
        if pending is not None:
            yield pending
    except torch.OutOfMemoryError:
        raise FeatxError(f"out of memory on {first.device_} at batch size {batch_size}; rerun with a smaller --batch-size") from None


def head_embedder(head, *, device: str = "auto", batch_size: int = 64, workers: int | None = None,
                  weights: str | None = None, runtime: str = "torch") -> ImageEmbedder:
    """The backbone a head's features came from (a :class:`~featx.head_folder.LoadedHead`), rebuilt and checked (weights
    hash, preprocessing): what ``featx predict`` and ``featx export`` run."""
    bb = head.meta["backbone"]
    recorded = bb.get("weights") or "random"
    ckpt = weights or (None if recorded in ("random", "timm-pretrained") else recorded)
    if ckpt is not None and not Path(ckpt).is_file():
        raise FeatxError(f"the checkpoint the head's features came from, '{ckpt}', does not exist; pass its new location with --weights PATH")
    mode = json.loads(bb.get("preprocessing") or "{}").get("mode", "host")
    embedder = ImageEmbedder(bb["model"], pretrained=recorded == "timm-pretrained" and weights is None, weights=ckpt,
                             img_size=bb.get("img_size"), device=device, precision=_precision(bb.get("precision"), device),
                             batch_size=batch_size, workers=workers, preprocess=mode, layers=bb.get("layers") or "last",
                             tta=None if bb.get("tta") in (None, "none") else bb["tta"], runtime=runtime).fit()
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


def run_embedder(run, *, device: str = "auto", batch_size: int = 64, workers: int | None = None,
                 runtime: str = "torch") -> ImageEmbedder:
    """A fine-tuning run's model (a :class:`~featx.run_folder.LoadedRun`), classifier included (its outputs are logits), with
    the preprocessing the run was evaluated with."""
    embedder = ImageEmbedder(run.model_name, weights=str(run.checkpoint), img_size=run.img_size, device=device,
                             precision=_precision(run.precision, device), batch_size=batch_size, workers=workers,
                             preprocess="host", num_classes=len(run.class_names), runtime=runtime).fit()
    rebuilt = json.loads(json.dumps(embedder.data_config_, default=list))
    if rebuilt != run.data_config:
        raise FeatxError(f"rebuilt preprocessing {rebuilt} differs from the run's {run.data_config}; "
                         "use the timm version the run was made with")
    return embedder


def _precision(precision: str | None, device: str) -> str:
    precision = precision or "fp32"
    if precision == "fp16" and resolve_device(device).type == "cpu":
        _logger.warning("the backbone ran in fp16, which this CPU cannot run; using fp32 (predictions may differ slightly)")
        return "fp32"
    return precision
