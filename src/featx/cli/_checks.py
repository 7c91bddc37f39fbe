"""The checks of each command's inputs that need no backbone and no head, run before torch, timm or scikit-learn
is imported, so a mistake is refused in a second.

Each is a sequence of library calls the command's workflow makes too (it repeats them: the Python API gets the same
errors); running them first only changes when the user hears of a mistake. A source resolved here is handed on, so
it is listed once.
"""

from __future__ import annotations

import argparse

from ..errors import FeatxError

__all__ = ["fit_head_inputs", "evaluate_inputs", "predict_inputs", "finetune_inputs", "compare_inputs"]

def fit_head_inputs(args: argparse.Namespace) -> None:
    """The head's name, the store and its group."""
    from ..heads import check_head_name
    from ..store import FeatureStore

    check_head_name(args.head)
    with FeatureStore(args.features) as store:
        store.resolve_key(args.model)


def evaluate_inputs(args: argparse.Namespace) -> None:
    """A head folder (not a run folder), and a store."""
    from ..head_folder import read_head_meta
    from ..run_folder import is_run_folder, not_a_head_message
    from ..store import FeatureStore

    if is_run_folder(args.head_dir):
        raise FeatxError(not_a_head_message(args.head_dir))
    read_head_meta(args.head_dir)
    FeatureStore(args.features).close()


def predict_inputs(args: argparse.Namespace):
    """A head or run folder, and the images (returned as an ImageSource)."""
    from ..head_folder import read_head_meta
    from ..run_folder import is_run_folder, read_run_meta
    from ..sources import resolve_source

    read_run_meta(args.head_dir) if is_run_folder(args.head_dir) else read_head_meta(args.head_dir)
    return resolve_source(args.source)


def finetune_inputs(args: argparse.Namespace, config):
    """The options, the checkpoint, the head to start from and the images (returned as an ImageSource)."""
    from ..configs import check_weights_chosen
    from ..files import NAMED_WEIGHTS, check_checkpoint_file
    from ..head_folder import read_head_meta
    from ..sources import resolve_source

    config.validate()
    if config.weights is not None and config.weights not in NAMED_WEIGHTS:
        check_checkpoint_file(config.weights)
    if config.init_head is not None:
        read_head_meta(config.init_head)
    src = resolve_source(args.source)
    check_weights_chosen(config.model, config.pretrained, config.weights, "fine-tunes")
    return src


def compare_inputs(args: argparse.Namespace, config):
    """The heads, and the images or the store: returns an ImageSource, or the store's path."""
    from ..comparison import is_store, parse_heads
    from ..sources import resolve_source

    parse_heads(config.heads)
    return args.source if is_store(args.source) else resolve_source(args.source)
