"""Image files in and out for stamp.py and scan.py: reading upright 8-bit RGB, expanding INPUT arguments, writing
atomically, and listing what a batch could not process."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets.images import NoImagesError, find_images, load_rgb

#: zlib level of the PNGs written. Pillow's default (6) takes about 4 s for a 12-MP photo on one core; level 1
#: takes about 1 s for files about 17% larger (measured on a 12-MP photo: 20.2 MB against 17.2 MB).
PNG_COMPRESS_LEVEL = 1


def pixels_to_tensor(pixels: np.ndarray, device) -> torch.Tensor:
    """(H,W,3) uint8 → (1,3,H,W) float32 in [0,1] on `device` (channels_last memory, no transpose copy)."""
    return torch.from_numpy(pixels).to(device).permute(2, 0, 1)[None].float().div_(255)


def read_pixels(path) -> np.ndarray:
    """An image file as upright 8-bit RGB, (H,W,3) uint8; raises datasets.ImageReadError for a bad file."""
    return np.array(load_rgb(path))


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class Item:
    """One image to process: `path` to read, `rel` its path relative to the folder INPUT it came from (None
    for a file given by name), or an `error` (a missing input, a folder without images)."""

    path: Path
    rel: Path | None = None
    error: str | None = None


def expand_inputs(inputs) -> list[Item]:
    """INPUT arguments → items, in order.

    A file is taken whatever its extension (a misnamed file is then reported when it cannot be read); a folder
    gives its image files, recursively, sorted. A missing path or a folder without images becomes an Item with
    an error, so that the rest of the batch goes on."""
    items = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            try:
                found = find_images(path)
            except NoImagesError as e:
                items.append(Item(path, error=str(e).split(": ", 1)[-1]))
                continue
            items += [Item(file, file.relative_to(path)) for file in found]
        elif path.exists():
            items.append(Item(path))
        else:
            items.append(Item(path, error="no such file or directory"))
    return items



def write_image(pixels: np.ndarray, target: Path, quality: int | None) -> None:
    """Write (H,W,3) uint8 as PNG (quality None) or JPEG at `quality` (4:4:4 chroma, so that the colour part of
    the stamp is not halved), through a temporary file renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    image = Image.fromarray(pixels, mode="RGB")
    try:
        if quality is None:
            image.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        else:
            image.save(tmp, format="JPEG", quality=quality, subsampling=0)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


#: How many failed inputs the end-of-run list names (each was also reported when it happened).
MAX_LISTED = 20


def report_failures(title: str, failures, file=None) -> None:
    """The inputs a batch could not process, listed together at its end (on stderr): 'TITLE (N):' then one
    'PATH: REASON' line each, at most MAX_LISTED of them."""
    if not failures:
        return
    lines = [f"{title} ({len(failures)}):"] + [f"  {path}: {reason}" for path, reason in failures[:MAX_LISTED]]
    if len(failures) > MAX_LISTED:
        lines.append(f"  and {len(failures) - MAX_LISTED} more (each reported above)")
    print("\n".join(lines), file=file or sys.stderr, flush=True)


