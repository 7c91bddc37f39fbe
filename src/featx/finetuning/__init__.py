"""Fine-tuning a timm backbone end to end, reported in the same schema as the frozen heads.

A run trains ``backbone + classifier`` on the training split of an image source and evaluates
on the test/val split (or a seeded, stratified held-out part of the training split) after every
epoch; everything it needs to continue lives in RUN_DIR (:mod:`featx.finetuning._run_dir`).

Modules: ``_config`` (the options), ``_data`` (which images, loaders), ``_freezing`` (stages
and frozen parts), ``_head_init`` (classifier from a fitted linear head), ``_optim`` (AdamW,
layer decay, warm-up + cosine), ``_loop`` (an epoch, an evaluation), ``_rng`` (random states),
``_run_dir`` (run.json, checkpoints, export), ``_workflow`` (``finetune()``).
"""

from ..configs import FinetuneConfig
from ._freezing import apply_freeze, model_stages, parse_freeze
from ._head_init import linear_head_from_dir
from ._optim import WarmupCosine, build_optimizer
from ._run_dir import RUN_FILE, export_model
from ._workflow import FinetuneResult, finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "model_stages", "apply_freeze", "parse_freeze",
           "linear_head_from_dir", "export_model", "build_optimizer", "WarmupCosine", "RUN_FILE"]
