"""``extract_throughput.py --runtimes``: torch against ONNX Runtime (and OpenVINO, when installed) on the CPU.

For each model (EfficientNet-Lite0 and Lite2, real ImageNet weights, 224 px), on the same images, in one process,
rounds alternating the variants (the best round of each is reported):

* pure torch forward (eager, channels_last, fp32) on a batch of preprocessed tensors;
* pure ONNX Runtime forward of the graph featx exports, on the same tensors;
* pure OpenVINO forward of the same graph (``pip install openvino``; reported, not used by featx);
* ``featx extract --runtime torch``, ``onnx`` and ``openvino`` end to end (decode, preprocess, forward, HDF5 write), each into
  a fresh store, the ONNX graph already cached (its one-time export is timed on its own).

Targets (issue 20): extract onnx >= 2x extract torch, and >= 0.85 of the pure ONNX Runtime forward.
"""

from __future__ import annotations

import platform
import shutil
import time

import numpy as np
import torch
from _common import CACHE, cifar10_dir, command_line, write_section

from featx import ExtractConfig, ImageEmbedder, extract, resolve_source
from featx.backbones import packaged_weights
from featx.extraction._plan import onnx_cache_dir
from featx.runtimes import OnnxForward

MODELS = ("tf_efficientnet_lite0", "tf_efficientnet_lite2")
SIZE = 224
TARGET_VS_TORCH, TARGET_VS_PURE = 2.0, 0.85


def _openvino(path):
    """A compiled OpenVINO model of the ONNX graph at ``path``, as a callable on numpy; None when not installed."""
    try:
        import openvino as ov
    except ImportError:
        return None
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                          "INFERENCE_PRECISION_HINT": "f32"})
    return lambda x: compiled(x)[0]


def _rate(fn, x, steps: int) -> float:
    fn(x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(x)
    return steps * len(x) / (time.perf_counter() - t0)


def _extract_rate(src, model: str, runtime: str, args, out_dir) -> tuple[float, float]:
    """(images/s of a fresh extract, seconds) with ``runtime``; the store's ONNX cache is kept between calls."""
    config = ExtractConfig(model=model, weights=packaged_weights(model), img_size=SIZE, device="cpu", batch_size=args.batch_size,
                           runtime=runtime, progress=False)
    out = out_dir / f"{model}.h5"
    for p in (out, out.with_name(out.name + ".d")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    result = extract(src, config, out)
    seconds = time.perf_counter() - t0
    assert result.n_processed == len(src) and not result.cache_hit
    return len(src) / seconds, seconds


def _one_model(model: str, src, args, out_dir) -> dict:
    weights = packaged_weights(model)
    t0 = time.perf_counter()
    ImageEmbedder(model, weights=weights, img_size=SIZE, device="cpu", runtime="onnx",
                             onnx_cache=str(onnx_cache_dir(out_dir / f"{model}.h5", model))).fit()
    export_s = time.perf_counter() - t0  # model creation + hashing + the one-time export
    torch_emb = ImageEmbedder(model, weights=weights, img_size=SIZE, device="cpu", runtime="torch").fit()
    x = torch.stack([torch_emb.transform_(src.load(i)) for i in range(args.batch_size)])
    tmodel = torch_emb._model_on_device()
    path = next(onnx_cache_dir(out_dir / f"{model}.h5", model).glob("*.onnx"))  # the graph featx extract will find cached
    graph, ov = OnnxForward(path), _openvino(path)
    with torch.inference_mode():
        ref = tmodel(x.contiguous(memory_format=torch.channels_last)).numpy()
    gaps = {"onnx": float(np.abs(graph(x).numpy() - ref).max())}
    if ov is not None:
        gaps["openvino"] = float(np.abs(ov(x.numpy()) - ref).max())
    steps = max(3, len(src) // (2 * args.batch_size))  # the pure forwards on half the images: a rate needs no more
    variants = {
        "pure torch": lambda: _rate(lambda t: torch_emb._forward(tmodel, t), x, steps),
        "pure onnxruntime": lambda: _rate(graph, x, steps),
        **({"pure openvino": lambda: _rate(ov, x.numpy(), steps)} if ov is not None else {}),
        "extract torch": lambda: _extract_rate(src, model, "torch", args, out_dir)[0],
        "extract onnx": lambda: _extract_rate(src, model, "onnx", args, out_dir)[0],
        **({"extract openvino": lambda: _extract_rate(src, model, "openvino", args, out_dir)[0]} if ov is not None else {}),
    }
    best = {k: 0.0 for k in variants}
    with torch.inference_mode():
        for r in range(args.repeats):
            for name, run in variants.items():
                best[name] = max(best[name], run())
                print(f"{model} round {r + 1}: {name} {best[name]:.2f} img/s", flush=True)
    return {"rates": best, "gaps": gaps, "export_s": export_s}


def run_runtimes(args) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    args.batch_size = args.batch_size or 32
    root = args.images or cifar10_dir(args.cifar_tar)
    full = resolve_source(str(root))
    n = args.n_images or 256
    src = full.subset(np.linspace(0, len(full) - 1, num=min(n, len(full))).astype(np.int64))
    out_dir = CACHE / "extract_runtimes"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    load = open("/proc/loadavg").read().split()[:3] if platform.system() == "Linux" else ["?"]
    try:
        results = {m: _one_model(m, src, args, out_dir) for m in MODELS}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    load_after = open("/proc/loadavg").read().split()[:3] if platform.system() == "Linux" else ["?"]
    write = print if args.no_write else (lambda text: (print(text), write_section("extract_runtimes", text)))
    write(_table(results, args, len(src), load, load_after))


def _table(results: dict, args, n: int, load, load_after) -> str:
    import onnxruntime

    try:
        import openvino

        ov_version = openvino.__version__
    except ImportError:
        ov_version = "not installed"
    lines = [
        f"## extract_runtimes (cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "",
        f"`{command_line()}`",
        "",
        f"{n} CIFAR-10 JPEGs resized to {SIZE} px, batch {args.batch_size}, fp32, real ImageNet weights; torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, openvino {ov_version}. Best of {args.repeats} alternating rounds per variant. "
        f"Load average (1, 5, 15 min) before: {', '.join(load)}; after: {', '.join(load_after)}.",
        "",
        "| model | variant | images/s |",
        "|---|---|---:|",
    ]
    for m, r in results.items():
        lines += [f"| {m} | {k} | {v:.2f} |" for k, v in r["rates"].items()]
    lines += ["", "| model | runtime | extract / extract torch (target >= 2) | extract / its pure forward (target >= 0.85) | "
                  "max abs feature difference vs torch |", "|---|---|---:|---:|---:|"]
    for m, r in results.items():
        rt = r["rates"]
        for name, pure in (("onnx", "onnxruntime"), ("openvino", "openvino")):
            if f"extract {name}" in rt:
                lines.append(f"| {m} | {name} | {rt[f'extract {name}'] / rt['extract torch']:.2f} | "
                             f"{rt[f'extract {name}'] / rt[f'pure {pure}']:.2f} | {r['gaps'][name]:.1e} |")
    lines += ["", "One-time export of the graph (model creation and weight hashing included): "
              + ", ".join(f"{m} {r['export_s']:.1f} s" for m, r in results.items()) + "."]
    return "\n".join(lines)
