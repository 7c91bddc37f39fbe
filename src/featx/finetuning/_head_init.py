"""Starting the classifier from a linear head that ``featx fit-head`` fitted on this backbone's features."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import FeatxError
from ..head_folder import load_head
from ..heads import heads_linear_map

__all__ = ["linear_head_from_dir"]

_logger = logging.getLogger(__name__)


def linear_head_from_dir(head_dir: str | Path, class_names: list[str], num_features: int, *, model: str | None = None,
                         weights_sha256: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [K, D], bias [K]) of a linear head fitted by ``featx fit-head``, rows in ``class_names`` order.

    Linear preprocessing (standardising, PCA) is folded into the weights; heads that are not
    linear in the features (kNN, nearest class mean, RBF SVM, MLP, L2 normalisation) are refused.
    A head fitted on another model's features is refused; on other weights of the same model,
    a warning.
    """
    loaded = load_head(head_dir)
    meta, backbone = loaded.meta, loaded.meta.get("backbone") or {}
    if model is not None and backbone.get("model") not in (None, model):
        raise FeatxError(f"--init-head '{head_dir}' was fitted on features of '{backbone.get('model')}', not '{model}'; "
                         f"fit a head on '{model}' features (featx extract, then featx fit-head)")
    if weights_sha256 is not None and backbone.get("weights_sha256") not in (None, weights_sha256):
        _logger.warning("--init-head '%s' was fitted on features of other weights of this model; it is a weaker start", head_dir)
    weight, bias, classes = heads_linear_map(loaded.pipeline)
    names = list(meta.get("class_names") or class_names)
    head_names = [names[int(c)] for c in classes]
    dim = int(meta.get("feature_dim") or weight.shape[1])
    if dim != num_features or weight.shape[1] != num_features:
        raise FeatxError(f"--init-head '{head_dir}' was fitted on {dim}-dimensional features but this backbone gives "
                         f"{num_features}; fit the head on features of the same --model")
    missing = sorted(set(class_names) - set(head_names))
    if missing or len(head_names) != len(class_names):
        raise FeatxError(f"--init-head '{head_dir}' knows {len(head_names)} classes ({', '.join(head_names[:5])}...), the source has "
                         f"{len(class_names)} ({', '.join(class_names[:5])}...)"
                         + (f"; missing {', '.join(missing[:5])}" if missing else "")
                         + ". Fit the head on features of this source, with every class in its training split")
    order = [head_names.index(c) for c in class_names]
    return torch.as_tensor(weight[order], dtype=torch.float32), torch.as_tensor(bias[order], dtype=torch.float32)
