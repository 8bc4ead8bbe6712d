"""Perceptual shaping: a just-noticeable-difference (JND) map of a photo, and the attenuation of a residual by it.

The eye sees a change least in busy texture, near edges and in very dark or very bright regions, and most on flat
mid-tones (a blue sky, a white wall). `jnd_levels` estimates, per pixel, the largest luma change that stays
unseen, in 8-bit levels, from the clean photo alone:

    Y  = 255·(0.299 R + 0.587 G + 0.114 B)                        luma, 8-bit levels
    b  = mean of Y over the 5×5 window                             background luminance
    g  = sqrt(mean over the 5×5 window of |Sobel ∇Y|²)              local texture/edge energy, levels
    L(b) = 17·(1 − sqrt(b/127)) + 3    for b ≤ 127                 luminance masking (Chou & Li 1995)
           3/128·(b − 127) + 3         above
    C(g) = g / 8                                                    texture and contrast masking
    T  = L + C − 0.3·min(L, C)                                      the two maskings overlap (Yang et al. 2003)

`jnd_map` normalises it to ĵ = min(T / 12, 1) in [0.25, 1]: 1 (the whole residual) wherever 12 levels stay unseen
(texture with a luma std of about 15 levels or more, edges, and the darkest shadows, b < 28); 0.25 on a flat
mid-grey (b = 127, g = 0), about 0.35 on a flat bright sky (b ≈ 180) and 0.45 on a flat white wall (b ≈ 230).
`attenuation(x, strength)` is ĵ^strength (strength 0: 1 everywhere; 1: ĵ; 2: ĵ², flat mid-grey 1/16).

The luminance curve and the overlap constant are the classic ones; the texture term is ours: a linear function of
the RMS gradient over a 5×5 window (Chou & Li use the largest of four directional 5×5 differences; VideoSeal's
JND a saturating power of the pointwise Sobel magnitude), so that every pixel of a textured patch is masked,
not only its edges, and a flat pixel more than 3 px from an edge is not. 1/8 makes a patch of luma std 15 levels
(g ≈ 4.9·15 for pixel noise) reach the full allowance, and a flat block of the visibility report (std < 3 levels)
stay near 0.3. The map is a constant of the clean photo: computed without gradient (`x` is detached), in fp32
whatever the caller's autocast, from Python scalars only (no constant tensors: no host-device copy per call).
Shapes: x (B,3,H,W) in [0,1], any H, W ≥ 1 (replicate padding) → (B,1,H,W).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: BT.601 luma weights (the visibility report's and VideoSeal's)
LUMA = (0.299, 0.587, 0.114)
#: side in pixels of the windows of the background luminance and of the texture energy
WINDOW = 5
#: Chou & Li's luminance masking: the threshold is MIN_LEVELS at MID_LEVEL, rising by DARK_GAIN towards black
#: (as a square root) and by BRIGHT_SLOPE per level towards white
MID_LEVEL, MIN_LEVELS, DARK_GAIN, BRIGHT_SLOPE = 127.0, 3.0, 17.0, 3.0 / 128.0
#: texture masking: levels of threshold per level of RMS Sobel gradient
TEXTURE_GAIN = 1.0 / 8.0
#: overlap of the two maskings in T = L + C − OVERLAP·min(L, C)
OVERLAP = 0.3
#: threshold (levels) at and above which the whole residual is allowed; ĵ = min(T / FULL_LEVELS, 1)
FULL_LEVELS = 12.0


def _box(image: torch.Tensor, size: int = WINDOW) -> torch.Tensor:
    """Mean over the size×size window around each pixel, replicate padding: (B,1,H,W) → (B,1,H,W)."""
    r = size // 2
    return F.avg_pool2d(F.pad(image, (r, r, r, r), mode="replicate"), size, stride=1)


def _sobel_energy(y: torch.Tensor) -> torch.Tensor:
    """|Sobel ∇y|² per pixel (gx² + gy², kernels [1,2,1]ᵀ[−1,0,1] and its transpose), replicate padding; from
    slices rather than a convolution, so that no kernel tensor is built per call."""
    p = F.pad(y, (1, 1, 1, 1), mode="replicate")
    rows = p[..., :-2, :] + 2 * p[..., 1:-1, :] + p[..., 2:, :]  # smoothed down the columns: (B,1,H,W+2)
    cols = p[..., :, :-2] + 2 * p[..., :, 1:-1] + p[..., :, 2:]  # smoothed along the rows: (B,1,H+2,W)
    gx = rows[..., 2:] - rows[..., :-2]
    gy = cols[..., 2:, :] - cols[..., :-2, :]
    return gx * gx + gy * gy


def luminance_masking(background: torch.Tensor) -> torch.Tensor:
    """Chou & Li's visibility threshold (8-bit levels) on a background of `background` levels (0..255)."""
    dark = DARK_GAIN * (1 - torch.sqrt(background.clamp(0, MID_LEVEL) / MID_LEVEL)) + MIN_LEVELS
    bright = BRIGHT_SLOPE * (background - MID_LEVEL) + MIN_LEVELS
    return torch.where(background <= MID_LEVEL, dark, bright)


def jnd_levels(x: torch.Tensor) -> torch.Tensor:
    """The JND threshold T of each pixel in 8-bit levels (see the module's docstring): x (B,3,H,W) in [0,1] →
    (B,1,H,W) fp32, ≥ MIN_LEVELS; a constant of x (no gradient), in fp32 inside any autocast."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"jnd_levels takes (B,3,H,W) RGB images, got shape {tuple(x.shape)}")
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        x = x.detach().float()
        y = 255 * (LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3])
        lum = luminance_masking(_box(y))
        tex = TEXTURE_GAIN * torch.sqrt(_box(_sobel_energy(y)))
        return lum + tex - OVERLAP * torch.minimum(lum, tex)


def jnd_map(x: torch.Tensor) -> torch.Tensor:
    """ĵ = min(T / FULL_LEVELS, 1): x (B,3,H,W) in [0,1] → (B,1,H,W) fp32 in [MIN_LEVELS / FULL_LEVELS, 1] = [0.25,
    1]; 1 where the whole residual stays unseen, small on flat mid-tones. No gradient."""
    return (jnd_levels(x) / FULL_LEVELS).clamp(max=1.0)


def attenuation(x: torch.Tensor, strength: float) -> torch.Tensor:
    """ĵ(x)^strength (B,1,H,W) fp32: the factor a residual is multiplied by, per pixel (the same for R, G and B);
    strength 0 gives 1 everywhere, 1 the map itself, 2 its square. No gradient."""
    if not strength >= 0:
        raise ValueError(f"the JND strength must be >= 0, got {strength}")
    j = jnd_map(x)
    return j if strength == 1 else j.pow(strength)
