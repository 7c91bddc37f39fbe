"""Fine-tuning a timm backbone end to end, reported in the same schema as the frozen heads.

A run starts the classifier from a linear probe fitted on the frozen embeddings of its training images (or from
``--init-head``), trains with the BatchNorm statistics of pretraining, and scores every epoch and its interpolations
toward the start (WiSE-FT) on a validation part of the training images. The best of them replaces the frozen start only
when it beats it there by more than noise; the test images are scored once, for the model kept, beside the frozen
probe's score on the same images; everything it needs to continue lives in RUN_DIR (:mod:`featx.finetuning._run_dir`).

Modules: ``_data`` (train / validation / test images, augmentation, loaders), ``_freezing`` (stages, frozen parts,
BatchNorm statistics), ``_head_init`` (classifier from a fitted linear head), ``_probe`` (the linear probe a run
starts from), ``_optim`` (AdamW, parameter groups, warm-up + cosine), ``_loop`` (an epoch, an evaluation, embeddings),
``_interpolation`` (WiSE-FT), ``_decision`` (keep the start or replace it), ``_budget`` (--max-minutes), ``_rng``
(random states), ``_run_dir`` (run.json, checkpoints, export), ``_steps`` (the start, an epoch, the final choice),
``_report`` (metrics.json, the summary, test_predictions.csv), ``_workflow`` (``finetune()``).
"""

from ..configs import FinetuneConfig
from ._freezing import apply_freeze, model_stages, parse_freeze
from ._head_init import linear_head_from_dir
from ._optim import WarmupCosine, build_optimizer
from ._run_dir import RUN_FILE, export_model
from ._decision import Decision, decide, one_sided_mcnemar
from ._workflow import FinetuneResult, finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "model_stages", "apply_freeze", "parse_freeze",
           "linear_head_from_dir", "export_model", "build_optimizer", "WarmupCosine", "RUN_FILE", "Decision", "decide",
           "one_sided_mcnemar"]
