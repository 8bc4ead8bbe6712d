"""What a messaging app does to a photo it forwards: real codecs and real resampling on 8-bit pixels.

Unlike the corruptions (augment.corruptions: differentiable, same-size, for training and Table 1), these are
exact round trips through Pillow, for evaluation only:

- `JPEG(quality)`: libjpeg encode/decode at `quality` with 4:2:0 chroma subsampling (Pillow's subsampling=2).
- `WebP(quality)`: lossy libwebp encode/decode at `quality` (Pillow's defaults otherwise: method 4).
- `Downscale(factor)`: each side × factor (rounded to whole pixels), Lanczos (Pillow's LANCZOS, whose kernel is
  widened by 1/factor when reducing, so it is antialiased; reducing_gap None: the exact convolution). The
  photo stays smaller, as it arrives.
- `CentreCrop(fraction)`: the central `fraction` of each side (rounded to whole pixels; so fraction² of the
  area), cut out without resampling.
- `LongSide(pixels)`, `Resample(factor)`, `CropAspect(w, h)`, `PNG()`: a platform's upload size (shrink only),
  a display's scaling before a screenshot, a portrait crop, a lossless file (product.pipelines uses them).

A `Forwarding` chains them on a batch (B,3,H,W) in [0,1]: each image is first quantised to 8 bits exactly as a
saved file is (augment.corruptions.to_pixels, the code path of the real-JPEG corruption), then goes through
the steps, then through `prepare` (what the scanner does to the received file before judging it, e.g. fitting
it to a fixed-size network's input; None: nothing), and comes back as floats k/255. Geometric steps change the
size: the output is (B,3,h,w), the same for every image of a batch of one size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .corruptions import encode_decode, to_pixels

Pixels = np.ndarray  # (H,W,3) uint8


@dataclass(frozen=True)
class JPEG:
    """Real JPEG at `quality`, chroma subsampled 4:2:0 (subsampling=2) unless told otherwise (1: 4:2:2, 0: 4:4:4)."""
    quality: int
    subsampling: int = 2

    def __call__(self, pixels: Pixels) -> Pixels:
        return encode_decode(pixels, "JPEG", quality=self.quality, subsampling=self.subsampling)

    def describe(self) -> str:
        return f"JPEG quality {self.quality}, {('4:4:4', '4:2:2', '4:2:0')[self.subsampling]} (libjpeg via Pillow)"


@dataclass(frozen=True)
class WebP:
    """Real lossy WebP at `quality`."""
    quality: int

    def __call__(self, pixels: Pixels) -> Pixels:
        return encode_decode(pixels, "WEBP", quality=self.quality, lossless=False)

    def describe(self) -> str:
        return f"WebP quality {self.quality}, lossy (libwebp via Pillow, method 4)"


def scaled_side(side: int, factor: float) -> int:
    """A side of `side` pixels times `factor`, rounded to whole pixels, at least 1."""
    return max(1, round(side * factor))


@dataclass(frozen=True)
class Downscale:
    """Each side × `factor`, Lanczos-resampled (antialiased); the result keeps its smaller size."""
    factor: float

    def __call__(self, pixels: Pixels) -> Pixels:
        h, w = pixels.shape[:2]
        size = (scaled_side(w, self.factor), scaled_side(h, self.factor))
        return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS)).copy()

    def describe(self) -> str:
        return (f"downscale each side to {100 * self.factor:g}% (Pillow's LANCZOS: antialiased, reducing_gap None, "
                f"sides rounded to whole pixels)")


@dataclass(frozen=True)
class CentreCrop:
    """The central `fraction` of each side (of the height and of the width), no resampling."""
    fraction: float

    def __call__(self, pixels: Pixels) -> Pixels:
        h, w = pixels.shape[:2]
        ch, cw = scaled_side(h, self.fraction), scaled_side(w, self.fraction)
        top, left = (h - ch) // 2, (w - cw) // 2
        return pixels[top:top + ch, left:left + cw].copy()

    def describe(self) -> str:
        return (f"centre crop to {100 * self.fraction:g}% of each side ({100 * self.fraction ** 2:g}% of the area; "
                f"sides rounded to whole pixels, no resampling)")


@dataclass(frozen=True)
class LongSide:
    """Shrink so that the long side is `pixels` (Lanczos, antialiased), as a platform sizes uploads; a photo whose
    long side is not larger is left as it is (platforms do not upscale)."""
    pixels: int

    def __call__(self, pixels: Pixels) -> Pixels:
        h, w = pixels.shape[:2]
        if max(h, w) <= self.pixels:
            return pixels
        return Downscale(self.pixels / max(h, w))(pixels)

    def describe(self) -> str:
        return f"long side shrunk to {self.pixels} px if longer (Pillow's LANCZOS, antialiased)"


@dataclass(frozen=True)
class Resample:
    """Each side × `factor` with Pillow's BILINEAR filter (antialiased when shrinking), as a screen shows a photo
    scaled by the display before a screenshot grabs it; up or down."""
    factor: float

    def __call__(self, pixels: Pixels) -> Pixels:
        h, w = pixels.shape[:2]
        size = (scaled_side(w, self.factor), scaled_side(h, self.factor))
        return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)).copy()

    def describe(self) -> str:
        return f"resampled ×{self.factor:g} (Pillow's BILINEAR, as a display scales it)"


@dataclass(frozen=True)
class CropAspect:
    """The largest centred crop with width:height = `width`:`height` (e.g. 4:5, a portrait post), no resampling."""
    width: int
    height: int

    def __call__(self, pixels: Pixels) -> Pixels:
        h, w = pixels.shape[:2]
        if w * self.height > h * self.width:  # too wide: keep the height
            ch, cw = h, max(1, round(h * self.width / self.height))
        else:
            ch, cw = max(1, round(w * self.height / self.width)), w
        top, left = (h - ch) // 2, (w - cw) // 2
        return pixels[top:top + ch, left:left + cw].copy()

    def describe(self) -> str:
        return f"centred crop to aspect {self.width}:{self.height} (no resampling)"


@dataclass(frozen=True)
class PNG:
    """A lossless PNG round trip (a screenshot's file): the pixels as they are, through the real codec."""

    def __call__(self, pixels: Pixels) -> Pixels:
        return encode_decode(pixels, "PNG", compress_level=1)

    def describe(self) -> str:
        return "PNG (lossless)"


class Forwarding:
    """A chain of steps on 8-bit pixels, applied to a batch (B,3,H,W) in [0,1] → (B,3,h,w) in [0,1] (values
    k/255), same dtype and device. `prepare`: (h,w,3) uint8 → uint8, what the scanner does to the received file
    before judging it (None: nothing)."""

    def __init__(self, *steps: Callable[[Pixels], Pixels], prepare: Callable[[Pixels], Pixels] | None = None):
        if not steps:
            raise ValueError("Forwarding: give at least one step")
        self.steps, self.prepare = steps, prepare

    def pixels(self, pixels: Pixels) -> Pixels:
        """The received file's pixels, as the scanner sees them: the steps, then `prepare`."""
        for step in self.steps:
            pixels = step(pixels)
        return self.prepare(pixels) if self.prepare is not None else pixels

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = [torch.from_numpy(np.ascontiguousarray(self.pixels(to_pixels(image)))).permute(2, 0, 1)
               for image in x]
        return torch.stack(out).to(x.device, x.dtype) / 255

    def describe(self) -> str:
        return ", then ".join(step.describe() for step in self.steps)

    def __repr__(self) -> str:
        return f"Forwarding({', '.join(map(repr, self.steps))}, prepare={self.prepare!r})"
