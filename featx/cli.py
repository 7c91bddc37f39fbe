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
    p.add_argument("--workers", type=_non_negative_int, help="decoding workers (default: 1 on CPU, up to 16 on CUDA)")
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
