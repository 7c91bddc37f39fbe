"""The ``featx`` command line: one thin function per command, all logic in the library.

Commands import the library only when they run, so ``featx --help`` and argument errors
answer without loading torch.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .._version import __version__
from ..errors import FeatxError
from ._commands import COMMANDS
from ._warnings import library_warnings_said_once

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featx", description="Transfer-learning engine: frozen timm embeddings, cheap heads, fine-tuning.")
    parser.add_argument("--version", action="version", version=f"featx {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _attach_list_values(argv: list[str]) -> list[str]:
    """``--layers -1,-2`` as ``--layers=-1,-2``: argparse takes a value that starts with '-' for an option otherwise."""
    out, it = [], iter(argv)
    for a in it:
        out.append(a)
        if a == "--layers":
            value = next(it, None)
            if value is not None:
                out[-1] = f"--layers={value}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_attach_list_values(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="featx: %(message)s", stream=sys.stderr)
    try:
        with library_warnings_said_once():
            return int(args.func(args) or 0)
    except FeatxError as e:
        print(f"featx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"featx {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
