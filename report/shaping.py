"""What perceptual shaping buys for visibility, measured post hoc on a trained encoder: no retraining.

An encoder with `jnd` = s stamps δ_s = ĵ(x)^s·δ, δ the residual of the same weights unshaped (models.jnd: the bound
is applied first, then the map, so this is exact). For each photo this stamps three versions, each as stamp.py
would (the residual made at the working resolution, upsampled to the photo, rounded to 8 bits):

- `unshaped`: δ, what the model stamps today;
- `jnd s`: δ_s, what the same weights stamp with `--jnd s`: less energy overall, least on flat mid-tones;
- `jnd s, matched`: δ_s scaled so that its energy (Σ δ², at the working resolution) equals δ's: the same overall
  PSNR, give or take rounding, so that the flat-block PSNR shows where the energy went.

and reports PSNR, flat-block PSNR (report.visibility: 16×16 blocks of clean luma std < 3/255) and SSIM, as means
over the photos (flat-block PSNR over the photos that have flat blocks). Detection is not measured: a shaped stamp
is a different stamp, which the scanner only learns by retraining.

    OMP_NUM_THREADS=1 python -m report.shaping pretrained_models/baseline pretrained_models/rs_aug \\
        --photos ../shared/data/bsds400 --n 20 --strength 1 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from engine.cli import HelpFormatter, non_negative_float, positive_int
from engine.device import full_precision
from models import load_pretrained
from models.jnd import attenuation
from product.files import expand_inputs, read_pixels
from product.stamping import DEFAULT_WORKING_SIZE, UPSAMPLE_MODE, to_working

from .visibility import PSNR_CAP, photo_visibility


def apply_residual(photo: torch.Tensor, residual: torch.Tensor) -> np.ndarray:
    """photo (1,3,H,W) uint8, residual (1,3,h,w) float at the working resolution → stamped (H,W,3) uint8, as
    product.stamping.stamp_pixels makes it: upsampled (bilinear) to H×W, then round(255·clamp(x + δ, 0, 1))."""
    height, width = photo.shape[-2:]
    if residual.shape[-2:] != (height, width):
        residual = F.interpolate(residual, size=(height, width), mode=UPSAMPLE_MODE, align_corners=False)
    stamped = photo.float().add_(residual, alpha=255).round_().clamp_(0, 255).to(torch.uint8)
    return stamped[0].permute(1, 2, 0).contiguous().numpy()


@torch.inference_mode()
def shaped_versions(encoder, pixels: np.ndarray, strengths, working_size: int = DEFAULT_WORKING_SIZE) -> dict:
    """(H,W,3) uint8 → {name: stamped (H,W,3) uint8} for 'unshaped' and, per strength s, 'jnd s' and 'jnd s,
    matched' (see the module's docstring). The encoder's own config.jnd must be 0 (its residual unshaped)."""
    if encoder.config.jnd:
        raise ValueError(f"shaped_versions needs an unshaped encoder (config.jnd 0), got jnd {encoder.config.jnd}")
    photo = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    work = to_working(photo.float().div_(255), working_size)
    with full_precision(work.device):
        residual = encoder(work).float()
    energy = residual.pow(2).sum()
    versions = {"unshaped": apply_residual(photo, residual)}
    for s in strengths:
        shaped = attenuation(work, s) * residual
        versions[f"jnd {s:g}"] = apply_residual(photo, shaped)
        scale = torch.sqrt(energy / shaped.pow(2).sum().clamp_min(1e-30))
        versions[f"jnd {s:g}, matched"] = apply_residual(photo, shaped * scale)
    return versions


def _ssim(clean: np.ndarray, stamped: np.ndarray) -> float:
    a, b = (torch.from_numpy(p).permute(2, 0, 1)[None].float() / 255 for p in (clean, stamped))
    return float(structural_similarity_index_measure(b, a, data_range=1.0))


def measure(model_dir, photos: list[Path], strengths, working_size: int = DEFAULT_WORKING_SIZE) -> dict:
    """{version: {"psnr", "psnr_flat", "ssim": means, "photos", "photos_with_flat_blocks"}} over `photos`."""
    encoder, _, _ = load_pretrained(model_dir)
    rows: dict[str, dict[str, list]] = {}
    for path in photos:
        clean = read_pixels(path)
        for name, stamped in shaped_versions(encoder, clean, strengths, working_size).items():
            v = photo_visibility(clean, stamped)
            row = rows.setdefault(name, {"psnr": [], "psnr_flat": [], "ssim": []})
            row["psnr"].append(min(v["psnr"], PSNR_CAP))
            if v["psnr_flat"] is not None:
                row["psnr_flat"].append(min(v["psnr_flat"], PSNR_CAP))
            row["ssim"].append(_ssim(clean, stamped))
    return {name: {"psnr": float(np.mean(r["psnr"])), "psnr_flat": float(np.mean(r["psnr_flat"]))
                   if r["psnr_flat"] else None, "ssim": float(np.mean(r["ssim"])), "photos": len(r["psnr"]),
                   "photos_with_flat_blocks": len(r["psnr_flat"])} for name, r in rows.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("models", nargs="+", help="model folders (config.json + weights) or run folders, unshaped")
    p.add_argument("--photos", required=True, help="a folder of photos (the first --n in name order are used)")
    p.add_argument("--n", type=positive_int, default=20, help="photos")
    p.add_argument("--strength", type=non_negative_float, nargs="+", default=[1.0],
                   help="JND strengths to apply (the --jnd of training)")
    p.add_argument("--working_size", type=int, default=DEFAULT_WORKING_SIZE,
                   help="long side of stamp.py's working resolution, px (0 = native)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    items = expand_inputs([args.photos])
    bad = [item for item in items if item.error]
    if bad:
        p.error(f"--photos {bad[0].path}: {bad[0].error}")
    photos = [item.path for item in items][:args.n]
    results, t0 = {}, time.time()
    for model in args.models:
        results[model] = measure(model, photos, args.strength, args.working_size)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{len(photos)} photos of {args.photos}; PSNR and SSIM means over the photos, flat-block PSNR over "
              f"those with flat blocks; {time.time() - t0:.0f} s")
        print("| model | version | PSNR dB | flat-block PSNR dB | SSIM |\n|---|---|---:|---:|---:|")
        for model, rows in results.items():
            for name, r in rows.items():
                flat = "–" if r["psnr_flat"] is None else f"{r['psnr_flat']:.2f} ({r['photos_with_flat_blocks']})"
                print(f"| {model} | {name} | {r['psnr']:.2f} | {flat} | {r['ssim']:.4f} |")
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
