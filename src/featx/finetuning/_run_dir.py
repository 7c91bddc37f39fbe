"""RUN_DIR: what a run is (run.json), its checkpoints, and its export as a timm model.

* ``run.json``      what the run is (config, source fingerprint, class names); a folder that
                    holds one is refused unless ``resume`` or ``overwrite``;
* ``last.pt``       model, optimizer, scheduler, grad scaler, epoch, RNG states after the last
                    finished epoch: ``resume`` continues from it and ends where an
                    uninterrupted run would (same batches, same augmentations, same updates);
* ``best.pt``       the model the run keeps: the frozen linear probe (refitted on every training
                    image) until the end, then the fine-tuned model if validation chose it;
* ``finetuned.pt``  the best fine-tuned candidate on validation (an epoch, or its interpolation
                    toward the start), with its record, whether or not it was kept;
* ``metrics.json``  final metrics (``featx fit-head --json`` schema), the decision, per-epoch history;
* ``test_predictions.csv``  id, label, the kept model's and the frozen baseline's prediction per test image;
* ``export/``       ``config.json`` + ``model.safetensors`` (timm's own format): load with
                    ``timm.create_model('local-dir:RUN_DIR/export', pretrained=True)``.

``best.pt`` and ``last.pt`` keep the model under a ``model`` key with timm's parameter names, so
``featx extract --weights RUN_DIR/best.pt`` caches embeddings of the fine-tuned backbone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..backbones import create_timm_model
from ..errors import FeatxError
from ..files import atomic_path, public_mode, replace_folder, write_json_atomic
from ..provenance import provenance
from ..run_folder import RUN_FILE
from ..configs import FinetuneConfig

__all__ = ["RUN_FILE", "run_identity", "prepare_run_dir", "save_checkpoint", "load_checkpoint", "export_model"]

_logger = logging.getLogger(__name__)
_RUN_FILES = (RUN_FILE, "last.pt", "best.pt", "finetuned.pt", "metrics.json", "test_predictions.csv")
# Settings that may differ between an interrupted run and its resumption without changing results.
_NOT_IDENTITY = ("device", "workers", "progress", "resume", "overwrite", "max_minutes", "test_curve", "export")


def run_identity(config: FinetuneConfig) -> dict:
    """The options that define a run: a resumed run must have the same."""
    return {k: v for k, v in asdict(config).items() if k not in _NOT_IDENTITY}


def prepare_run_dir(out: Path, config: FinetuneConfig, run_info: dict) -> bool:
    """Create or check RUN_DIR; True when a run should continue from ``last.pt``."""
    if out.exists() and not out.is_dir():
        raise FeatxError(f"--out '{out}' is a file; pass a folder for the run")
    existing = out / RUN_FILE
    if existing.is_file():
        if config.overwrite:
            _clear(out)
        elif not config.resume:
            raise FeatxError(f"--out '{out}' holds another fine-tuning run; pass --resume to continue it or --overwrite to replace it")
        else:
            _check_same_run(out, run_info)
            return (out / "last.pt").is_file()
    elif out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise FeatxError(f"--out '{out}' is not empty and holds no featx run; choose a new or empty folder (or --overwrite to write into it)")
    if config.resume:
        _logger.info("no run to resume in '%s'; starting a new one", out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_FILE, run_info, sort_keys=True)
    except OSError as e:
        raise FeatxError(f"cannot write to --out '{out}': {e}") from None
    return False


def _clear(out: Path) -> None:
    """Remove a run's files (and temporary files a killed run left) from ``out``."""
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for stray in out.glob(".*.tmp-*"):
        stray.unlink(missing_ok=True)
    shutil.rmtree(out / "export", ignore_errors=True)


def _check_same_run(out: Path, run_info: dict) -> None:
    try:
        old = json.loads((out / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FeatxError(f"cannot read '{out / RUN_FILE}' ({e}); pass --overwrite to start the run again") from None
    diff = [k for k in ("config", "source_fingerprint", "class_names") if old.get(k) != run_info[k]]
    if diff:
        detail = [f"{k}: {old['config'].get(k)!r} -> {v!r}" for k, v in run_info["config"].items()
                  if "config" in diff and old.get("config", {}).get(k) != v][:4] or diff
        raise FeatxError(f"--resume: the run in '{out}' was made with other settings ({'; '.join(detail)}); "
                         "rerun with the original options, or pass --overwrite to start over")


def save_checkpoint(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeatxError(f"cannot read '{path}' ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                         "pass --overwrite to start the run again") from None


def export_model(run_dir: str | Path, which: str = "last") -> Path:
    """Write ``which`` (last | best) checkpoint of a run as timm's ``config.json`` + ``model.safetensors`` in RUN_DIR/export.

    Load it with ``timm.create_model('local-dir:<RUN_DIR/export>', pretrained=True)``, or with
    ``timm.create_model(name, num_classes=K)`` plus ``load_state_dict`` of the safetensors file.
    """
    from timm.models import save_for_hf

    run_dir = Path(run_dir)
    info_path, ckpt_path = run_dir / RUN_FILE, run_dir / f"{which}.pt"
    if not info_path.is_file() or not ckpt_path.is_file():
        raise FeatxError(f"'{run_dir}' holds no finished fine-tuning epoch ({ckpt_path.name} missing); run featx finetune first")
    info = json.loads(info_path.read_text())
    config = info["config"]
    ckpt = load_checkpoint(ckpt_path)
    model = create_timm_model(config["model"], img_size=config.get("img_size"), num_classes=len(info["class_names"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    out = run_dir / "export"
    tmp = run_dir / f".export.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    data_config = {k: info["data_config"][k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
                   if k in info["data_config"]}
    try:
        save_for_hf(model, str(tmp), model_config={"label_names": list(info["class_names"])}, safe_serialization=True,
                    data_config=data_config)
        write_json_atomic(tmp / "featx.json", {"run": str(run_dir), "checkpoint": which, "epoch": ckpt.get("epoch"),
                                               "source": info["source"], "data_config": info["data_config"], **provenance()})
        for f in tmp.iterdir():
            public_mode(f)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
