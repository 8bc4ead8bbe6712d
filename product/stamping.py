"""Stamping a photo as stamp.py does, and the working resolution that stamp.py and scan.py share.

stamp.py (the command), scan.py and the product stage of evaluate.py (product.stage) all import from here, so
that a figure measured by the stage is what the tools do to a file.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from engine.device import full_precision
from models import load_pretrained
from smoothing.certify import resolve_model

#: Long side in pixels of the working resolution that both stamp.py and scan.py bring photos to. The paper's
#: networks train on 400×400 crops of MIRFlickr photos (about 500 px on the long side), so 512 keeps content
#: near that scale; 0 means native resolution.
DEFAULT_WORKING_SIZE = 512
#: How the working-resolution residual is brought to the photo's resolution. Bilinear: as fast as the rest of
#: the full-resolution work, and no overshoot (bicubic took 0.35 s instead of 0.11 s to upsample to 12 MP).
UPSAMPLE_MODE = "bilinear"


# ------------------------------------------------------------------------------------ working resolution
def working_shape(height: int, width: int, working_size: int) -> tuple[int, int]:
    """(height, width) of the working resolution: long side `working_size`, aspect ratio kept; the photo's own
    size when it is not larger (images are never upscaled) or when working_size is 0 (native)."""
    long_side = max(height, width)
    if not working_size or long_side <= working_size:
        return height, width
    scale = working_size / long_side
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_working(x: torch.Tensor, working_size: int) -> torch.Tensor:
    """x (B,3,H,W) float → the same images at the working resolution (antialiased bilinear downscaling);
    x itself when it is already there. stamp.py and scan.py both go through this function."""
    size = working_shape(x.shape[-2], x.shape[-1], working_size)
    if size == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def upsample_residual(residual: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """residual (B,C,h,w) at the working resolution → (B,C,H,W) at the photo's `size` (UPSAMPLE_MODE, pixel
    centres aligned); itself when already that size. stamp.py's round trip, and the training that models it
    (augment.resample), go through this function."""
    if tuple(residual.shape[-2:]) == tuple(size):
        return residual
    return F.interpolate(residual, size=tuple(size), mode=UPSAMPLE_MODE, align_corners=False)


def fit_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H,W,3) uint8 → (size,size,3) uint8: the central square, resized (bicubic), exactly as the original code
    prepares a photo (`ImageOps.fit(image, (size, size))`). For networks with a fixed input size (`input_size`:
    the original's encoder and detector take 400×400 only), used instead of the working resolution."""
    return np.array(ImageOps.fit(Image.fromarray(pixels), (size, size)))


def fit_text(size: int) -> str:
    """How stamp.py and scan.py say, once, that photos are fitted."""
    return (f"each photo fitted to {size}×{size} (centre square, resized, like the original code's ImageOps.fit: "
            f"the network takes {size}×{size} only; --working_size does not apply)")



# ------------------------------------------------------------------------------------------------ model
def load_model(path, device):
    """--model (a run folder or a model folder) → (model_dir, run_dir, run_args, encoder, scanner, config).

    Raises FileNotFoundError/ValueError with one line naming the folder or file."""
    model_dir, run_dir, run_args = resolve_model(path)
    encoder, scanner, config = load_pretrained(model_dir, device=device)  # encoder None: a scanner-only folder
    if device.type in ("cpu", "cuda"):  # oneDNN's and cuDNN's fast layout for convolutions
        if encoder is not None:
            encoder = encoder.to(memory_format=torch.channels_last)
        scanner = scanner.to(memory_format=torch.channels_last)
    return model_dir, run_dir, run_args, encoder, scanner, config


@torch.inference_mode()
def stamp_pixels(encoder: torch.nn.Module, pixels: np.ndarray, working_size: int = DEFAULT_WORKING_SIZE
                 ) -> tuple[np.ndarray, tuple[int, int]]:
    """Stamp one photo at full resolution.

    pixels (H,W,3) uint8 → (stamped (H,W,3) uint8, (h, w) of the working resolution the residual was made at).
    The residual δ = E(x_w) of the photo x_w at the working resolution is upsampled (bilinear) to H×W and the
    photo becomes round(255·clamp(x + δ, 0, 1)); below the working size, simply x' = clamp(x + E(x), 0, 1).
    """
    device = next(encoder.parameters()).device
    height, width = pixels.shape[:2]
    photo = torch.from_numpy(pixels).to(device).permute(2, 0, 1)[None]  # (1,3,H,W) uint8, a view
    work = to_working(photo.float().div_(255), working_size)
    with full_precision(device):  # fp32 on every device: the same stamp from a GPU as from a CPU
        residual = encoder(work.contiguous(memory_format=torch.channels_last)).float()
    residual = upsample_residual(residual, (height, width))
    # In 0..255 units: round(clamp(255·x + 255·δ, 0, 255)) = round(255·clamp(x + δ, 0, 1)).
    stamped = photo.float().add_(residual, alpha=255).round_().clamp_(0, 255).to(torch.uint8)
    # .float() and .to() keep the channels-last strides of `photo`, so this permute is already contiguous
    return stamped[0].permute(1, 2, 0).contiguous().cpu().numpy(), tuple(work.shape[-2:])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images of the same shape (inf when identical)."""
    a, b = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for start in range(0, a.size, 1 << 20):  # float32 dot products of 1M values each: exact enough, no big temporaries
        diff = a[start:start + (1 << 20)].astype(np.float32) - b[start:start + (1 << 20)]
        total += float(np.dot(diff, diff))
    mse = total / max(1, a.size)
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)
