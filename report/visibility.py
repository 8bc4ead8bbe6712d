"""Where a stamp shows: PSNR over the flat 16×16 blocks of each photo (clean luma std < 3/255), the worst photos, and
a picture of 100% crops of their flattest regions: clean | stamped | residual ×10.

A stamp spread evenly over a photo is hidden by texture and seen on smooth areas (sky, walls, skin), so the PSNR of
the whole photo understates what a viewer notices; the flat-block PSNR measures it where it is seen.
All images are (H, W, 3) uint8 RGB numpy arrays; nothing here needs a network or model weights.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BLOCK = 16  # px, side of the blocks judged flat or not
FLAT_STD = 3 / 255  # clean luma std (luma in [0, 1]) under which a block counts as flat
RESIDUAL_GAIN = 10  # the residual tile shows 128 + RESIDUAL_GAIN·(stamped − clean)
CROP = 128  # px, side of the crops in the figure
PSNR_CAP = 100.0  # dB, what summarize() counts an identical photo (PSNR = inf) as
GAP = 4  # px between tiles and around the figure
STRIP = 14  # px, height of each text strip (title, column names, row labels)
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601


def _check_pair(clean: np.ndarray, stamped: np.ndarray) -> None:
    if clean.shape != stamped.shape:
        raise ValueError(f"clean and stamped photos differ in shape: {clean.shape} vs {stamped.shape}")


def luma(pixels: np.ndarray) -> np.ndarray:
    """BT.601 luma Y of (H, W, 3) uint8 RGB pixels: (H, W) float64 in [0, 1]."""
    return (pixels.astype(np.float64) / 255) @ _LUMA


def block_std(pixels: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Std of the luma (in [0, 1] units) in each full block×block block: (H // block, W // block) float64.
    The partial blocks at the right and bottom edges are left out."""
    hb, wb = pixels.shape[0] // block, pixels.shape[1] // block
    y = luma(pixels[:hb * block, :wb * block]).reshape(hb, block, wb, block)
    return y.std(axis=(1, 3))


def flat_mask(pixels: np.ndarray) -> np.ndarray:
    """(H // BLOCK, W // BLOCK) bool: True where the block's clean luma std is under FLAT_STD."""
    return block_std(pixels) < FLAT_STD


def _pixel_mask(mask: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(mask, BLOCK, axis=0), BLOCK, axis=1)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """PSNR in dB between two (H, W, 3) uint8 images over all three channels, peak 255; inf when they are equal.
    With a (H // BLOCK, W // BLOCK) bool block mask, only the pixels of the True blocks count, and None is returned
    when it selects none."""
    _check_pair(a, b)
    diff = a.astype(np.float64) - b.astype(np.float64)  # uint8 subtraction would wrap around
    if mask is not None:
        expected = (a.shape[0] // BLOCK, a.shape[1] // BLOCK)
        if mask.shape != expected:
            raise ValueError(f"block mask of shape {mask.shape} does not fit a {a.shape} photo (needs {expected})")
        if not mask.any():
            return None
        diff = diff[:expected[0] * BLOCK, :expected[1] * BLOCK][_pixel_mask(mask)]
    mse = float(np.mean(diff ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def photo_visibility(clean: np.ndarray, stamped: np.ndarray) -> dict:
    """How visible the stamp is on one photo. Returns {"psnr": dB over all pixels, "psnr_flat": dB over the flat
    blocks (None without any), "flat_fraction": share of the full blocks that are flat (0..1), "flat_blocks": their
    count, "max_abs_flat": largest |stamped − clean| within flat blocks, 0..255 units (None without any)}."""
    _check_pair(clean, stamped)
    mask = flat_mask(clean)
    max_abs = None
    if mask.any():
        h, w = mask.shape[0] * BLOCK, mask.shape[1] * BLOCK
        diff = np.abs(stamped[:h, :w].astype(np.int16) - clean[:h, :w])
        max_abs = int(diff[_pixel_mask(mask)].max())
    return {"psnr": psnr(clean, stamped), "psnr_flat": psnr(clean, stamped, mask),
            "flat_fraction": float(mask.mean()) if mask.size else 0.0, "flat_blocks": int(mask.sum()),
            "max_abs_flat": max_abs}


def flattest_window(clean: np.ndarray, size: int = CROP) -> tuple[int, int]:
    """(top, left) in px of the size×size window, on the BLOCK grid, whose full blocks have the lowest mean luma std.
    size is clamped to the photo; a window smaller than one block gives (0, 0). Ties go to the first in reading
    order."""
    h, w = clean.shape[:2]
    size = min(size, h, w)
    n = size // BLOCK
    if n == 0:
        return 0, 0
    std = block_std(clean)
    # Summed-area table: each window's total is four lookups, whatever its size.
    sat = np.pad(std.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    rows, cols = (h - size) // BLOCK + 1, (w - size) // BLOCK + 1  # grid positions where the whole window fits
    totals = sat[n:n + rows, n:n + cols] - sat[:rows, n:n + cols] - sat[n:n + rows, :cols] + sat[:rows, :cols]
    # Differences of large cumulative sums leave ~1e-15 noise; rounding it off lets equally flat windows tie.
    i, j = np.unravel_index(int(np.argmin(np.round(totals, 9))), totals.shape)
    return int(i) * BLOCK, int(j) * BLOCK


def _capped(value: float) -> float:
    return min(float(value), PSNR_CAP)


def _mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))} if values else {"mean": None, "std": None}


def summarize(per_photo: list[dict], names: list[str]) -> dict:
    """Summary of photo_visibility() results, one per name. PSNR values are capped at PSNR_CAP (100 dB), so an
    identical photo (inf) counts as 100 dB and the means, stds and worst value are finite (and JSON-safe). The
    psnr_flat statistics cover only the photos with flat blocks ("n"); mean and std are None, and worst is None,
    when none has any. std is the population std (ddof = 0), in dB."""
    if len(per_photo) != len(names) or not names:
        raise ValueError(f"summarize needs one name per photo and at least one photo: got {len(per_photo)} "
                         f"results and {len(names)} names")
    flat = [(name, _capped(r["psnr_flat"])) for name, r in zip(names, per_photo) if r["psnr_flat"] is not None]
    worst = min(flat, key=lambda item: item[1]) if flat else None
    return {"photos": len(names), "psnr": _mean_std([_capped(r["psnr"]) for r in per_photo]),
            "psnr_flat": {**_mean_std([v for _, v in flat]), "n": len(flat),
                          "worst": {"name": worst[0], "value": worst[1]} if worst else None},
            "flat_fraction_mean": float(np.mean([r["flat_fraction"] for r in per_photo]))}


def worst_photos(per_photo: list[dict], names: list[str], k: int = 4) -> list[int]:
    """Indices of the k photos with the lowest psnr_flat, worst first. Photos without flat blocks come after all
    the others, by overall psnr; ties go by name."""
    def key(i: int):
        r = per_photo[i]
        flat = r["psnr_flat"]
        return (flat is None, r["psnr"] if flat is None else flat, names[i])
    return sorted(range(len(per_photo)), key=key)[:k]


def _residual_tile(clean: np.ndarray, stamped: np.ndarray) -> np.ndarray:
    residual = stamped.astype(np.int32) - clean.astype(np.int32)
    return np.clip(128 + RESIDUAL_GAIN * residual, 0, 255).astype(np.uint8)


def visibility_figure(examples: list[tuple[str, np.ndarray, np.ndarray]], path: Path | str,
                      title: str | None = None) -> Path:
    """PNG of one row per (name, clean, stamped) example: 100% crops (no resampling) of the flattest CROP×CROP
    window of the clean photo, as clean | stamped | residual (128 + RESIDUAL_GAIN·(stamped − clean), clipped to
    0..255), under a label with the name and the photo's flat-block PSNR. Layout, in px: GAP around and between
    tiles; STRIP-high strips for the optional title, the column names, and each row's label. The file is written
    to a temporary name and renamed, so a crash never leaves a half-written PNG. Returns the path."""
    if not examples:
        raise ValueError("visibility_figure needs at least one (name, clean, stamped) example")
    path = Path(path)
    width = GAP + 3 * (CROP + GAP)
    height = GAP + STRIP * (2 if title else 1) + len(examples) * (STRIP + CROP + GAP)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    y = GAP
    if title:
        draw.text((GAP, y), title, fill="black", font=font)
        y += STRIP
    for c, heading in enumerate(["clean", "stamped", f"residual x{RESIDUAL_GAIN} (+128)"]):
        draw.text((GAP + c * (CROP + GAP), y), heading, fill="black", font=font)
    y += STRIP
    for name, clean, stamped in examples:
        flat = photo_visibility(clean, stamped)["psnr_flat"]
        label = f"{name}: flat-block PSNR " + ("n/a (no flat block)" if flat is None else f"{flat:.1f} dB")
        draw.text((GAP, y), label, fill="black", font=font)
        y += STRIP
        top, left = flattest_window(clean)
        size = min(CROP, *clean.shape[:2])
        window = np.s_[top:top + size, left:left + size]
        for c, tile in enumerate([clean[window], stamped[window], _residual_tile(clean[window], stamped[window])]):
            canvas.paste(Image.fromarray(np.ascontiguousarray(tile)), (GAP + c * (CROP + GAP), y))
        y += CROP + GAP
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
