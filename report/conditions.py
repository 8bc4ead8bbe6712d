"""The conditions of Table 1: what happens to a photo between the sender and the scanner.

Each condition is a name and a function of a batch (B,3,H,W) in [0,1]. Fixed-strength corruptions are the
registry's modules with a one-point range (lo == hi), applied at strength 1; geometric ones keep a random
sign or direction per image. JPEG is always real (Pillow).

The forwarding block (Table 1b) is what a messaging app does to a photo it forwards: real codecs and real
resampling on the 8-bit file (augment.forwarding), each a name and a Forwarding; the photo keeps the size the
app gives it (downscaled, cropped), unless `prepare` (the scanner's own preparation of a received file) says
otherwise.
"""
from __future__ import annotations

from typing import Callable

import torch

from augment import StochasticChain, build
from augment.forwarding import JPEG, CentreCrop, Downscale, Forwarding, WebP

Condition = Callable[[torch.Tensor], torch.Tensor]

#: the paper code's evaluation chain: colour jitter, crop, Gaussian blur, rotation, perspective and JPEG,
#: every one applied to every image, here in random order with the `eval` preset's ranges, and real JPEG at
#: quality 75
MIXED_CHAIN = ("jitter", "crop", "gaussian_blur", "rotation", "perspective", "jpeg")


def mixed_chain() -> StochasticChain:
    corruptions = [build(name, "eval", **({"quality": (75, 75)} if name == "jpeg" else {})) for name in MIXED_CHAIN]
    return StochasticChain(corruptions, p=1.0)


def table1_conditions() -> dict[str, Condition | None]:
    """name → condition (None: the photo as it is), in the order Table 1 shows them."""
    def fixed(name, **ranges):
        return build(name, "eval", **ranges)

    return {
        "none": None,
        "rotation ±15°": fixed("rotation", degrees=(15, 15)),
        "rotation ±30°": fixed("rotation", degrees=(30, 30)),
        "crop 70% of the area": fixed("crop", scale=(0.7, 0.7)),
        "crop 50% of the area": fixed("crop", scale=(0.5, 0.5)),
        "colour jitter ≤ 0.3, hue ≤ 0.1": fixed("jitter", brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1),
        "Gaussian blur 7×7, σ 2": fixed("gaussian_blur", kernel_size=(7, 7), sigma=(2, 2)),
        "defocus radius 3 (ImageNet-C 1)": fixed("defocus", radius=(3, 3)),
        "defocus radius 6 (ImageNet-C 3)": fixed("defocus", radius=(6, 6)),
        "perspective 0.1": fixed("perspective", distortion=(0.1, 0.1)),
        "perspective 0.2": fixed("perspective", distortion=(0.2, 0.2)),
        "pixel noise σ 0.05": fixed("noise", std=(0.05, 0.05)),
        "pixel noise σ 0.1": fixed("noise", std=(0.1, 0.1)),
        "resize to 50%": fixed("resize", scale=(0.5, 0.5)),
        "resize to 25%": fixed("resize", scale=(0.25, 0.25)),
        "JPEG q90": fixed("jpeg", quality=(90, 90)),
        "JPEG q75": fixed("jpeg", quality=(75, 75)),
        "JPEG q50": fixed("jpeg", quality=(50, 50)),
        "mixed chain (JPEG q75)": mixed_chain(),
    }


def forwarding_conditions(prepare=None) -> dict[str, Forwarding]:
    """name → Forwarding, in the order Table 1b shows them: what a messaging app does to a photo. Every one
    starts from the photo saved as 8-bit pixels. `prepare`: (h,w,3) uint8 → uint8, what the scanner does to the
    received file before judging it (evaluate.py: fitting it to a fixed-size network's input), None: nothing."""
    def forwarding(*steps):
        return Forwarding(*steps, prepare=prepare)

    return {
        "JPEG q60 (4:2:0)": forwarding(JPEG(60)),
        "JPEG q75 (4:2:0)": forwarding(JPEG(75)),
        "WebP q75": forwarding(WebP(75)),
        "downscale to 75% (Lanczos), JPEG q80 (4:2:0)": forwarding(Downscale(0.75), JPEG(80)),
        "centre crop 90% of each side, JPEG q85 (4:2:0)": forwarding(CentreCrop(0.9), JPEG(85)),
    }
