"""The training loop: one epoch of updates, one evaluation pass, the state that moves between them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..device import autocast_context
from ..errors import FeatxError
from ..metrics import classification_metrics
from ..configs import FinetuneConfig
from ._freezing import train_mode

__all__ = ["Trainer", "scored"]

_SYNC_EVERY = 20  # training steps between reads of the running loss (each read waits for the device)


@dataclass
class Trainer:
    """A model with its optimizer, schedule, loss and compute settings."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    device: torch.device
    precision: str
    config: FinetuneConfig

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def _step(self, x: torch.Tensor, y: torch.Tensor, params: list) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_context(self.device, self.precision):
            logits = self.model(x)
            loss = self.criterion(logits.float(), y)
        self.scaler.scale(loss).backward()
        if self.config.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.config.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss.detach(), logits.detach()

    def train_epoch(self, loader, epoch: int, skipped: dict, epochs: int | None = None) -> dict:
        """One pass over ``loader``; unreadable images are added to ``skipped``. Returns loss, accuracy, images/s."""
        train_mode(self.model, frozen_bn_stats=self.config.bn == "frozen")
        params = [p for p in self.model.parameters() if p.requires_grad]
        # running sums stay on the device; reading them (progress bar, loss check) syncs every _SYNC_EVERY steps only
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen, t0 = 0, time.perf_counter()
        with tqdm(total=len(loader), desc=f"epoch {epoch}/{epochs or self.config.epochs}", unit="batch", disable=not self.config.progress,
                  leave=False) as bar:
            for step, (x, y, _, bad) in enumerate(loader, 1):
                skipped.update({str(i): r for i, r in bad})
                bar.update()
                if x is None or len(y) < 2:  # all images unreadable, or a single one (BatchNorm cannot train on it)
                    self.scheduler.step()
                    continue
                y = y.to(self.device, non_blocking=True)
                loss, logits = self._step(self._to_device(x), y, params)
                loss_sum += loss.double() * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                if step % _SYNC_EVERY == 0 or step == len(loader):
                    mean_loss = float(loss_sum) / seen
                    if not math.isfinite(mean_loss):
                        raise FeatxError(f"the training loss became {mean_loss} in epoch {epoch}; lower --lr, or use --precision bf16 or fp32")
                    rate = seen / max(1e-9, time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{int(correct) / seen:.3f}", img_s=f"{rate:.1f}", refresh=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        return {"train_loss": float(loss_sum) / max(1, seen), "train_accuracy": int(correct) / max(1, seen), "train_images": seen,
                "images_per_s": seen / max(1e-9, seconds)}

    def _scored(self, loader, skipped: dict, forward, none_readable: str):
        """(image indices, labels, outputs of ``forward`` as float32 on the CPU) of every readable image of ``loader``,
        model in eval mode; unreadable images are added to ``skipped``."""
        self.model.eval()
        outputs, labels, index = [], [], []
        for x, y, idx, bad in loader:
            skipped.update({str(i): r for i, r in bad})
            if x is None:
                continue
            with autocast_context(self.device, self.precision):
                outputs.append(forward(self._to_device(x)).float().cpu())
            labels.append(y)
            index += idx
        if not labels:
            raise FeatxError(none_readable)
        return np.asarray(index, dtype=np.int64), torch.cat(labels).numpy(), torch.cat(outputs)

    @torch.inference_mode()
    def embed(self, loader, skipped: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pre-logit features [n, D], labels [n], image indices [n]) of the model in eval mode: the frozen backbone's embeddings."""
        index, y, feats = self._scored(loader, skipped, lambda x: self.model.forward_head(self.model.forward_features(x), pre_logits=True),
                                       "every image to embed was unreadable; check the training split")
        return feats.numpy(), y, index

    @torch.inference_mode()
    def evaluate(self, loader, n_classes: int, skipped: dict) -> tuple[dict, dict]:
        """(metrics of the fit-head schema with the mean log-loss and the image count, per-image ``index``/``y``/``pred``) of the
        model on ``loader``."""
        index, y, logits = self._scored(loader, skipped, self.model, "every evaluation image was unreadable; check the evaluation split")
        return scored(logits, y, index, n_classes)


def scored(logits: torch.Tensor, y: np.ndarray, index: np.ndarray, n_classes: int) -> tuple[dict, dict]:
    """(metrics, per-image predictions) of ``logits`` [n, K] against labels ``y``: the fit-head metrics, the mean log-loss
    (cross-entropy without label smoothing) and the count; predictions as ``index``, ``y``, ``pred`` arrays."""
    logits = logits.float()
    loss = float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(y, dtype=torch.long)))
    proba = logits.softmax(1).numpy()
    pred = proba.argmax(1)
    metrics = classification_metrics(y, pred, proba, n_classes=n_classes)
    return {**metrics, "loss": loss, "n": int(len(y))}, {"index": index, "y": np.asarray(y), "pred": pred}
