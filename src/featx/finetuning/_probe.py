"""The linear probe a run starts from: featx's swept logistic regression on the frozen backbone's embeddings.

Fine-tuning from a linear-probe start (LP-FT, Kumar et al. 2022) keeps the pretrained features from being torn
apart by the gradients of a random classifier; the probe's accuracy on the test images is also the frozen
baseline every run reports its gain against.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..errors import FeatxError
from ..heads import grid_of, heads_linear_map, make_head, sweep

__all__ = ["fit_probe"]

_logger = logging.getLogger(__name__)


def fit_probe(X: np.ndarray, y: np.ndarray, n_classes: int, *, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(weight [K, D], bias [K], description) of a logistic regression fitted on (X, y), C swept on a validation part of X.

    Standardisation is folded into the weights (logits = x @ W.T + b on raw embeddings). A class absent from ``y``
    gets zero weights and a bias far below the others, so it is never predicted at the start.
    """
    t0 = time.perf_counter()
    head = make_head("logreg", device=device, random_state=seed)
    try:
        pipeline, result = sweep(head, X, y, grid_of("logreg"), random_state=seed)
        chosen, val_accuracy = result.best, result.best_val_accuracy
    except FeatxError as e:  # too few images for a validation part: the default C
        _logger.info("linear probe: %s; fitting the default C", e)
        pipeline, chosen, val_accuracy = head.fit(X, y), {}, None
    weight, bias, classes = heads_linear_map(pipeline)
    W = np.zeros((n_classes, X.shape[1]), np.float64)
    b = np.full(n_classes, float(bias.min()) - 30.0)
    W[classes.astype(int)], b[classes.astype(int)] = weight, bias
    info = {"head": "logreg", "params": chosen, "sweep_val_accuracy": val_accuracy, "n_train": int(len(y)),
            "seconds": time.perf_counter() - t0}
    return torch.as_tensor(W, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), info
