"""The classifier as one torch module: the embedding (backbone, taps, flip) and the head folded into a few layers.

Linear heads (logreg, ridge, linear-svm, torch-linear, ncm) become one ``Linear`` with their standardising and PCA
folded in (:func:`featx.heads.heads_score_map`), behind the L2 normalisations that cannot fold; the MLP keeps its two
layers, the standardisation folded into the first. Its outputs are the class probabilities ``featx predict`` prints
(the softmax of the head's decision function where it has no probabilities) and the features.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FeatxError
from ..heads import fold_affine_steps, heads_score_map

__all__ = ["EXPORTABLE_HEADS", "ExportedClassifier", "head_network", "plain_linear"]

EXPORTABLE_HEADS = ("logreg", "ridge", "linear-svm", "torch-linear", "ncm", "mlp")
_MISSING_CLASS = -1e30  # logit of a class the head never saw in training: probability 0, as featx predict gives it


class _L2(torch.nn.Module):
    """scikit-learn's ``Normalizer`` (each row to unit L2 norm; a zero row stays zero)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.norm(dim=1, keepdim=True)
        return x / torch.where(norm > 0, norm, torch.ones_like(norm))


class _PerTapL2(torch.nn.Module):
    """featx's ``TapNormalizer``: every tap's columns to unit norm, scaled by 1/sqrt(number of taps)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = [(int(a), int(b)) for a, b in blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[:, a:b] / x[:, a:b].norm(dim=1, keepdim=True).clamp_min(1e-12) for a, b in self.blocks]
        return torch.cat(parts, 1) / float(np.sqrt(len(self.blocks)))


def _normaliser(step) -> torch.nn.Module:
    return _PerTapL2(step.blocks) if type(step).__name__ == "TapNormalizer" else _L2()


def _linear(W: np.ndarray, b: np.ndarray) -> torch.nn.Linear:
    layer = torch.nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.asarray(W, np.float64)))
        layer.bias.copy_(torch.from_numpy(np.asarray(b, np.float64)))
    return layer


def _all_classes(W: np.ndarray, b: np.ndarray, classes: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows in class-index order over every class of the head folder (classes unseen in training: probability 0)."""
    full_W, full_b = np.zeros((n_classes, W.shape[1])), np.full(n_classes, _MISSING_CLASS)
    idx = np.asarray(classes, dtype=np.int64)
    full_W[idx], full_b[idx] = W, b
    return full_W, full_b


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _refusal(head_name: str, why: str) -> FeatxError:
    return FeatxError(f"head '{head_name}' cannot be exported as one network ({why}); export works for "
                      f"{', '.join(EXPORTABLE_HEADS)}: fit one of those with featx fit-head")


def head_network(pipeline, head_name: str, n_classes: int) -> torch.nn.Module:
    """Features [n, D] -> logits [n, n_classes] whose softmax is what ``featx predict`` reports for this head."""
    *transforms, final = [s for _, s in pipeline.steps]
    kind = type(final).__name__
    if kind in ("KNNClassifier", "KNeighborsClassifier"):
        raise _refusal(head_name, "a nearest-neighbour vote needs its training rows")
    if kind == "SVC":  # even with a linear kernel its scores are one-vs-one votes, not a linear map
        raise _refusal(head_name, f"a {final.kernel}-kernel SVM scores by its support vectors and one-vs-one votes")
    if kind == "MLPClassifier":
        first, last = final.module_[0], final.module_[3]
        prefix, W1, b1 = fold_affine_steps(transforms, _array(first.weight), _array(first.bias))
        W2, b2 = _all_classes(_array(last.weight), _array(last.bias), final.classes_, n_classes)
        layers = [_linear(W1, b1), torch.nn.GELU(), _linear(W2, b2)]
    else:
        try:
            prefix, W, b, classes = heads_score_map(pipeline)
        except FeatxError as e:
            raise _refusal(head_name, str(e)) from None
        layers = [_linear(*_all_classes(W, b, classes, n_classes))]
    for step in prefix:
        if type(step).__name__ not in ("Normalizer", "TapNormalizer"):
            raise _refusal(head_name, f"its '{type(step).__name__}' step is not linear")
    return torch.nn.Sequential(*[_normaliser(s) for s in prefix], *layers).float().eval()


def plain_linear(network: torch.nn.Module) -> torch.nn.Linear | None:
    """The network's one ``Linear`` when it is nothing else (what timm's own classifier can hold), else None."""
    layers = list(network.children()) if isinstance(network, torch.nn.Sequential) else [network]
    return layers[0] if len(layers) == 1 and isinstance(layers[0], torch.nn.Linear) else None


class ExportedClassifier(torch.nn.Module):
    """Normalised images [n, 3, H, W] -> (class probabilities [n, K], features [n, D])."""

    def __init__(self, embedding: torch.nn.Module, head: torch.nn.Module, *, float16_features: bool = False):
        super().__init__()
        self.embedding = embedding
        self.head = head
        self.float16_features = float16_features  # the head was fitted on features stored as float16: round them the same way

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embedding(images).float()
        if self.float16_features:
            features = features.half().float()
        return torch.softmax(self.head(features), dim=1), features
