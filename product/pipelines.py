"""What platforms do to a photo between sender and scanner: one table of pipelines, each a chain of real steps on
the 8-bit file (augment.forwarding: libjpeg and libwebp through Pillow, Pillow's resampling, crops).

The product stage (product.stage) sends every clean and every stamped photo through each pipeline and judges
what comes out with scan.py's judge. Codecs round-trip in memory through Pillow, exactly as a file written and
read back by Pillow would (tests/test_product.py checks one against a real file).
"""
from __future__ import annotations

import numpy as np

from augment.forwarding import JPEG, PNG, CentreCrop, CropAspect, Downscale, LongSide, Resample, WebP

#: name → steps, in the order the tables show them. "as stamped" is the stamped file itself (PNG, lossless).
PIPELINES = {
    "as stamped": (PNG(),),
    "JPEG q60": (JPEG(60),),
    "JPEG q75": (JPEG(75),),
    "JPEG q85": (JPEG(85),),
    "WebP q75": (WebP(75),),
    "long side 1080, JPEG q80": (LongSide(1080), JPEG(80)),
    "long side 720, JPEG q80": (LongSide(720), JPEG(80)),
    "downscale 50%, JPEG q80": (Downscale(0.5), JPEG(80)),
    "downscale 75%, JPEG q80": (Downscale(0.75), JPEG(80)),
    "centre crop 90%, JPEG q85": (CentreCrop(0.9), JPEG(85)),
    "crop to 4:5, JPEG q85": (CropAspect(4, 5), JPEG(85)),
    "screenshot ×0.8": (Resample(0.8), PNG()),
    "screenshot ×1.25": (Resample(1.25), PNG()),
    "long side 1080, WebP q75": (LongSide(1080), WebP(75)),
}
#: `evaluate.py --product_pipelines short`: one of each kind (the file, a codec of each family, a resampling, a
#: crop, a screenshot), for models whose full table costs too long on a CPU (a smoothed scanner: 16 noisy copies
#: per verdict)
SHORT_PIPELINES = ("as stamped", "JPEG q75", "WebP q75", "downscale 75%, JPEG q80", "crop to 4:5, JPEG q85",
                   "screenshot ×0.8")
#: --quick's pipelines: the file itself, a codec, and a resampling
QUICK_PIPELINES = ("as stamped", "JPEG q75", "downscale 75%, JPEG q80")


def apply(name: str, pixels: np.ndarray) -> np.ndarray:
    """The received file's pixels after pipeline `name`: (H,W,3) uint8 → (h,w,3) uint8."""
    for step in PIPELINES[name]:
        pixels = step(pixels)
    return pixels


def describe(name: str) -> str:
    """The pipeline's steps with their parameters, as the results record them."""
    return ", then ".join(step.describe() for step in PIPELINES[name])


def select(names) -> list[str]:
    """Pipeline names, checked (ValueError naming the unknown one and the known ones)."""
    names = list(names)
    for name in names:
        if name not in PIPELINES:
            raise ValueError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}")
    return names
