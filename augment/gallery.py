"""A picture of one photo under every corruption, at full training and evaluation strength (docs/augmentation.md).

    python -m augment.gallery --out docs/corruptions.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps

from datasets.images import load_rgb, to_tensor
from datasets.samples import sample_photo_paths
from engine.cli import HelpFormatter, positive_int

from .registry import CORRUPTIONS, PRESETS, build

LABEL_HEIGHT = 16


def gallery(photo: Image.Image, tile: int = 160, seed: int = 0) -> Image.Image:
    """A grid with one row per preset: the original, then each corruption at strength 1, each labelled."""
    x = to_tensor(ImageOps.fit(photo, (tile, tile)))[None]
    rows = []
    for preset in PRESETS:
        torch.manual_seed(seed)
        tiles = [("original", x)] + [(name, build(name, preset)(x)) for name in CORRUPTIONS]
        rows.append([(f"{name} ({preset})" if name != "original" else name, image) for name, image in tiles])
    canvas = Image.new("RGB", (tile * len(rows[0]), (tile + LABEL_HEIGHT) * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, (label, image) in enumerate(row):
            top = r * (tile + LABEL_HEIGHT)
            pixels = (image[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(pixels), (c * tile, top + LABEL_HEIGHT))
            draw.text((c * tile + 3, top + 2), label, fill="black")
    return canvas


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write (refused if it exists, "
                                                                "unless --overwrite)")
    parser.add_argument("--photo", type=Path, default=None,
                        help="photo to show (default: scikit-image's coffee.png)")
    parser.add_argument("--tile", type=positive_int, default=160, help="side of each tile in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random parameters")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
    photo_path = args.photo or next(p for p in sample_photo_paths() if p.name == "coffee.png")
    try:
        photo = load_rgb(photo_path)
    except (OSError, ValueError) as e:
        parser.error(f"--photo: {e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    gallery(photo, args.tile, args.seed).save(args.out)
    print(f"wrote {args.out} ({photo_path.name}: original, then {', '.join(CORRUPTIONS)}; rows: "
          f"{', '.join(PRESETS)} presets at full strength)")


if __name__ == "__main__":
    main()
