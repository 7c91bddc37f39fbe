"""Fine-tuning run folders read back: what ``featx predict`` needs to score images with a fine-tuned model.

``featx finetune`` writes RUN_DIR: ``run.json`` (the run's options, class names and the eval data
config) and ``best.pt`` / ``last.pt`` (the whole timm model, classifier included, under a ``model``
key with timm's parameter names). A run folder goes wherever a head folder goes for images
(``featx predict RUN_DIR IMAGES``); it holds no head for features cached from the original
backbone, so ``evaluate`` refuses it with :func:`not_a_head_message`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import FeatxError, shell_command

__all__ = ["RUN_FILE", "CHECKPOINTS", "LoadedRun", "is_run_folder", "load_run", "read_run_meta", "not_a_head_message"]

RUN_FILE = "run.json"
CHECKPOINTS = ("best.pt", "last.pt")  # the one predict uses, in order of preference


@dataclass
class LoadedRun:
    """A fine-tuning run's description and the checkpoint of the model to use."""

    path: Path
    meta: dict  # run.json
    checkpoint: Path

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def model_name(self) -> str:
        return self.meta["config"]["model"]

    @property
    def img_size(self) -> int | None:
        return self.meta["config"].get("img_size")

    @property
    def precision(self) -> str:
        return self.meta["config"].get("precision") or "auto"

    @property
    def data_config(self) -> dict:
        """timm's data config the run was evaluated with (JSON values: lists for tuples)."""
        return self.meta["data_config"]


def is_run_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder written by ``featx finetune``."""
    return (Path(path) / RUN_FILE).is_file()


def read_run_meta(path: str | os.PathLike) -> dict:
    """RUN_DIR's ``run.json``, checked to describe a featx fine-tuning run."""
    path = Path(path)
    try:
        meta = json.loads((path / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FeatxError(f"cannot read '{path / RUN_FILE}': {e}") from None
    if not isinstance(meta, dict) or meta.get("featx_run") != "finetune" or not {"config", "class_names", "data_config"} <= set(meta):
        raise FeatxError(f"'{path / RUN_FILE}' is not the description of a featx fine-tuning run")
    return meta


def load_run(path: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> LoadedRun:
    """Read RUN_DIR's ``run.json`` and pick its checkpoint: ``checkpoint`` when given, else best.pt, else last.pt."""
    path = Path(path)
    meta = read_run_meta(path)
    if checkpoint is not None:
        chosen = Path(checkpoint)
        if not chosen.is_file():
            raise FeatxError(f"checkpoint '{chosen}' does not exist; pass one of the run's, e.g. {path / CHECKPOINTS[0]}")
    else:
        chosen = next((path / name for name in CHECKPOINTS if (path / name).is_file()), None)
        if chosen is None:
            raise FeatxError(f"the run in '{path}' has no finished epoch ({' and '.join(CHECKPOINTS)} missing); "
                             f"continue it with '{shell_command('featx', 'finetune', 'SOURCE', '--model', meta['config'].get('model'), '--out', path, '--resume')}'")
    return LoadedRun(path=path, meta=meta, checkpoint=chosen)


def not_a_head_message(path: str | os.PathLike) -> str:
    """Why a run folder cannot score cached features, and the two commands that do what was meant."""
    path = Path(path)
    config = read_run_meta(path)["config"]
    size = ["--img-size", config["img_size"]] if config.get("img_size") else []
    predict = shell_command("featx", "predict", path, "IMAGES", "--out", "predictions.csv")
    extract = shell_command("featx", "extract", "SOURCE", "--model", config["model"], *size, "--weights", path / CHECKPOINTS[0],
                            "--out", "FEATURES.h5")
    return (f"'{path}' is a fine-tuning run: its model scores images, not features cached from the original backbone. "
            f"Score images with '{predict}', or cache the fine-tuned backbone's features with '{extract}' "
            "and fit a head on them with 'featx fit-head'")
