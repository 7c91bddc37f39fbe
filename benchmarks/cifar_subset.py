"""Write a CSV manifest of a class-balanced CIFAR-10 subset of the CIFAR-10 JPEGs, for featx commands.

    python benchmarks/cifar_subset.py --train 200 --test 100 --out cifar10-subset.csv [--cifar-tar ARCHIVE|FOLDER]

--cifar-tar is the archive cifar10-jpeg.tar.gz (unpacked once into benchmarks/_cache) or a folder holding its unpacked
train/ and test/; by default ../shared/data/cifar10-jpeg.tar.gz beside the checkout.

Images are the first ``--train`` / ``--test`` files per class of the official splits, in sorted order, so the subset is
the same on every machine. Paths are absolute (the CSV can live anywhere).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CIFAR_TAR, cifar10_dir  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=200, help="training images per class")
    p.add_argument("--test", type=int, default=100, help="test images per class")
    p.add_argument("--out", type=Path, default=Path("cifar10-subset.csv"))
    p.add_argument("--cifar-tar", default=str(CIFAR_TAR), metavar="ARCHIVE|FOLDER",
                   help="cifar10-jpeg.tar.gz, or the folder of its unpacked train/ and test/ (default: %(default)s)")
    args = p.parse_args()
    root = cifar10_dir(args.cifar_tar)
    rows = []
    for split, n in (("train", args.train), ("test", args.test)):
        for cls in sorted(d.name for d in (root / split).iterdir() if d.is_dir()):
            files = sorted((root / split / cls).glob("*.jpg"))[:n]
            rows += [(str(f.resolve()), cls, split) for f in files]
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    print(f"wrote {len(rows)} images to {args.out}")


if __name__ == "__main__":
    main()
