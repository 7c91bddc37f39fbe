"""Throughput of ``featx extract`` against the model's pure forward and a plain tutorial loop.

In one run, with the same model (tf_efficientnet_lite0, real ImageNet weights), batch size and
precision, measures images/s of:

(a) featx extract on real CIFAR-10 JPEGs (decode, preprocess, forward, HDF5 write; end to end);
(b) the model's pure forward on tensors already on the device (the ceiling for (a));
(c) the loop transfer-learning tutorials use: fp32, batch 32, NCHW, timm's ToTensor transform per
    image in the main process, no workers.

Reports (a)/(b) (targets: >= 0.85 on CPU, >= 0.9 on GPU) and (a)/(c) (>= 1.5 on CPU, >= 10 on GPU),
and writes the table and the command to benchmarks/RESULTS.md.

``--scaling`` measures instead (section ``extract_scaling``, see ``_scaling.py``): ``featx extract``
under torchrun with 1 and 2 processes; two backbones in one decode pass against two separate runs;
and the time to commit a group, or to add images to one, against the size of the store, beside
what featx 0.1 did (a new copy of the whole store per commit).

``--runtimes`` measures instead (section ``extract_runtimes``, see ``_runtimes.py``): torch against ONNX Runtime (and
OpenVINO when installed) for EfficientNet-Lite0 and Lite2 at 224 px, pure forwards and ``featx extract --runtime``.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, CIFAR_TAR, cifar10_dir, command_line, lite0_weights, write_section  # noqa: E402

from featx import ExtractConfig, create_backbone, extract, resolve_source  # noqa: E402
from featx.device import autocast_context, resolve_device, resolve_precision  # noqa: E402
from featx.preprocess import eval_transform  # noqa: E402

MODEL = "tf_efficientnet_lite0"
TARGETS = {"cpu": (0.85, 1.5), "cuda": (0.9, 10.0)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def featx_extract(src, args, device, precision, out_dir: Path) -> tuple[float, dict]:
    """(a): end-to-end ``extract`` call on ``src`` (a fresh store, so no cache hit or resume)."""
    config = ExtractConfig(model=MODEL, weights=lite0_weights(), img_size=args.img_size, device=str(device),
                           batch_size=args.batch_size, workers=args.workers, precision=precision, progress=False)
    warm = src.subset(range(min(len(src), 2 * args.batch_size)))
    extract(warm, config, out_dir / "warmup.h5")  # first-call costs: kernels, worker start, file system cache
    out = out_dir / "features.h5"
    _sync(device)
    t0 = time.perf_counter()
    result = extract(src, config, out)
    _sync(device)
    seconds = time.perf_counter() - t0
    assert result.n_processed == len(src) and not result.cache_hit
    return len(src) / seconds, {"skipped": result.n_skipped, "seconds": seconds}


@torch.inference_mode()
def pure_forward(args, device, precision, n_images: int) -> float:
    """(b): the backbone alone on a batch already on the device, same format and precision as (a)."""
    model, _ = create_backbone(MODEL, weights=lite0_weights(), img_size=args.img_size)
    _, tf = eval_transform(model, args.img_size)
    size = tf.transforms[1].size
    model = model.to(device).to(memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, *size, device=device).contiguous(memory_format=torch.channels_last)
    steps = max(3, n_images // args.batch_size)
    with autocast_context(device, precision):
        for _ in range(3):
            model(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        _sync(device)
    return steps * args.batch_size / (time.perf_counter() - t0)


@torch.inference_mode()
def tutorial_loop(paths: list[Path], args, device) -> float:
    """(c): fp32, batch 32, NCHW; PIL decode + timm's ToTensor transform per image in the main process."""
    model, _ = create_backbone(MODEL, weights=lite0_weights(), img_size=args.img_size)
    model = model.to(device).eval()
    _, tf = eval_transform(model, args.img_size)

    def run(batch_paths):
        for s in range(0, len(batch_paths), 32):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in batch_paths[s : s + 32]]).to(device)
            model(x).cpu()

    run(paths[:64])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    run(paths)
    _sync(device)
    return len(paths) / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default=None,
                   help="auto|fp32|bf16|fp16 (default: bf16 on CPUs with native bf16, else featx's auto)")
    p.add_argument("--batch-size", type=int, default=None, help="(a) and (b) batch size (default: 32 on CPU, 256 on GPU)")
    p.add_argument("--n-images", type=int, default=None, help="images for (a) and (b) (default: 2048 on CPU, 20000 on GPU)")
    p.add_argument("--n-tutorial", type=int, default=None, help="images for the slow loop (c) (default: n-images / 4)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's, 224)")
    p.add_argument("--workers", type=int, default=None, help="featx decoding workers (default: featx's)")
    p.add_argument("--cifar-tar", default=str(CIFAR_TAR))
    p.add_argument("--no-write", action="store_true", help="print the table without updating RESULTS.md")
    p.add_argument("--scaling", action="store_true", help="torchrun processes, backbones per pass and store commits instead")
    p.add_argument("--store-rows", default="20000,80000,320000", help="--scaling: rows of the stores to commit into (1280-d float32)")
    p.add_argument("--repeats", type=int, default=2, help="--scaling, --runtimes: runs of each variant, alternating (the best is reported)")
    p.add_argument("--runtimes", action="store_true", help="torch vs ONNX Runtime (vs OpenVINO), Lite0 and Lite2 at 224 px, instead")
    p.add_argument("--images", default=None, help="--runtimes: image folder to read (default: CIFAR-10 from --cifar-tar)")
    p.add_argument("--threads", type=int, default=None, help="--runtimes: CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.runtimes:
        from _runtimes import run_runtimes

        return run_runtimes(args)
    if args.scaling:
        from _scaling import run_scaling

        return run_scaling(args)

    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (256 if on_gpu else 32)
    n = args.n_images or (20000 if on_gpu else 2048)
    n_tutorial = args.n_tutorial or max(64, n // 4)
    native_bf16 = not on_gpu and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    precision = resolve_precision(args.precision or ("bf16" if native_bf16 else "auto"), device)

    root = cifar10_dir(args.cifar_tar)
    full = resolve_source(root)
    pick = np.linspace(0, len(full) - 1, num=min(n, len(full))).astype(np.int64)  # spread over all classes and splits
    src = full.subset(pick)
    paths = [src.path(i) for i in range(min(n_tutorial, len(src)))]

    # (c) first: featx tunes the process's allocator for CPU inference (keep_freed_memory), a plain
    # tutorial script does not; (b) runs after (a) so the ceiling gets the same process conditions.
    c = tutorial_loop(paths, args, device)
    out_dir = CACHE / "extract_throughput"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    try:
        a, info = featx_extract(src, args, device, precision, out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    b = pure_forward(args, device, precision, n)

    t_ab, t_ac = TARGETS["cuda" if on_gpu else "cpu"]
    name = torch.cuda.get_device_name(device) if on_gpu else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    rows = [
        ("(a) featx extract, CIFAR-10 JPEGs end to end", f"{len(src)}", f"{args.batch_size}", precision, f"{a:.1f}"),
        ("(b) pure forward, tensors on the device", f"{max(3, n // args.batch_size) * args.batch_size}", f"{args.batch_size}", precision, f"{b:.1f}"),
        ("(c) tutorial loop (ToTensor per image, NCHW, no workers)", f"{len(paths)}", "32", "fp32", f"{c:.1f}"),
    ]
    md = [
        f"## extract_throughput ({device.type}: {name})",
        "",
        f"`{command_line()}`",
        "",
        f"Model {MODEL} (real ImageNet weights), torch {torch.__version__}. (a) includes model creation, weight hashing, "
        f"decoding, preprocessing, forward and the HDF5 write ({info['seconds']:.1f} s, {info['skipped']} skipped).",
        "",
        "| variant | images | batch | precision | images/s |",
        "|---|---:|---:|---|---:|",
        *[f"| {' | '.join(r)} |" for r in rows],
        "",
        "| ratio | measured | target | |",
        "|---|---:|---:|---|",
        f"| (a)/(b) | {a / b:.2f} | >= {t_ab} | {'ok' if a / b >= t_ab else 'MISSED'} |",
        f"| (a)/(c) | {a / c:.2f} | >= {t_ac} | {'ok' if a / c >= t_ac else 'MISSED'} |",
    ]
    text = "\n".join(md)
    print(text)
    if not args.no_write:
        write_section("extract_throughput", text)


if __name__ == "__main__":
    main()
